"""The resumable-shard scheme both anchor jobs write: pool embedding (`anchors.embed`) and captioning.

    out_dir/index-<rank>.json   {"fingerprint": what the job is, "shards": {shard: what its process recorded}}

A job cuts its work into numbered shards. A shard's files are written first, each atomically, and only then
is the shard listed in its process's index, so a killed job leaves no half shard and a re-run skips every
listed shard. Each process writes only its own index (rank r of W owns shards r, r + W, ...), so several
processes share a folder without a process group. A folder made by another job, whose fingerprint differs,
is refused rather than mixed into.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anchor_clip.data.tables import write_json


def check_fingerprint(stored: dict, expected: dict, out_dir: Path, what: str) -> None:
    """Refuse to resume a sharded job whose finished shards were made with other settings."""
    if stored != expected:
        changed = sorted(k for k in expected if stored.get(k) != expected[k])
        raise ValueError(
            f"{out_dir} holds {what} of a different job (differs in {changed}); resuming would mix "
            "them. Use another output directory, or delete this one to start over."
        )


def read_indexes(out_dir: Path) -> dict[Path, dict[str, Any]]:
    """Every process's index in `out_dir`, by file, in rank order.

    A single `index.json` listing `finished` shards, what pool embedding wrote before it shared this scheme,
    is read as rank 0's index, so folders embedded then still resume and load.
    """
    indexes = {path: json.loads(path.read_text()) for path in sorted(Path(out_dir).glob("index-*.json"))}
    legacy = Path(out_dir) / "index.json"
    if legacy.is_file():
        state = json.loads(legacy.read_text())
        if "finished" in state:
            indexes[legacy] = {"fingerprint": state["fingerprint"], "shards": {str(s): {} for s in state["finished"]}}
    return indexes


class ShardIndex:
    """One process's view of a sharded job's folder: which shards are done, and committing its own.

    Args:
        out_dir: the job's folder.
        fingerprint: JSON-able description of everything that decides the shards' content.
        what: what the shards hold, for messages ("embeddings", "captions").
        rank: this process's index; it writes `index-<rank>.json` only.
    """

    def __init__(self, out_dir: str | Path, fingerprint: dict[str, Any], what: str, rank: int = 0) -> None:
        self.out_dir, self.fingerprint, self.what = Path(out_dir), fingerprint, what
        self.file = self.out_dir / f"index-{rank:05d}.json"

    def finished(self) -> dict[int, dict[str, Any]]:
        """Shard -> its index entry, over all processes, after checking every index belongs to this job."""
        done = {}
        for path, state in read_indexes(self.out_dir).items():
            check_fingerprint(state["fingerprint"], self.fingerprint, self.out_dir, f"{self.what} ({path.name})")
            done.update({int(shard): entry for shard, entry in state["shards"].items()})
        return done

    def commit(self, shard: int, entry: dict[str, Any]) -> None:
        """List `shard` (whose files are already in place) in this process's index, atomically."""
        state = json.loads(self.file.read_text()) if self.file.exists() else {"fingerprint": self.fingerprint,
                                                                               "shards": {}}
        state["shards"][str(shard)] = entry
        write_json(state, self.file)

"""The anchor retrieval job: faiss search, per-template quota, dedupe, exclusion, resumable embedding, CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import anchor_clip.anchors.embed as embed_module
from anchor_clip.anchors.embed import embed_pool, load_pool_embeddings
from anchor_clip.anchors.index import brute_force_search, build_index, choose_factory
from anchor_clip.anchors.retrieve import HISTOGRAM_NAME, MANIFEST_NAME, REPORT_NAME, main, retrieval_report, retrieve
from anchor_clip.anchors.select import (
    class_quotas,
    modality_vectors,
    near_duplicate_filter,
    query_prompts,
    select_anchors,
)
from anchor_clip.data.tables import read_table

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
CLASSES = ["red square", "green square", "blue square"]
COLOURS = [(220, 30, 30), (30, 200, 60), (40, 60, 220)]
STYLES = ["photo", "sketch"]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _clustered(n: int, dim: int, n_centres: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors scattered around (n_centres, dim) unit centres, and the centres."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_centres, dim)))
    noise = rng.standard_normal((n, dim)) * spread / np.sqrt(dim)
    return _unit(centres[rng.integers(n_centres, size=n)] + noise), centres


def _png(label: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
    x, y = rng.integers(2, 20, size=2)
    pixels[y : y + 12, x : x + 12] = COLOURS[label]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _manifest_pool(root: Path, n: int) -> Path:
    """A labelled pair manifest with relative file paths: pair i shows class i % 3 in style (i // 3) % 2."""
    (root / "imgs").mkdir(parents=True)
    rows = []
    for i in range(n):
        label, style = i % 3, STYLES[(i // 3) % 2]
        (root / "imgs" / f"{i}.png").write_bytes(_png(label, seed=i))
        rows.append(
            {
                "filepath": f"imgs/{i}.png",
                "caption": f"a {style} of a {CLASSES[label]}.",
                "label": CLASSES[label],
                "style": style,
            }
        )
    pd.DataFrame(rows).to_csv(root / "pool.csv", index=False)
    return root / "pool.csv"


def _reference_selection(pool, queries, k, excluded=None, min_score=None) -> set[tuple[int, int, int]]:
    """Exhaustive greedy over every (pair, template of its best class) entry in descending score."""
    n_classes, n_templates, dim = queries.shape
    sims = pool @ queries.reshape(-1, dim).T  # (N, Q)
    best = sims.argmax(axis=1) // n_templates
    quotas = class_quotas(k, n_templates)
    entries = sorted(
        (-sims[i, best[i] * n_templates + t], i, t)
        for i in range(len(pool))
        for t in range(n_templates)
        if not (excluded is not None and excluded[i])
        and (min_score is None or sims[i, best[i] * n_templates + t] >= min_score)
    )
    taken, counts, chosen = set(), np.zeros((n_classes, n_templates), int), set()
    for _, i, t in entries:
        if i in taken or counts[best[i], t] >= quotas[t]:
            continue
        taken.add(i)
        counts[best[i], t] += 1
        chosen.add((i, int(best[i]), t))
    return chosen


def _as_set(table: pd.DataFrame) -> set[tuple[int, int, int]]:
    return set(zip(table["pool_index"], table["class_index"], table["template_index"], strict=True))


# --- index ------------------------------------------------------------------------------------------------


def test_flat_index_matches_brute_force_matmul_topk():
    rng = np.random.default_rng(0)
    pool, queries = _unit(rng.standard_normal((3000, 48))), _unit(rng.standard_normal((40, 48)))
    scores, ids = build_index(pool, factory="Flat").search(queries, 25)
    ref_scores, ref_ids = brute_force_search(pool, queries, 25, chunk_size=700)  # chunks exercise the merge
    sims = torch.from_numpy(queries) @ torch.from_numpy(pool).T
    top = sims.topk(25, dim=1)
    np.testing.assert_array_equal(ids, top.indices.numpy())
    np.testing.assert_allclose(scores, top.values.numpy(), atol=1e-5)
    np.testing.assert_array_equal(ref_ids, top.indices.numpy())
    np.testing.assert_allclose(ref_scores, top.values.numpy(), atol=1e-5)


def test_index_choice_follows_pool_size_and_user_factory_overrides():
    assert choose_factory(50_000, 512) == "Flat"
    assert choose_factory(1_000_000, 512) == "IVF4000,Flat"
    assert choose_factory(10_000_000, 512) == "IVF12649,PQ64"
    assert choose_factory(10_000_000, 768) == "IVF12649,PQ64"
    pool, _ = _clustered(2000, 16, 10, 1.0, seed=0)
    index = build_index(pool, factory="IVF8,Flat", nprobe=3)
    assert (index.factory, index.nprobe, index.ntotal) == ("IVF8,Flat", 3, 2000)


def test_ivf_index_reaches_recall_095_against_flat_on_clustered_pool():
    pool, centres = _clustered(20_000, 32, 200, 1.0, seed=1)
    queries = _unit(centres[:50] + np.random.default_rng(2).standard_normal((50, 32)) / np.sqrt(32))
    k, nlist = 50, int(round(4 * np.sqrt(len(pool))))
    _, exact = build_index(pool, factory="Flat").search(queries, k)
    ivf = build_index(pool, factory=f"IVF{nlist},Flat", nprobe=48)
    _, found = ivf.search(queries, k)
    recall = np.mean([len(np.intersect1d(f, e)) / k for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.95


def test_index_rejects_queries_of_another_dimension():
    index = build_index(_unit(np.random.default_rng(0).standard_normal((10, 8))))
    with pytest.raises(ValueError, match="dimension 4"):
        index.search(np.ones((2, 4), np.float32), 3)


# --- selection ------------------------------------------------------------------------------------------


def test_retriever_returns_exact_pair_for_its_own_embedding():
    pool = _unit(np.random.default_rng(0).standard_normal((500, 32)))
    owners = np.random.default_rng(1).choice(500, size=40, replace=False)
    queries = pool[owners][:, None, :]  # (40 classes, 1 template, 32): each class is one pair's embedding
    table = select_anchors(pool, queries, k=1).table
    np.testing.assert_array_equal(table["pool_index"], owners)
    np.testing.assert_allclose(table["score"], 1.0, atol=1e-5)


@pytest.mark.parametrize(("k", "n_templates"), [(7, 3), (12, 2), (1, 1)])
def test_selection_equals_exhaustive_greedy_over_every_pair(k, n_templates):
    pool, centres = _clustered(1500, 24, 12, 1.2, seed=k)
    rng = np.random.default_rng(0)
    queries = _unit(centres[:6, None, :] + 0.6 * rng.standard_normal((6, n_templates, 24)) / np.sqrt(24))
    selection = select_anchors(pool, queries, k, max_depth=len(pool))
    assert _as_set(selection.table) == _reference_selection(pool, queries, k)


def test_quota_splits_k_evenly_over_templates_and_dedupes_globally():
    np.testing.assert_array_equal(class_quotas(10, 4), [3, 3, 2, 2])
    pool, centres = _clustered(4000, 24, 4, 1.0, seed=3)
    queries = _unit(centres[:, None, :] + 0.5 * np.random.default_rng(4).standard_normal((4, 4, 24)) / np.sqrt(24))
    table = select_anchors(pool, queries, k=10).table
    counts = table.groupby(["class_index", "template_index"]).size().unstack()
    np.testing.assert_array_equal(counts.to_numpy(), np.tile([3, 3, 2, 2], (4, 1)))
    assert table["pool_index"].is_unique
    # Every pair went to its best class: the class of the prompt it scores highest against.
    best = (pool[table["pool_index"]] @ queries.reshape(16, 24).T).argmax(axis=1) // 4
    np.testing.assert_array_equal(best, table["class_index"])


def test_near_duplicates_of_eval_images_are_never_retrieved():
    pool, centres = _clustered(2000, 24, 5, 1.0, seed=5)
    queries = centres[:, None, :]  # (5, 1, 24)
    plain = select_anchors(pool, queries, k=8).table
    leaked = plain["pool_index"].to_numpy()[::2]
    rng = np.random.default_rng(6)
    eval_images = _unit(pool[leaked] + 0.01 * rng.standard_normal(pool[leaked].shape))  # cosine ~0.9999
    is_dup = near_duplicate_filter(pool, eval_images, threshold=0.95)
    filtered = select_anchors(pool, queries, k=8, exclude=is_dup)
    assert not set(leaked) & set(filtered.table["pool_index"])
    assert filtered.excluded >= len(leaked)
    assert (filtered.table.groupby("class_index").size() == 8).all()  # the quota is refilled from other pairs
    excluded_mask = np.zeros(len(pool), bool)
    excluded_mask[leaked] = True
    assert _as_set(select_anchors(pool, queries, k=8, exclude=is_dup, max_depth=2000).table) == _reference_selection(
        pool, queries, 8, excluded=excluded_mask
    )
    # A threshold above the eval images' similarity leaves the selection untouched.
    untouched = select_anchors(pool, queries, k=8, exclude=near_duplicate_filter(pool, eval_images, 0.99999))
    assert _as_set(untouched.table) == _as_set(plain)


def test_min_score_drops_weak_matches_and_leaves_classes_short():
    pool, centres = _clustered(1000, 24, 4, 1.5, seed=7)
    queries = centres[:, None, :]
    table = select_anchors(pool, queries, k=400, min_score=0.6, max_depth=1000).table
    assert (table["score"] >= 0.6).all()
    assert (table.groupby("class_index").size() < 400).all()
    assert _as_set(table) == _reference_selection(pool, queries, 400, min_score=0.6)


def test_both_modality_scores_are_the_mean_of_image_and_text_cosines():
    rng = np.random.default_rng(8)
    image, text, prompts = (_unit(rng.standard_normal(shape)) for shape in [(300, 16), (300, 16), (5, 1, 16)])
    pool, queries = modality_vectors(image, text, prompts, "both")
    table = select_anchors(pool, queries, k=3).table
    expected = (image @ prompts[:, 0].T + text @ prompts[:, 0].T) / 2  # (N, C)
    got = expected[table["pool_index"], table["class_index"]]
    np.testing.assert_allclose(table["score"], got, atol=1e-5)


def test_templates_without_class_placeholder_are_rejected():
    with pytest.raises(ValueError, match="placeholder"):
        query_prompts(["dog"], ["a photo of a dog."])
    assert query_prompts(["dog", "cat"], ["a {c}.", "the {c}!"]) == ["a dog.", "the dog!", "a cat.", "the cat!"]


def test_report_precision_counts_pool_labels_of_target_classes():
    anchors = pd.DataFrame(
        {
            "class": ["cat", "cat", "dog", "dog"],
            "query": ["a cat.", "the cat.", "a dog.", "the dog."],
            "score": [0.9, 0.8, 0.7, 0.6],
            "label": [0, 1, 2, 1],  # indexes the pool's classes: cat, dog, fox
            "style": ["photo", "sketch", "photo", "photo"],
        }
    )
    report = retrieval_report(
        anchors, ["cat", "dog"], ["a {c}.", "the {c}."], k=2, pool_classnames=["cat", "dog", "fox"]
    )
    assert report["precision"] == 0.75  # the fox is no target class
    assert report["class_precision"] == 0.5  # cat->cat and dog->dog; cat->dog and dog->fox miss
    assert report["style_mix"] == {"photo": 0.75, "sketch": 0.25}
    assert report["style_by_template"] == {"a {c}.": {"photo": 2}, "the {c}.": {"sketch": 1, "photo": 1}}
    assert report["score"]["max"] == pytest.approx(0.9) and report["per_template_counts"] == {
        "a {c}.": 2,
        "the {c}.": 2,
    }
    unnamed = retrieval_report(anchors, ["cat", "dog"], ["a {c}.", "the {c}."], k=2)
    assert unnamed["precision"] is None and "pool_classnames" in unnamed["precision_note"]


# --- embedding and the job -------------------------------------------------------------------------------


def _write_shard(path: Path, start: int, n: int) -> dict[str, bytes]:
    """An img2dataset-style tar: {key}.png|jpg, {key}.txt, {key}.json; returns key -> image bytes."""
    images = {}
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key, label, style = f"{i:09d}", i % 3, STYLES[i % 2]
            ext, data = ("jpg", _png(label, i, "JPEG")) if i % 4 == 0 else ("png", _png(label, i))
            meta = json.dumps({"key": key, "label": CLASSES[label], "style": style, "url": f"http://x/{i}"})
            for name, payload in [
                (f"{key}.{ext}", data),
                (f"{key}.txt", f"a {style} of a {CLASSES[label]}.".encode()),
                (f"{key}.json", meta.encode()),
            ]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            images[key] = data
    return images


def test_webdataset_shards_are_embedded_and_retrieved_to_real_files(tmp_path):
    (tmp_path / "shards").mkdir()
    images = {
        **_write_shard(tmp_path / "shards" / "00000.tar", 0, 6),
        **_write_shard(tmp_path / "shards" / "00001.tar", 6, 6),
    }
    torch.manual_seed(0)
    out = tmp_path / "anchors"
    anchors = retrieve(
        pool=str(tmp_path / "shards" / "*.tar"),
        classnames=CLASSES,
        out_dir=str(out),
        backbone="open_clip",
        backbone_config=TINY,
        templates=("a photo of a {c}.", "a sketch of a {c}."),
        k=2,
        modality="text",  # captions equal to a prompt make the random text tower's best class the true one
        batch_size=4,
        num_workers=2,  # workers seek into the tars themselves
    )
    manifest = read_table(out / MANIFEST_NAME)
    assert len(manifest) == len(anchors) == 6
    assert list(manifest.columns[:6]) == ["filepath", "caption", "image_id", "class", "score", "query"]
    for row in manifest.itertuples():
        assert (out / row.filepath).read_bytes() == images[row.image_id]  # extracted byte for byte
        i = int(row.image_id)
        assert row.caption == f"a {STYLES[i % 2]} of a {CLASSES[i % 3]}." and row.style == STYLES[i % 2]
    embeddings = load_pool_embeddings(out / "pool_embeddings")
    assert embeddings.image.shape == embeddings.text.shape == (12, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings.image, axis=1), 1.0, atol=1e-5)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["size"] == 6 and report["pool"]["kind"] == "webdataset"
    assert report["precision"] == report["class_precision"] == 1.0
    assert report["style_mix"] == {"photo": 0.5, "sketch": 0.5}  # one pair per (class, style template)
    assert report["style_by_template"] == {"a photo of a {c}.": {"photo": 3}, "a sketch of a {c}.": {"sketch": 3}}
    assert (out / HISTOGRAM_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_embedding_resumes_to_the_same_embeddings_and_manifest(tmp_path, monkeypatch):
    pool = _manifest_pool(tmp_path / "pool", 12)
    job = dict(pool=str(pool), classnames=CLASSES, backbone="open_clip", backbone_config=TINY, k=2,
               templates=("a photo of a {c}.",), batch_size=3, num_workers=0, shard_size=4)  # fmt: skip
    torch.manual_seed(0)
    retrieve(out_dir=str(tmp_path / "straight"), **job)

    real_save = embed_module._save_npy

    def dies_inside_shard_1(path, array):
        if path.name == "text_00001.npy":  # image_00001.npy is already on disk: a half-written shard
            raise KeyboardInterrupt("killed")
        real_save(path, array)

    monkeypatch.setattr(embed_module, "_save_npy", dies_inside_shard_1)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        retrieve(out_dir=str(tmp_path / "killed"), **job)
    shards = tmp_path / "killed" / "pool_embeddings"
    assert list(json.loads((shards / "index-00000.json").read_text())["shards"]) == ["0"]
    assert (shards / "image_00001.npy").exists() and not (shards / "text_00001.npy").exists()
    with pytest.raises(ValueError, match="not embedded yet"):
        load_pool_embeddings(shards)

    written = []
    monkeypatch.setattr(
        embed_module, "_save_npy", lambda path, array: (written.append(path.name), real_save(path, array))
    )
    torch.manual_seed(0)
    retrieve(out_dir=str(tmp_path / "killed"), **job)
    assert sorted(written) == ["image_00001.npy", "image_00002.npy", "text_00001.npy", "text_00002.npy"]
    straight, resumed = load_pool_embeddings(tmp_path / "straight" / "pool_embeddings"), load_pool_embeddings(shards)
    np.testing.assert_array_equal(straight.image, resumed.image)
    np.testing.assert_array_equal(straight.text, resumed.text)
    pd.testing.assert_frame_equal(
        read_table(tmp_path / "straight" / MANIFEST_NAME), read_table(tmp_path / "killed" / MANIFEST_NAME)
    )


def test_resuming_with_another_backbone_is_refused(tmp_path):
    pool = _manifest_pool(tmp_path / "pool", 3)
    embed_pool(str(pool), tmp_path / "emb", "open_clip", config=TINY, num_workers=0)
    other = {**TINY, "embed_dim": 16}
    with pytest.raises(ValueError, match="different job"):
        embed_pool(str(pool), tmp_path / "emb", "open_clip", config=other, num_workers=0)


def test_pool_manifest_without_caption_column_is_rejected(tmp_path):
    pd.DataFrame({"filepath": ["a.png"], "text": ["x"]}).to_csv(tmp_path / "pool.csv", index=False)
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption'\]"):
        embed_pool(str(tmp_path / "pool.csv"), tmp_path / "emb", "open_clip", config=TINY)


def test_pool_manifest_naming_a_missing_image_is_rejected_before_embedding(tmp_path):
    pd.DataFrame({"filepath": ["gone.png"], "caption": ["x"]}).to_csv(tmp_path / "pool.csv", index=False)
    with pytest.raises(ValueError, match="gone.png"):
        embed_pool(str(tmp_path / "pool.csv"), tmp_path / "emb", "open_clip", config=TINY, num_workers=0)


def test_cli_end_to_end_with_tiny_open_clip(tmp_path):
    pool = _manifest_pool(tmp_path / "pool", 12)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    # The evaluation set holds two of the pool's own image files: those pairs must not be retrieved.
    pd.DataFrame({"filepath": ["pool/imgs/0.png", "pool/imgs/4.png"], "label": [0, 1]}).to_csv(
        tmp_path / "eval.csv", index=False
    )
    torch.manual_seed(0)
    out = tmp_path / "out"
    main(
        [
            f"--pool={pool}",
            f"--classnames={tmp_path / 'classes.txt'}",
            f"--out_dir={out}",
            "--backbone=open_clip",
            f"--backbone_config={json.dumps(TINY)}",
            '--templates=["a photo of a {c}.", "a sketch of a {c}."]',
            "--k=2",
            "--modality=text",
            f"--exclude_manifests=[{tmp_path / 'eval.csv'}]",
            "--exclude_threshold=0.99999",
            "--index_factory=Flat",
            "--batch_size=5",
            "--num_workers=0",
            "--device=cpu",
        ]
    )
    manifest = read_table(out / MANIFEST_NAME)
    assert len(manifest) == 6 and manifest["image_id"].is_unique
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in manifest["filepath"])
    leaked = {str((tmp_path / "pool" / "imgs" / f).resolve()) for f in ("0.png", "4.png")}
    assert not leaked & set(manifest["filepath"])
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["excluded_near_duplicates"] >= 2
    assert report["per_class_counts"] == {c: 2 for c in CLASSES}
    assert report["index"]["factory"] == "Flat" and report["config"]["modality"] == "text"
    assert report["class_precision"] == report["precision"] == 1.0


def test_an_exclusion_manifest_without_filepaths_is_named_before_any_work(tmp_path):
    pool = _manifest_pool(tmp_path / "pool", 4)
    pd.DataFrame({"path": ["pool/imgs/0.png"], "label": [0]}).to_csv(tmp_path / "eval.csv", index=False)
    with pytest.raises(ValueError, match=r"retrieve.exclude_manifests: .*eval.csv has no column\(s\) \['filepath'\]"):
        retrieve(pool, CLASSES, str(tmp_path / "out"), backbone="open_clip", backbone_config=TINY,
                 exclude_manifests=[str(tmp_path / "eval.csv")], device="cpu")
    assert not (tmp_path / "out").exists()


def test_module_entry_point_prints_help():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "anchor_clip.retrieve", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--pool", "--classnames", "--k", "--modality", "--index_factory", "--nprobe", "--exclude_manifests"):
        assert flag in result.stdout


def test_pool_embeddings_from_the_single_index_layout_still_load(tmp_path):
    from anchor_clip.anchors.shards import ShardIndex

    fingerprint = {"kind": "manifest", "n_shards": 1, "backbone": "b"}
    (tmp_path / "index.json").write_text(json.dumps({"fingerprint": fingerprint, "finished": [0]}))
    assert list(ShardIndex(tmp_path, fingerprint, "embeddings").finished()) == [0]

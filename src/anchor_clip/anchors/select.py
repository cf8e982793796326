"""Which pool pairs become a class's anchors: per-template quotas, global dedupe, eval near-duplicate exclusion.

Pure array logic over precomputed embeddings (no models, no files), so `anchors.retrieve` and tests share it;
the rules are described in that module's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from anchor_clip.anchors.index import CosineIndex, build_index, normalize

Modality = Literal["image", "text", "both"]


def query_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """(C * T,) prompts, class-major: prompt c * T + t is template t filled with class c."""
    if not templates:
        raise ValueError("need at least one query template, e.g. 'a photo of a {c}.'")
    for template in templates:
        try:
            filled = template.format(c="x")
        except (KeyError, IndexError) as err:
            raise ValueError(f"template {template!r} may only contain the placeholder {{c}} ({err})") from err
        if filled == template:
            raise ValueError(f"template {template!r} has no '{{c}}' placeholder for the class name")
    prompts = [template.format(c=name) for name in classnames for template in templates]
    if len(set(prompts)) != len(prompts):
        raise ValueError("templates x class names give duplicate prompts; make the templates (and names) distinct")
    return prompts


def template_of(anchors: pd.DataFrame, classnames: Sequence[str], templates: Sequence[str]) -> pd.Series:
    """The template each anchor's `query` was filled from."""
    prompts = query_prompts(classnames, templates)
    return anchors["query"].map(dict(zip(prompts, list(templates) * len(classnames), strict=True)))


def class_quotas(k: int, n_templates: int) -> np.ndarray:
    """Split a class's k anchors evenly over its templates; the first k % T templates get one more.

    Returns:
        (T,) int quotas summing to k.
    """
    if k <= 0:
        raise ValueError(f"k (anchors per class) must be positive, got {k}")
    return k // n_templates + (np.arange(n_templates) < k % n_templates).astype(int)


def modality_vectors(
    image: np.ndarray, text: np.ndarray, queries: np.ndarray, modality: Modality
) -> tuple[np.ndarray, np.ndarray]:
    """Pool and query vectors whose inner product is the retrieval score of `modality`.

    For "both", pool rows are [image, text] / sqrt(2) and queries [q, q] / sqrt(2): both have unit norm
    and their inner product is (q.image + q.text) / 2, the mean of the two cosines, so one exact index
    serves the combined score.

    Args:
        image, text: (N, D) normalized pool features. queries: (..., D) normalized prompt features.

    Returns:
        pool: (N, D') and queries: (..., D'), with D' = 2D for "both".
    """
    if modality == "image":
        return image, queries
    if modality == "text":
        return text, queries
    if modality == "both":
        scale = np.float32(1 / math.sqrt(2))
        return np.concatenate([image, text], axis=1) * scale, np.concatenate([queries, queries], axis=-1) * scale
    raise ValueError(f"query modality must be 'image', 'text' or 'both', got {modality!r}")


def near_duplicate_filter(
    pool_image: np.ndarray, eval_image: np.ndarray, threshold: float
) -> Callable[[np.ndarray], np.ndarray]:
    """A predicate marking pool rows whose image has cosine >= `threshold` with some evaluation image.

    Only candidate rows are ever tested, so the (N, E) similarity matrix is never formed.

    Args:
        pool_image: (N, D) normalized pool image features.
        eval_image: (E, D) normalized evaluation image features.
        threshold: cosine at or above which two images count as the same picture.

    Returns:
        f(ids: (M,) pool rows) -> (M,) bool, True = exclude.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"exclusion threshold is a cosine similarity in [-1, 1], got {threshold}")
    eval_index = build_index(eval_image)

    def is_near_duplicate(ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0, dtype=bool)
        scores, _ = eval_index.search(pool_image[ids], 1)
        return scores[:, 0] >= threshold

    return is_near_duplicate


@dataclass
class Selection:
    """Pairs chosen by `select_anchors`.

    Attributes:
        table: one row per selected pair: `pool_index, class_index, template_index, score`, sorted by
            class, template, then descending score.
        excluded: candidate pairs dropped as near-duplicates of evaluation images.
        depth: neighbours per query searched in the last round.
    """

    table: pd.DataFrame
    excluded: int
    depth: int


def select_anchors(
    pool: np.ndarray,
    queries: np.ndarray,
    k: int,
    index: CosineIndex | None = None,
    exclude: Callable[[np.ndarray], np.ndarray] | None = None,
    min_score: float | None = None,
    max_depth: int | None = None,
    chunk_size: int = 8192,
) -> Selection:
    """Per class, the k best pool pairs under the per-template quota, dedupe and exclusion rules.

    The result equals a greedy pass over *every* (pair, template-of-its-best-class) entry in descending
    score, skipping excluded pairs, pairs already taken, full templates and scores below `min_score`.
    Only searched candidates are scored exactly: an entry below the k'-th neighbour score of its query
    can change the outcome only if that query's quota is still open, so the search depth doubles until
    every open quota is closed (pool or `min_score` exhausted) or `max_depth` is reached.

    Args:
        pool: (N, D) normalized pool vectors (see `modality_vectors`).
        queries: (C, T, D) normalized prompt vectors, class c with template t.
        k: anchors per class.
        index: a search index over `pool`; None builds one sized to the pool.
        exclude: f(pool ids) -> bool mask of pairs that must never be selected.
        min_score: lowest score a selected pair may have.
        max_depth: cap on neighbours searched per query; None means 16 x the largest template quota.
            A class whose pairs mostly belong to other classes may end up short of k.
        chunk_size: candidates scored against all queries at once (bounds the (chunk, C*T) block).

    Returns:
        The selection.
    """
    pool = normalize(pool)
    if queries.ndim != 3:
        raise ValueError(f"queries must be (classes, templates, dim), got shape {queries.shape}")
    n_classes, n_templates, dim = queries.shape
    flat_queries = normalize(queries.reshape(n_classes * n_templates, dim))  # (Q, D), class-major
    quotas = np.tile(class_quotas(k, n_templates), n_classes)  # (Q,) quota of each query
    if index is None:
        index = build_index(pool)
    if index.ntotal != len(pool) or index.dim != pool.shape[1]:
        raise ValueError(f"index holds {index.ntotal} x {index.dim} vectors but the pool is {pool.shape}")
    n = len(pool)
    max_depth = min(n, max_depth or 16 * int(quotas.max()))
    depth = min(max_depth, max(2 * int(quotas.max()), 16))

    ids_seen = np.zeros(0, dtype=np.int64)  # candidates scored so far, with their cached results:
    best_class = np.zeros(0, dtype=np.int64)  # (M,) class of the best-matching prompt
    class_scores = np.zeros((0, n_templates), dtype=np.float32)  # (M, T) scores vs that class's prompts
    excluded = np.zeros(0, dtype=bool)  # (M,)
    while True:
        scores, ids = index.search(flat_queries, depth)  # (Q, depth)
        # A query whose list reached the pool's end (or an IVF list that came back short) has seen every
        # pair it can reach: nothing below its floor is left unseen.
        complete = (ids < 0).any(axis=1) | (depth >= n)
        floor = np.where(complete, -np.inf, scores[:, -1])  # (Q,)
        new = np.setdiff1d(ids[ids >= 0], ids_seen)
        new_best, new_scores = _score_candidates(pool[new], flat_queries, n_templates, chunk_size)
        ids_seen = np.concatenate([ids_seen, new])
        best_class = np.concatenate([best_class, new_best])
        class_scores = np.concatenate([class_scores, new_scores])
        excluded = np.concatenate([excluded, exclude(new) if exclude is not None else np.zeros(len(new), bool)])

        table, counts = _greedy(ids_seen, best_class, class_scores, excluded, floor, quotas, k, min_score)
        still_open = (counts < quotas) & np.isfinite(floor)
        if min_score is not None:
            still_open &= floor >= min_score
        if not still_open.any() or depth >= max_depth:
            return Selection(table=table, excluded=int(excluded.sum()), depth=depth)
        depth = min(max_depth, 2 * depth)


def _score_candidates(
    candidates: np.ndarray, queries: np.ndarray, n_templates: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best class of each candidate and its exact scores against that class's T prompts.

    Args:
        candidates: (M, D); queries: (Q, D) class-major with T templates per class.

    Returns:
        best: (M,) class index; scores: (M, T).
    """
    best = np.zeros(len(candidates), dtype=np.int64)
    scores = np.zeros((len(candidates), n_templates), dtype=np.float32)
    for start in range(0, len(candidates), chunk_size):
        sims = candidates[start : start + chunk_size] @ queries.T  # (m, Q)
        cls = sims.argmax(axis=1) // n_templates
        per_class = sims.reshape(len(sims), -1, n_templates)  # (m, C, T)
        best[start : start + len(sims)] = cls
        scores[start : start + len(sims)] = per_class[np.arange(len(sims)), cls]
    return best, scores


def _greedy(
    ids: np.ndarray,
    best_class: np.ndarray,
    class_scores: np.ndarray,
    excluded: np.ndarray,
    floor: np.ndarray,
    quotas: np.ndarray,
    k: int,
    min_score: float | None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Greedy assignment of candidates to (class, template) slots in descending score.

    Returns:
        The selection table and (Q,) pairs taken per slot.
    """
    n_templates = class_scores.shape[1]
    item = np.repeat(np.arange(len(ids)), n_templates)  # one entry per (candidate, template)
    template = np.tile(np.arange(n_templates), len(ids))
    slot = best_class[item] * n_templates + template
    score = class_scores.ravel()
    keep = ~excluded[item] & (score >= floor[slot])
    if min_score is not None:
        keep &= score >= min_score
    item, slot, score = item[keep], slot[keep], score[keep]
    # A slot fills after at most k of its entries (its quota, plus entries whose pair went to another
    # template of the same class, at most k - quota of them), so deeper entries can be dropped first.
    by_slot = np.lexsort((ids[item], -score, slot))
    slot_sorted = slot[by_slot]
    rank = np.arange(len(by_slot)) - np.searchsorted(slot_sorted, slot_sorted, side="left")
    top = by_slot[rank < k]
    order = top[np.lexsort((ids[item[top]], -score[top]))]  # descending score, ties by pool row

    # Plain lists: this loop runs over up to C * T * k entries, and numpy scalar indexing is slow.
    taken, counts, room = [False] * len(ids), [0] * len(quotas), quotas.tolist()
    chosen = []
    for entry, pos, sl in zip(order.tolist(), item[order].tolist(), slot[order].tolist(), strict=True):
        if taken[pos] or counts[sl] >= room[sl]:
            continue
        taken[pos] = True
        counts[sl] += 1
        chosen.append(entry)
    chosen = np.asarray(chosen, dtype=np.int64)
    table = pd.DataFrame(
        {
            "pool_index": ids[item[chosen]],
            "class_index": slot[chosen] // n_templates,
            "template_index": slot[chosen] % n_templates,
            "score": score[chosen],
        }
    )
    table = table.sort_values(["class_index", "template_index", "score"], ascending=[True, True, False])
    return table.reset_index(drop=True), np.asarray(counts)


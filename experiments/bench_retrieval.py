"""Query time and recall of the retrieval indexes on a synthetic clustered pool.

Compares, for Q class queries x top-k over an (N, D) pool of normalized float32 vectors:
brute-force torch matmul + topk (chunked over the pool), exact faiss IndexFlatIP, and the IVF index
`anchor_clip.anchors.index.build_index` picks for the pool size (train + add timed apart from queries),
swept over nprobe. Recall@k is measured against the exact top-k.

The pool is clustered because real CLIP embeddings are (and IVF relies on it): a few broad "domains",
many "concepts" inside each with long-tailed sizes, and points scattered around their concept; queries
sit near random concepts the way a class prompt sits near its images.

    PYTHONPATH=src python experiments/bench_retrieval.py                    # 1,000,000 x 512
    PYTHONPATH=src python experiments/bench_retrieval.py --pool-size 200000 # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial

import faiss
import numpy as np
import torch

from anchor_clip.anchors.index import brute_force_search, build_index, choose_factory


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_pool(
    n: int, dim: int, n_queries: int, seed: int, points_per_concept: int = 100, spread: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """A clustered pool and queries near its concepts.

    Args:
        n: pool size; dim: vector size; n_queries: number of queries.
        points_per_concept: mean concept size (sizes are long-tailed, lognormal weights).
        spread: noise norm around a concept centre (1.0 gives cosine ~0.7 to the centre, ~0.5 between
            two points of a concept, the range CLIP image-image similarities of one class fall in).

    Returns:
        pool: (n, dim) float32 normalized; queries: (n_queries, dim) float32 normalized.
    """
    rng = np.random.default_rng(seed)
    n_domains, n_concepts = 64, max(1, n // points_per_concept)
    domains = _unit(rng.standard_normal((n_domains, dim), dtype=np.float32))
    # Concepts of a domain share a direction, so neighbouring cells compete as they do in real data.
    concepts = _unit(
        domains[rng.integers(n_domains, size=n_concepts)]
        + rng.standard_normal((n_concepts, dim), dtype=np.float32) * (spread / math.sqrt(dim))
    )
    weights = rng.lognormal(sigma=1.0, size=n_concepts)
    assignment = rng.choice(n_concepts, size=n, p=weights / weights.sum())
    pool = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # chunked: the noise block would otherwise double peak memory
        rows = assignment[start : start + 100_000]
        noise = rng.standard_normal((len(rows), dim), dtype=np.float32) * (spread / math.sqrt(dim))
        pool[start : start + len(rows)] = _unit(concepts[rows] + noise)
    picked = concepts[rng.integers(n_concepts, size=n_queries)]
    queries = _unit(picked + rng.standard_normal(picked.shape, dtype=np.float32) * (spread / math.sqrt(dim)))
    return pool, queries.astype(np.float32)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k ids that the approximate search also returned, over all queries."""
    hits = sum(len(np.intersect1d(f[f >= 0], e)) for f, e in zip(found, exact, strict=True))
    return hits / exact.size


def timed(fn, repeats: int = 1):
    """(result of the last call, best wall time over `repeats`)."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--factory", default=None, help="faiss factory for the IVF index (default: by pool size)")
    parser.add_argument("--repeats", type=int, default=2, help="query timings keep the best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None, help="append the numbers as one JSON line to this file")
    args = parser.parse_args()

    print(
        f"pool {args.pool_size:,} x {args.dim} float32 ({args.pool_size * args.dim * 4 / 2**30:.2f} GiB), "
        f"{args.queries:,} queries, k={args.k}; torch threads={torch.get_num_threads()}, "
        f"faiss threads={faiss.omp_get_max_threads()}, cpus={os.cpu_count()}"
    )
    (pool, queries), gen_s = timed(lambda: clustered_pool(args.pool_size, args.dim, args.queries, args.seed))
    print(f"generated clustered pool in {gen_s:.1f}s")

    (exact_scores, exact_ids), brute_s = timed(lambda: brute_force_search(pool, queries, args.k), args.repeats)
    print(f"brute force torch matmul+topk : query {brute_s:8.3f}s")

    flat, flat_build_s = timed(lambda: build_index(pool, factory="Flat", use_gpu=False))
    (flat_scores, flat_ids), flat_s = timed(partial(flat.search, queries, args.k), args.repeats)
    flat_agree = float((flat_ids == exact_ids).mean())
    print(
        f"faiss Flat                    : query {flat_s:8.3f}s  (add {flat_build_s:.1f}s)  "
        f"ids equal to brute force: {flat_agree:.4f}, max |score diff| {np.abs(flat_scores - exact_scores).max():.1e}"
    )
    del flat

    factory = args.factory or choose_factory(args.pool_size, args.dim)
    ivf, ivf_build_s = timed(lambda: build_index(pool, factory=factory, use_gpu=False, seed=args.seed))
    print(f"faiss {factory:<24}: train+add {ivf_build_s:.1f}s (default nprobe {ivf.nprobe})")
    sweep = []
    for nprobe in args.nprobe:
        faiss.ParameterSpace().set_index_parameter(ivf.index, "nprobe", nprobe)
        (_, ivf_ids), ivf_s = timed(partial(ivf.search, queries, args.k), args.repeats)
        recall = recall_at_k(ivf_ids, exact_ids)
        sweep.append({"nprobe": nprobe, "query_s": ivf_s, "recall": recall})
        print(
            f"  nprobe {nprobe:4d}: query {ivf_s:8.3f}s  recall@{args.k} {recall:.4f}  "
            f"brute/IVF {brute_s / ivf_s:6.1f}x  Flat/IVF {flat_s / ivf_s:6.1f}x"
        )

    good = [row for row in sweep if row["recall"] >= 0.95]
    best = min(good, key=lambda row: row["query_s"]) if good else max(sweep, key=lambda row: row["recall"])
    speedup = brute_s / best["query_s"]
    verdict = "met" if speedup >= 20 and best["recall"] >= 0.95 else "NOT met"
    print(
        f"\nsummary: brute/Flat {brute_s / flat_s:.2f}x; fastest IVF with recall >= 0.95 is nprobe {best['nprobe']}: "
        f"brute/IVF {speedup:.1f}x at recall@{args.k} {best['recall']:.4f} (target >= 20x at >= 0.95: {verdict})"
    )
    if args.results:
        record = {
            "config": vars(args),
            "factory": factory,
            "brute_s": brute_s,
            "flat_s": flat_s,
            "ivf_train_add_s": ivf_build_s,
            "ivf_sweep": sweep,
        }
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

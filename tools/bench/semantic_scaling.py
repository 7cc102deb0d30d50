"""How semantic_dedup's decide scales: seconds and candidate pairs on N and 10 N synthetic
embeddings, next to an all-pairs cosine matrix at the smallest size.

Rows are random unit vectors (`--dim`, float16 as the CLIP stage stores them) plus planted
near-duplicate groups (a seed and 1-3 copies at cosine ~0.97-0.99 to it). Unrelated random
vectors in 256 dimensions sit near cosine 0 (a pair above 0.95 by chance: never), so the planted
copies are the only pairs above the threshold and the expected drop count is known and checked.
The rows are written as parquet partitions and read the way the runner reads a global stage's
input; `SemanticDedup.decide` runs on a LocalCluster of `--workers` single-threaded processes
with the task-based shuffle, and its decisions are counted on the cluster.

    python -m tools.bench.semantic_scaling [--sizes 10000 100000] [--workers 2] [--dim 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.distributed import Client, LocalCluster

from curate.engine.cluster import WORKER_CONFIG
from curate.engine.driver import read_live
from curate.stages.semantic_dedup import SemanticDedup

ROWS_PER_PARTITION = 10_000


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic(n: int, dim: int, seed: int = 0, planted_fraction: float = 0.1) -> tuple[np.ndarray, int]:
    """(n x dim float16 unit vectors, the drops a correct dedup at 0.95 makes)."""
    rng = np.random.default_rng(seed)
    vectors = _unit(rng.standard_normal((n, dim)).astype(np.float32))
    planted, expected, i = int(n * planted_fraction), 0, 0
    while i < planted:
        copies = int(rng.integers(1, 4))
        for j in range(i + 1, min(i + 1 + copies, n)):
            noise = _unit(rng.standard_normal(dim).astype(np.float32))
            vectors[j] = _unit(vectors[i] + rng.uniform(0.1, 0.2) * noise)  # cosine ~0.98-0.995
            expected += 1
        i += copies + 1
    return vectors[rng.permutation(n)].astype(np.float16), expected


def write_partitions(vectors: np.ndarray, root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for p, start in enumerate(range(0, len(vectors), ROWS_PER_PARTITION)):
        chunk = vectors[start : start + ROWS_PER_PARTITION]
        dim = chunk.shape[1]
        emb = pa.ListArray.from_arrays(pa.array(np.arange(0, (len(chunk) + 1) * dim, dim, dtype=np.int32)),
                                       pa.array(chunk.reshape(-1), pa.float16()))
        table = pa.table({
            "id": [f"bench:{start + k:09d}" for k in range(len(chunk))],
            "_partition": pa.array(np.full(len(chunk), p, dtype=np.int32)),
            "drop_reason": pa.nulls(len(chunk), pa.string()),
            "clip_embedding": emb,
            "clip_score": pa.array(np.random.default_rng(p).uniform(0.1, 0.4, len(chunk)).astype(np.float32)),
        })
        path = root / f"{p:05d}.parquet"
        pq.write_table(table, path)
        files.append(str(path))
    return files


def all_pairs_seconds(vectors: np.ndarray, threshold: float, block: int = 2048) -> tuple[float, int]:
    """The brute force: a cosine matrix in row blocks; (seconds, pairs at or above threshold)."""
    v = _unit(vectors.astype(np.float32))
    start, found = time.perf_counter(), 0
    for a in range(0, len(v), block):
        sims = v[a : a + block] @ v.T
        found += int((sims >= threshold).sum()) - min(block, len(v) - a)
    return time.perf_counter() - start, found // 2


def run(sizes: list[int], workers: int, dim: int, threshold: float) -> list[dict[str, Any]]:
    stage = SemanticDedup(SemanticDedup.Config(threshold=threshold))
    with dask.config.set(WORKER_CONFIG):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
    client = Client(cluster)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in sizes:
                vectors, expected = synthetic(n, dim)
                files = write_partitions(vectors, Path(tmp) / f"n{n}")
                with dask.config.set({"dataframe.shuffle.method": "tasks"}):
                    t0 = time.perf_counter()
                    dropped = int(stage.decide(read_live(files, stage.columns)).shape[0].compute())
                    seconds = time.perf_counter() - t0
                assert dropped == expected, f"n={n}: {dropped} drops, expected {expected}"
                row = {"rows": n, "seconds": seconds, "dropped": dropped, **stage.summary()}
                if n == min(sizes):
                    row["all_pairs_seconds"], pairs = all_pairs_seconds(vectors, threshold)
                    assert pairs == stage.summary()["verified_pairs"]
                rows.append(row)
    finally:
        client.close()
        cluster.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args(argv)
    rows = run(args.sizes, args.workers, args.dim, args.threshold)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.workers} workers; dim {args.dim}; threshold {args.threshold}")
    print("| rows | seconds | candidate pairs | verified pairs | dropped | all-pairs matrix (numpy) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        brute = f"{r['all_pairs_seconds']:.1f} s" if "all_pairs_seconds" in r else ""
        print(f"| {r['rows']:,} | {r['seconds']:.1f} | {r['candidate_pairs']:,} | {r['verified_pairs']:,} | "
              f"{r['dropped']:,} | {brute} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"{b['rows'] / a['rows']:.0f}x the rows: {b['seconds'] / a['seconds']:.1f}x the time, "
              f"{b['candidate_pairs'] / max(1, a['candidate_pairs']):.1f}x the candidates")
    return 0


if __name__ == "__main__":
    sys.exit(main())

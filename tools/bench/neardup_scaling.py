"""How near_dedup's decide scales: seconds and candidate pairs on N and 10 N synthetic hashes.

The rows are random 64-bit hashes plus planted near-duplicate groups (a seed and 1-4 copies with
up to `max_distance` of its bits flipped each), written as parquet partitions and read the way
the runner reads a global stage's input. `NearDedup.decide` runs on a LocalCluster of `--workers`
single-threaded processes with the task-based shuffle (as `curate.engine.driver.decide_global` does),
and its decisions are counted on the cluster. The planted groups are the only pairs within the
distance (unrelated random hashes are ~32 bits apart; the chance of two within 4 bits is ~1e-14
a pair), so the expected drop count is known and checked. For reference, a brute-force all-pairs
numpy comparison (XOR + popcount, in row blocks) runs at the smallest size.

    python -m tools.bench.neardup_scaling [--sizes 10000 100000] [--workers 2] [--bands N]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from dask.distributed import Client, LocalCluster

from curate.engine.cluster import WORKER_CONFIG
from curate.engine.near_groups import hamming_distance
from curate.stages.near_dedup import NearDedup

ROWS_PER_PARTITION = 10_000


def synthetic(n: int, max_distance: int, seed: int = 0, planted_fraction: float = 0.1) -> tuple[pd.DataFrame, int]:
    """`n` rows (`id`, `_partition`, `image_phash`) and the number of drops a correct near
    dedup makes (planted rows beyond the first of each group)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n, dtype=np.int64, endpoint=True)
    planted, expected, i = int(n * planted_fraction), 0, 0
    while i < planted:
        copies = int(rng.integers(1, 5))
        seed_hash = hashes[i].view(np.uint64)
        for j in range(i + 1, min(i + 1 + copies, n)):
            flips = rng.choice(64, size=int(rng.integers(0, max_distance + 1)), replace=False)
            mask = np.uint64(sum(1 << int(b) for b in flips))
            hashes[j] = (seed_hash ^ mask).view(np.int64)
            expected += 1
        i += copies + 1
    order = rng.permutation(n)  # planted copies spread over partitions
    frame = pd.DataFrame({
        "id": [f"bench:{k:09d}" for k in range(n)],
        "_partition": (np.arange(n) // ROWS_PER_PARTITION).astype(np.int32),
        "image_phash": hashes[order],
    })
    return frame, expected


def brute_force_pairs(hashes: np.ndarray, max_distance: int, block: int = 512) -> int:
    """Pairs within `max_distance` bits, by comparing every pair (numpy, blocks of rows)."""
    found = 0
    for start in range(0, len(hashes), block):
        d = hamming_distance(hashes[start : start + block, None], hashes[None, :])
        rows = np.arange(start, min(start + block, len(hashes)))[:, None]
        found += int(((d <= max_distance) & (np.arange(len(hashes))[None, :] > rows)).sum())
    return found


def run(sizes: list[int], workers: int, bands: int | None, max_distance: int) -> dict[str, Any]:
    stage = NearDedup(NearDedup.Config(max_distance=max_distance, bands=bands))
    with dask.config.set(WORKER_CONFIG):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
    client = Client(cluster)
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, {platform.python_implementation()} "
                   f"{platform.python_version()}, dask {dask.__version__}",
        "settings": {"workers": workers, "max_distance": max_distance, "bands": stage.config.block_count,
                     "band_keys": None, "rows_per_partition": ROWS_PER_PARTITION},
        "sizes": {},
    }
    try:
        with tempfile.TemporaryDirectory() as tmp, dask.config.set({"dataframe.shuffle.method": "tasks"}):
            for n in sizes:
                frame, expected = synthetic(n, max_distance)
                folder = Path(tmp) / f"n{n}"
                folder.mkdir()
                for p, part in frame.groupby("_partition"):
                    part.to_parquet(folder / f"{p:05d}.parquet", index=False)
                live = dd.read_parquet(str(folder), split_row_groups=False)
                start = time.perf_counter()
                dropped = int(stage.decide(live).shape[0].compute())
                seconds = time.perf_counter() - start
                summary = stage.summary()
                results["settings"]["band_keys"] = summary["band_keys"]
                results["sizes"][n] = {"seconds": round(seconds, 2), "candidate_pairs": summary["candidate_pairs"],
                                       "verified_pairs": summary["verified_pairs"], "dropped": dropped,
                                       "expected_dropped": expected, "correct": dropped == expected}
            small = min(sizes)
            frame, _ = synthetic(small, max_distance)
            start = time.perf_counter()
            pairs = brute_force_pairs(frame["image_phash"].to_numpy(), max_distance)
            results["brute_force"] = {"rows": small, "seconds": round(time.perf_counter() - start, 2),
                                      "pairs_within_distance": pairs, "pairs_compared": small * (small - 1) // 2}
    finally:
        client.close()
        cluster.close()
    lo, hi = min(sizes), max(sizes)
    a, b = results["sizes"][lo], results["sizes"][hi]
    results["ratio"] = {"rows": hi / lo, "seconds": round(b["seconds"] / a["seconds"], 2),
                        "candidate_pairs": round(b["candidate_pairs"] / max(1, a["candidate_pairs"]), 2)}
    return results


def print_table(results: dict[str, Any]) -> None:
    s = results["settings"]
    print(f"machine: {results['machine']}")
    print(f"near_dedup decide: {s['workers']} workers x 1 thread, max_distance {s['max_distance']}, "
          f"{s['bands']} blocks -> {s['band_keys']} band keys a row, task shuffle")
    print(f"{'rows':>10} {'seconds':>8} {'candidates':>11} {'verified':>9} {'dropped':>8} {'expected':>8}")
    for n, r in results["sizes"].items():
        print(f"{n:>10} {r['seconds']:>8.2f} {r['candidate_pairs']:>11} {r['verified_pairs']:>9} "
              f"{r['dropped']:>8} {r['expected_dropped']:>8}{'' if r['correct'] else '  WRONG'}")
    r = results["ratio"]
    print(f"ratio {r['rows']:g}x rows: {r['seconds']}x seconds, {r['candidate_pairs']}x candidate pairs "
          f"(quadratic would be {r['rows'] ** 2:g}x)")
    bf = results["brute_force"]
    print(f"brute force all pairs at {bf['rows']} rows (numpy, one process): {bf['seconds']} s, "
          f"{bf['pairs_compared']} pairs compared, {bf['pairs_within_distance']} within distance")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bands", type=int, default=None, help="blocks the hash is cut into (default: the stage's)")
    parser.add_argument("--max-distance", type=int, default=4)
    args = parser.parse_args(argv)
    print_table(run(args.sizes, args.workers, args.bands, args.max_distance))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A curation run writing to an object store next to the same run writing to a local disk.

What it shows: how many requests the commit protocol costs per partition on a store (what S3 bills
and rate-limits), and how the wall time compares with a local disk. The store is moto's S3 server
(`tools.servers.s3`, a single Python process on 127.0.0.1): its latency and throughput are not
S3's, so the wall-time ratio says what this server costs, not what AWS would; the request counts
are the protocol's own and carry over to any store.

The same recipe runs twice in one invocation on the same input, on the runner's LocalCluster,
into a fresh local folder and then into a fresh bucket: an image folder of real photographs
(crops of scikit-image's samples, `partition_memory.build_folder`), 50 images a partition ->
caption_length_filter -> image (keep_ratio 256, JPEG q90) -> image_size_filter -> exact_dedup
(global) -> phash -> near_dedup (global) -> pack. Requests are counted from the server's
request log by method and kind (object GET/PUT/HEAD/DELETE, listings, multipart), for the
whole run (planning, every task, the global passes, the manifest, the sweep).

    python -m tools.bench.object_store [--images 800] [--per-partition 50] [--workers 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from curate.contract import Manifest
from curate.engine.cluster import Cluster
from curate.engine.driver import run_recipe
from curate.recipe import parse_recipe
from tools.bench.partition_memory import build_folder
from tools.servers.s3 import S3Server

_REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')


def recipe_data(images: Path, out: str, per_partition: int, workers: int) -> dict[str, Any]:
    return {
        "name": "object-store-bench",
        "sources": [{"kind": "image_folder", "name": "photos", "path": str(images), "captions": "sidecar",
                     "files_per_partition": per_partition}],
        "stages": [
            {"kind": "caption_length_filter", "min_chars": 5, "max_chars": 1000},
            {"kind": "image", "resize_mode": "keep_ratio", "image_size": 256, "format": "jpg", "quality": 90},
            {"kind": "image_size_filter", "min_width": 32, "min_height": 32},
            {"kind": "exact_dedup"},
            {"kind": "phash"},
            {"kind": "near_dedup", "max_distance": 4},
        ],
        "output": {"path": out, "shard_max_samples": 100},
        "cluster": {"n_workers": workers, "threads_per_worker": 1, "memory_limit": "2GiB", "dashboard": False},
    }


def classify(method: str, target: str) -> str:
    """One request of the S3 API, by what it does."""
    path, _, query = target.partition("?")
    if "uploads" in query or "uploadId" in query:
        return "multipart"
    if method == "POST" and "delete" in query:
        return "DELETE (batch)"
    if method == "GET" and ("list-type" in query or "prefix=" in query or path.count("/") <= 1):
        return "LIST"
    return method


def count_requests(log: Path, start: int) -> Counter[str]:
    """Requests the server logged after byte `start` of its log."""
    counts: Counter[str] = Counter()
    with open(log, "rb") as f:
        f.seek(start)
        for line in f.read().decode(errors="replace").splitlines():
            m = _REQUEST.search(line)
            if m:
                counts[classify(m["method"], m["target"])] += 1
    return counts


def run(images: Path, out: str, per_partition: int, workers: int) -> dict[str, Any]:
    recipe = parse_recipe(recipe_data(images, out, per_partition, workers), "<bench recipe>")
    cluster = Cluster(recipe)  # started apart: its start is not the storage's cost
    try:
        t = time.perf_counter()
        manifest = Manifest.from_dict(run_recipe(recipe, progress=False, client=cluster.client))
        wall = time.perf_counter() - t
    finally:
        cluster.close()
    return {"wall_s": round(wall, 2), "counts": manifest.counts,
            "shards": {s.name: s.sha256 for e in manifest.kinds.values() for s in e.shards}}


def bench(n_images: int, per_partition: int, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-object-store-") as tmp:
        root = Path(tmp)
        build_folder(root / "images", n_images)
        local = run(root / "images", str(root / "out"), per_partition, workers)
        log = root / "moto.log"
        server = S3Server(log=log)
        try:
            with server.environment():
                bucket = server.create_bucket()
                start = log.stat().st_size
                remote = run(root / "images", f"s3://{bucket}/out", per_partition, workers)
            requests = count_requests(log, start)
        finally:
            server.stop()
    partitions = local["counts"]["partitions"]
    return {
        "images": n_images, "partitions": partitions, "workers": workers,
        "local_wall_s": local["wall_s"], "s3_wall_s": remote["wall_s"],
        "ratio_s3_over_local": round(remote["wall_s"] / local["wall_s"], 2),
        "same_output": local["counts"] == remote["counts"] and local["shards"] == remote["shards"],
        "kept": local["counts"]["kept"], "shards": len(local["shards"]),
        "requests": dict(sorted(requests.items())), "requests_total": sum(requests.values()),
        "requests_per_partition": {k: round(v / partitions, 1) for k, v in sorted(requests.items())},
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--per-partition", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = bench(args.images, args.per_partition, args.workers)
    print(f"{result['images']} images, {result['partitions']} partitions, {result['workers']} workers: "
          f"local {result['local_wall_s']} s, s3 (moto, loopback) {result['s3_wall_s']} s "
          f"({result['ratio_s3_over_local']}x); same output: {result['same_output']}")
    print(f"requests: {result['requests_total']} ({result['requests']}); per partition: "
          f"{result['requests_per_partition']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

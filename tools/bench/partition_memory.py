"""Peak memory of one partition's processing versus the partition's row count.

The runner promises that a task's memory is bounded by the batch size, not by the number of
rows in its partition. This benchmark builds image folders of N real images (crops of the
photographs bundled with scikit-image, each one distinct), then in a fresh process per N runs
the three per-partition tasks (segment: read + decode/resize + filters; plan; pack: tars,
sidecars, ledger) on a single partition holding all N rows, and reports the process's peak RSS.

Side by side, the same rows are processed the way a naive task would: the whole partition read
into one Arrow table before writing. Its peak grows with N; ours should stay flat.

    python -m tools.bench.partition_memory [--sizes 250 1000 4000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.engine.driver import plan_job, prepare_output
from curate.engine.pack import cut_shards
from curate.engine.steps import run_pack, run_plan, run_segment
from curate.recipe import parse_recipe
from curate.sources.base import build_source
from curate.stages.base import build_stage


def build_folder(root: Path, n: int) -> None:
    """N distinct 384x384 JPEG crops of scikit-image's sample photographs, with captions."""
    from skimage import data  # heavy optional dependency (demo extra); not in the --child processes measured

    bases = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = bases[i % len(bases)]
        h, w = img.shape[:2]
        y = (i * 7) % max(1, h - 300)
        x = (i * 13) % max(1, w - 300)
        crop = np.ascontiguousarray(img[y : y + 300, x : x + 300])
        Image.fromarray(crop).resize((384, 384)).save(root / f"{i:06d}.jpg", quality=90)
        (root / f"{i:06d}.txt").write_text(f"crop {i} of a sample photograph from scikit-image")


def _recipe(folder: Path, out: Path, n: int, batch_size: int):
    return parse_recipe(
        {
            "name": "bench-partition-memory",
            "sources": [
                {"kind": "image_folder", "name": "bench", "path": str(folder),
                 "captions": "sidecar", "files_per_partition": n}
            ],
            "stages": [
                {"kind": "caption_length_filter", "min_chars": 5},
                {"kind": "image", "resize_mode": "keep_ratio", "image_size": 256},
                {"kind": "image_size_filter", "min_width": 32, "min_height": 32},
            ],
            "output": {"path": str(out), "shard_max_samples": 1000, "shard_max_bytes": "256MB"},
            "execution": {"batch_size": batch_size},
        }
    )


def child(mode: str, folder: str, out: str, n: int, batch_size: int) -> None:
    """Run in a fresh interpreter: process one partition, print peak RSS (MiB) as JSON."""
    recipe = _recipe(Path(folder), Path(out), n, batch_size)
    job = plan_job(recipe)
    assert len(job.partitions) == 1, "the benchmark needs one partition"
    prepare_output(job, restart=True)
    t0 = time.perf_counter()
    if mode == "streaming":
        run_segment(job, 0, 0)
        plan = run_plan(job, 0)
        run_pack(job, 0, cut_shards(job.kinds, {0: plan["footprints"]}, recipe.output)[0])
    else:  # naive: the whole partition as one table, processed at once
        source = build_source(recipe.sources[0])
        table = pa.concat_tables(list(source.read(job.partitions[0], 1 << 30)))
        for cfg in recipe.stages:
            table = build_stage(cfg).process(table)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": round(peak_mib, 1), "seconds": round(seconds, 2)}))


def measure(mode: str, folder: Path, out: Path, n: int, batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "tools.bench.partition_memory", "--child", mode,
           str(folder), str(out), str(n), str(batch_size)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, folder, out, n, bs = args.child
        child(mode, folder, out, int(n), int(bs))
        return 0
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}")
    print(f"batch size {args.batch_size}; peak RSS of a fresh process running one partition")
    print(f"{'rows':>6} {'ours MiB':>9} {'ours s':>7} {'naive MiB':>10} {'naive s':>8}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"in{n}"
            build_folder(folder, n)
            ours = measure("streaming", folder, Path(tmp) / f"out{n}", n, args.batch_size)
            naive = measure("naive", folder, Path(tmp) / f"naive{n}", n, args.batch_size)
            rows.append({"rows": n, "ours": ours, "naive": naive})
            print(f"{n:>6} {ours['peak_rss_mib']:>9} {ours['seconds']:>7} "
                  f"{naive['peak_rss_mib']:>10} {naive['seconds']:>8}", flush=True)
    first, last = rows[0], rows[-1]
    growth = last["ours"]["peak_rss_mib"] / first["ours"]["peak_rss_mib"]
    naive_growth = last["naive"]["peak_rss_mib"] / first["naive"]["peak_rss_mib"]
    print(f"peak growth for {last['rows'] // first['rows']}x rows: ours {growth:.2f}x, naive {naive_growth:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Curation throughput on a LocalCluster of 1 worker and of 2 workers: same recipe, same input.

Issue 13 (running at scale) sizes clusters from per-core rates, which is right only if the runner
keeps more workers busy: the per-partition tasks are independent, but every global stage (a dedup
pass) is a barrier and a shuffle, and the driver plans, builds the passes' graphs and writes the
manifest alone. This benchmark measures what a second worker process adds on one CPU pipeline of
image-text pairs, in one invocation, on the same URL list and the same loopback server:

    url_list -> caption_length_filter -> language_filter (fastText lid.176) -> url_dedup (global)
      -> download -> image (keep_ratio 256, JPEG q95) -> image_size_filter -> aspect_ratio_filter
      -> exact_dedup (global) -> phash -> near_dedup (global) -> pack

- The input: distinct real photographs (crops and mosaics of scikit-image's and scikit-learn's
  pictures, JPEG/PNG/WebP, long sides 200-3,200 px: `download_vs_img2dataset.build_corpus`, the
  download benchmark's corpus) behind a `url,caption` CSV, with planted defects in fixed shares
  (`DEFECTS`): repeated URLs, the same bytes under another URL, downscaled re-encoded copies,
  dead links, short and French captions, truncated JPEGs, tiny images and strips, so every
  filter and dedup pass has work. Captions are English sentences from a small vocabulary.
- The server: `download_vs_img2dataset.ImageServer` (asyncio, from memory, its own process, on
  127.0.0.1; about 3,400 requests/s alone), one for every run; its CPU is reported.
- Each run: a fresh interpreter starts the runner's own LocalCluster (`curate.engine.cluster.Cluster`:
  processes, 1 thread each, 127.0.0.1, the runner's worker settings) with `--workers` workers,
  waits for them, then times `run_recipe(..., client=...)` into a fresh output folder. The
  cluster's start (process spawn and imports) is timed apart and shown, since it is paid once
  per cluster, not per input; the wall time includes everything else (the driver's planning,
  every task, the global passes, the manifest).
- inputs/s = URL rows / wall seconds; speedup = inputs/s on the last worker count / on the first.
- Where the time goes, from dask's task stream: row stages (the `run_segment` tasks of each
  segment, first start to last stop), global passes (from a segment's last task to the next's
  first: the driver building the pass plus its dataframe tasks), plan + pack, and the rest
  (the driver's planning and manifest). "Workers busy" = task compute seconds / (wall x workers).
- CPU seconds of the driver (which hosts the scheduler) and the workers during the timed run;
  the CPU that other processes used meanwhile (the system's busy time less ours and the
  server's) and the time the hypervisor stole, because the machine may be shared (a run beside
  someone's test suite shows no scaling at all). Peak bytes of the output folder (shards plus
  intermediates), sampled every 0.25 s.
- `--inputs DIR` keeps the pictures (2 minutes for 3,000 rows on 2 cores) for the next
  invocation; the outputs are always fresh.
- The outcome of every run: kept, dropped by code, and the shard sha256s of its manifest. They
  must be equal for any worker count (DESIGN.md, determinism); the report says whether they are.

    python -m tools.bench.worker_scaling [--n 3000] [--workers 1 2] [--partitions 16] [--repeat 1]
        [--inputs DIR] [--json [PATH]]
    python -m tools.bench.worker_scaling --quick          # a toy size, for tests
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from distributed import get_task_stream
from PIL import Image

from tools.bench import cpu_model
from tools.bench.download_vs_img2dataset import ImageServer, build_corpus, describe_corpus

# Dask's workers re-import this module (spawn: as `__mp_main__`) during the cluster's start, which
# is timed apart from the run. curate is imported where used, so that they load it at their first
# task, inside the timed run, as the workers of `mm1 curate` do (over 1 s a worker).

# Planted defects, as shares of the URL rows, and the drop each should get ("stage/reason").
DEFECTS: dict[str, tuple[float, str]] = {
    "repeated_url": (0.04, "url_dedup/duplicate"),
    "exact_copy": (0.04, "exact_dedup/duplicate"),  # an earlier row's bytes under another URL
    "near_copy": (0.04, "near_dedup/duplicate"),  # an earlier row's picture at 80%, JPEG q85
    "missing": (0.02, "download/http_404"),
    "short_caption": (0.02, "caption_length_filter/caption_too_short"),
    "french": (0.02, "language_filter/lang_mismatch"),
    "corrupt": (0.01, "image/decode_error"),  # a JPEG cut at 60% of its bytes
    "tiny": (0.01, "image_size_filter/image_too_small"),
    "strip": (0.01, "aspect_ratio_filter/aspect_ratio"),
}
QUICK = {"n": 64, "partitions": 8, "threads": 8, "batch_size": 16}

_STYLES = ["A photograph of", "A close-up photo of", "A wide shot of", "An old postcard showing",
           "A snapshot of", "A picture of"]
_SUBJECTS = ["a tabby cat asleep on a sofa", "an astronaut in a white suit", "a cup of coffee on a wooden table",
             "a rocket on its launch pad", "a field of red and yellow flowers", "a narrow street in an old town",
             "a mountain lake with pine trees", "a lighthouse on a rocky cliff", "a bowl of fresh fruit",
             "a busy market with colourful stalls", "a sailing boat in a quiet harbour", "a stone bridge over a river"]
_SETTINGS = ["at sunset", "in the morning light", "seen from above", "on a rainy afternoon",
             "against a clear blue sky", "in late autumn", "under a cloudy sky", "after a snowfall"]
_FRENCH = ["Un chat tigré endormi sur le canapé du salon", "Une tasse de café posée sur une table en bois",
           "Une fusée sur son pas de tir avant le décollage", "Un champ de fleurs rouges et jaunes au printemps",
           "Une ruelle étroite dans la vieille ville au coucher du soleil"]
_SHORT = ["photo", "IMG_2041.jpg", "untitled image"]


# ---------------------------------------------------------------------------------------------
# The input: distinct photographs, planted defects, a URL list
# ---------------------------------------------------------------------------------------------


def _corpus_chunk(www: str, start: int, count: int, seed: int) -> list[dict[str, Any]]:
    """Process target: `count` distinct pictures (the download benchmark's generator), written to
    `www` as `p<start + i>_<name>`."""
    scratch = Path(www) / f".chunk{start}"
    files = build_corpus(scratch, count, seed)
    for f in files:
        name = f"p{start + int(f['name'][1:6]):06d}.{f['format']}"
        (scratch / f["name"]).rename(Path(www) / name)
        f["name"] = name
    scratch.rmdir()
    return files


def build_pool(www: Path, n_unique: int, seed: int, processes: int | None = None) -> list[dict[str, Any]]:
    """`n_unique` distinct pictures under `www`, built in parallel (untimed, before any run)."""
    www.mkdir(parents=True, exist_ok=True)
    processes = max(1, min(processes or os.cpu_count() or 1, math.ceil(n_unique / 50)))
    bounds = [round(i * n_unique / processes) for i in range(processes + 1)]
    with ProcessPoolExecutor(processes) as pool:
        chunks = pool.map(_corpus_chunk, [str(www)] * processes, bounds[:-1],
                          [b - a for a, b in zip(bounds, bounds[1:])], [seed + i for i in range(processes)])
        return [f for chunk in chunks for f in chunk]


def _jpeg(img: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_inputs(root: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """Write the served files under `root/www` and describe the URL rows (`rows`, written by
    `write_url_list` once the server's address is known). Deterministic for (n, seed)."""
    rng = np.random.default_rng(seed)
    counts = {name: max(1, round(share * n)) for name, (share, _) in DEFECTS.items()}
    n_unique = n - sum(counts.values())
    if n_unique < 8:
        raise ValueError(f"n={n} is too small for the planted defects; use at least 40")
    www = root / "www"
    pool = build_pool(www, n_unique, seed)
    jpegs = [f for f in pool if f["format"] == "jpg"]

    def caption() -> str:
        return f"{rng.choice(_STYLES)} {rng.choice(_SUBJECTS)} {rng.choice(_SETTINGS)}"

    rows: list[tuple[str, str, str]] = [("good", f"/img/{f['name']}", caption()) for f in pool]
    for j in range(counts["repeated_url"]):
        rows.append(("repeated_url", f"/img/{pool[j * 7 % n_unique]['name']}", caption()))
    for j in range(counts["exact_copy"]):
        rows.append(("exact_copy", f"/img/copy{j}/{pool[(j * 11 + 3) % n_unique]['name']}", caption()))
    for j in range(counts["near_copy"]):
        src = pool[(j * 13 + 5) % n_unique]
        with Image.open(www / src["name"]) as im:
            small = im.resize((max(1, round(im.width * 0.8)), max(1, round(im.height * 0.8))),
                              Image.Resampling.LANCZOS)
        (www / f"near{j:05d}.jpg").write_bytes(_jpeg(small, 85))
        rows.append(("near_copy", f"/img/near{j:05d}.jpg", caption()))
    for j in range(counts["missing"]):
        rows.append(("missing", f"/img/gone{j:05d}.jpg", caption()))
    for j in range(counts["short_caption"]):
        rows.append(("short_caption", f"/img/{pool[(j * 17 + 1) % n_unique]['name']}?s={j}", _SHORT[j % len(_SHORT)]))
    for j in range(counts["french"]):
        rows.append(("french", f"/img/{pool[(j * 19 + 2) % n_unique]['name']}?f={j}", _FRENCH[j % len(_FRENCH)]))
    for j in range(counts["corrupt"]):
        data = (www / jpegs[j % len(jpegs)]["name"]).read_bytes()
        (www / f"cut{j:05d}.jpg").write_bytes(data[: int(len(data) * 0.6)])
        rows.append(("corrupt", f"/img/cut{j:05d}.jpg", caption()))
    photo = Image.open(www / jpegs[0]["name"]).convert("RGB")
    for j in range(counts["tiny"]):
        (www / f"tiny{j:05d}.jpg").write_bytes(_jpeg(photo.crop((j, j, j + 24, j + 18)), 90))
        rows.append(("tiny", f"/img/tiny{j:05d}.jpg", caption()))
    for j in range(counts["strip"]):
        strip = photo.crop((0, j, min(photo.width, 1200), j + 80)).resize((1200, 80))
        (www / f"strip{j:05d}.jpg").write_bytes(_jpeg(strip, 90))
        rows.append(("strip", f"/img/strip{j:05d}.jpg", caption()))
    order = rng.permutation(len(rows))  # defects spread over the partitions
    rows = [rows[i] for i in order]
    return {"rows": rows, "planted": {k: counts[k] for k in DEFECTS},
            "corpus": describe_corpus(pool, len(pool))}


def cached_inputs(folder: Path, n: int, seed: int) -> dict[str, Any]:
    """`build_inputs` under `folder`, or what an earlier call left there for the same (n, seed):
    the pictures take longer to make than the runs (`--inputs DIR`)."""
    spec = folder / "inputs.json"
    if spec.is_file() and (folder / "www").is_dir():
        saved = json.loads(spec.read_text())
        if (saved["n"], saved["seed"]) == (n, seed):
            return {**saved, "rows": [tuple(row) for row in saved["rows"]]}
    shutil.rmtree(folder / "www", ignore_errors=True)
    built = build_inputs(folder, n, seed)
    spec.write_text(json.dumps({"n": n, "seed": seed, **built}))
    return built


def write_url_list(path: Path, base_url: str, rows: list[tuple[str, str, str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["url", "caption"])
        for _, route, text in rows:
            writer.writerow([base_url + route, text])


# ---------------------------------------------------------------------------------------------
# One run (a fresh interpreter)
# ---------------------------------------------------------------------------------------------


def scaling_recipe(url_csv: Path, out: Path, workers: int, per_partition: int, threads: int,
                   batch_size: int) -> Any:
    from curate.recipe import parse_recipe  # not at the top, which dask's workers re-import (the note there)

    return parse_recipe({
        "name": "bench-worker-scaling",
        "sources": [{"kind": "url_list", "name": "web", "path": str(url_csv),
                     "records_per_partition": per_partition}],
        "stages": [
            {"kind": "caption_length_filter", "min_words": 3, "max_chars": 1000},
            {"kind": "language_filter", "languages": ["en"]},
            {"kind": "url_dedup"},
            {"kind": "download", "threads": threads, "deadline_s": 20, "allow_networks": ["127.0.0.0/8"]},
            {"kind": "image", "resize_mode": "keep_ratio", "image_size": 256, "format": "jpg", "quality": 95},
            {"kind": "image_size_filter", "min_width": 64, "min_height": 64},
            {"kind": "aspect_ratio_filter", "max_aspect_ratio": 3.0},
            {"kind": "exact_dedup"},
            {"kind": "phash"},
            {"kind": "near_dedup"},
        ],
        "output": {"path": str(out), "shard_max_samples": 10_000},
        "cluster": {"n_workers": workers, "threads_per_worker": 1, "dashboard": False},
        "execution": {"batch_size": batch_size},
    })


class _DiskPeak:
    """The largest total size of the files under `root`, sampled every `interval` s."""

    def __init__(self, root: Path, interval: float = 0.25):
        self.root, self.interval, self.peak = root, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="disk-peak")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_bytes(self.root))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, tree_bytes(self.root))


def tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # published or removed meanwhile
                pass
    return total


def phases(tasks: list[dict[str, Any]], t_start: float, t_end: float) -> dict[str, Any]:
    """Split a run's wall time by what ran, from dask's task stream (`get_task_stream().data`):
    each segment's row stages (first to last `run_segment` compute), the global passes between
    segments, plan + pack, and the rest (the driver alone)."""
    spans: dict[str, list[float]] = {}
    busy = 0.0
    for t in tasks:
        computes = [s for s in t.get("startstops", ()) if s.get("action") == "compute"]
        if not computes:
            continue
        start, stop = min(s["start"] for s in computes), max(s["stop"] for s in computes)
        busy += sum(s["stop"] - s["start"] for s in computes)
        m = re.match(r"^(run_segment|run_plan|run_pack)-r\d+-(\d+)", str(t["key"]))
        group = f"segment{m.group(2)}" if m and m.group(1) == "run_segment" else "pack" if m else "global"
        span = spans.setdefault(group, [start, stop])
        span[0], span[1] = min(span[0], start), max(span[1], stop)
    segments = sorted((g for g in spans if g.startswith("segment")), key=lambda g: int(g[7:]))
    row = sum(spans[g][1] - spans[g][0] for g in segments)
    # between one segment's last task and the next step's first: the global pass of that segment
    starts = [spans[g][0] for g in segments[1:]] + ([spans["pack"][0]] if "pack" in spans else [])
    gaps = [max(0.0, nxt - spans[g][1]) for g, nxt in zip(segments, starts)]
    glob = sum(gaps)
    pack = spans["pack"][1] - spans["pack"][0] if "pack" in spans else 0.0
    wall = t_end - t_start
    return {"row_stages_s": round(row, 2), "global_passes_s": round(glob, 2), "plan_pack_s": round(pack, 2),
            "driver_only_s": round(max(0.0, wall - row - glob - pack), 2), "task_compute_s": round(busy, 2),
            # each segment's row stages, and the global pass after it, in recipe order
            "each_segment_s": [round(spans[g][1] - spans[g][0], 2) for g in segments],
            "each_global_s": [round(x, 2) for x in gaps]}


def _child(a: dict[str, Any]) -> dict[str, Any]:
    # not at the top, which dask's workers re-import (the note there)
    from curate.contract import Manifest
    from curate.engine.cluster import Cluster
    from curate.engine.driver import run_recipe

    out = Path(a["out"])
    recipe = scaling_recipe(Path(a["url_csv"]), out, a["workers"], a["per_partition"], a["threads"],
                            a["batch_size"])
    t0 = time.perf_counter()
    cluster = Cluster(recipe)  # the runner's own LocalCluster, as `mm1 curate` starts it
    try:
        client = cluster.client
        client.wait_for_workers(a["workers"], timeout=120)
        cluster_start = time.perf_counter() - t0
        procs = [psutil.Process(), *(psutil.Process(pid) for pid in client.run(os.getpid).values())]
        server = psutil.Process(a["server_pid"])

        def cpu(p: Any) -> float:
            t = p.cpu_times()
            return t.user + t.system

        cpu0, server0, sys0 = [cpu(p) for p in procs], cpu(server), psutil.cpu_times()
        disk = _DiskPeak(out)
        with get_task_stream(client=client) as stream:
            wall0, t1 = time.time(), time.perf_counter()
            manifest = run_recipe(recipe, restart=True, progress=False, client=client)
            seconds, wall1 = time.perf_counter() - t1, time.time()
        peak_disk = disk.stop()
        cpu1, server1, sys1 = [cpu(p) for p in procs], cpu(server), psutil.cpu_times()
        tasks = stream.data
    finally:
        cluster.close()
    ours = sum(cpu1) - sum(cpu0)
    busy_cpu = sum(getattr(sys1, f) - getattr(sys0, f) for f in ("user", "nice", "system", "irq", "softirq"))
    foreign = max(0.0, busy_cpu - ours - (server1 - server0))
    typed = Manifest.from_dict(manifest)
    shards, pairs = typed.shards("pair"), typed.kinds.get("pair")
    sidecars = sum((out / s.sidecar).stat().st_size for s in shards)
    return {
        "workers": a["workers"], "seconds": seconds, "cluster_start_s": cluster_start,
        "counts": typed.counts, "drops": typed.drops,
        "shards": [{"name": s.name, "count": s.count, "bytes": s.bytes, "sha256": s.sha256,
                    "sidecar_sha256": s.sidecar_sha256} for s in shards],
        "disk": {"tar_bytes": pairs.bytes if pairs is not None else 0, "sidecar_bytes": sidecars,
                 "ledger_bytes": tree_bytes(out / "ledger"), "work_bytes_left": tree_bytes(out / "_work"),
                 "peak_output_bytes": peak_disk},
        "cpu_s": {"driver": cpu1[0] - cpu0[0], "workers": sum(cpu1[1:]) - sum(cpu0[1:]), "server": server1 - server0,
                  "foreign": foreign, "steal": getattr(sys1, "steal", 0.0) - getattr(sys0, "steal", 0.0)},
        "phases": phases(tasks, wall0, wall1),
    }


def measure(workers: int, args: dict[str, Any], workdir: Path, timeout_s: float = 1800) -> dict[str, Any]:
    """One run in a fresh interpreter; its timings, outcome and CPU."""
    result = workdir / f"run-{workers}w.json"
    log = workdir / f"run-{workers}w.log"
    cmd = [sys.executable, "-m", "tools.bench.worker_scaling", "--child", json.dumps({**args, "workers": workers}),
           str(result)]
    with open(log, "w") as fh:
        # its own session, so that a run past `timeout_s` goes with its cluster's workers
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2],
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"the {workers}-worker run took over {timeout_s}s; its log ends:\n"
                               f"{log.read_text()[-4000:]}") from None
    if rc != 0:
        raise RuntimeError(f"the {workers}-worker run failed (exit {rc}); its log ends:\n{log.read_text()[-4000:]}")
    res = json.loads(result.read_text())
    n, s = res["counts"]["inputs"], res["seconds"]
    cpu = res["cpu_s"]["driver"] + res["cpu_s"]["workers"]
    res.update(
        seconds=round(s, 2), cluster_start_s=round(res["cluster_start_s"], 2),
        inputs_per_s=round(n / s, 1), inputs_per_s_per_worker=round(n / s / workers, 1),
        inputs_per_s_with_start=round(n / (s + res["cluster_start_s"]), 1),
        cpu_ms_per_input=round(1000 * cpu / n, 2), cores_busy=round(cpu / s, 2),
        workers_busy=round(res["phases"]["task_compute_s"] / (s * workers), 3),
        foreign_cpu_share=round(res["cpu_s"]["foreign"] / (s * (os.cpu_count() or 1)), 3),
        steal_share=round(res["cpu_s"]["steal"] / (s * (os.cpu_count() or 1)), 3),
        cpu_s={k: round(v, 2) for k, v in res["cpu_s"].items()},
    )
    return res


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    return {"arch": platform.machine(), "cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "versions": {p: version(p) for p in ("dask", "distributed", "pyarrow", "pillow")}}


def _outcome(run: dict[str, Any]) -> tuple[Any, ...]:
    return (run["counts"]["kept"], run["counts"]["dropped"], tuple(sorted(run["drops"].items())))


def bench(n: int = 3000, workers: tuple[int, ...] = (1, 2), partitions: int = 16, threads: int = 16,
          batch_size: int = 64, repeat: int = 1, seed: int = 0, inputs_dir: Path | None = None,
          log: Any = print) -> dict[str, Any]:
    """Build the input (or reuse `inputs_dir`'s), start the server, run the recipe on each worker
    count `repeat` times (alternating the order), and report each count's median run (by
    inputs/s), the speedups against the first count, and whether every run gave the same outcome
    and shards. Every run writes into a fresh output folder."""
    per_partition = math.ceil(n / partitions)
    report: dict[str, Any] = {"machine": machine(), "settings": {
        "n": n, "workers": list(workers), "threads_per_worker": 1, "partitions": math.ceil(n / per_partition),
        "rows_per_partition": per_partition, "download_threads": threads, "batch_size": batch_size,
        "repeat": repeat, "seed": seed}}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        inputs_root = Path(inputs_dir) if inputs_dir else root
        inputs_root.mkdir(parents=True, exist_ok=True)
        inputs = cached_inputs(inputs_root, n, seed) if inputs_dir else build_inputs(root, n, seed)
        report["corpus"], report["planted"] = inputs["corpus"], inputs["planted"]
        log(f"input: {n} URL rows, {report['corpus']['unique_images']} distinct pictures "
            f"(ready in {time.perf_counter() - t0:.0f}s); planted: {report['planted']}")
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in workers}
        with ImageServer(inputs_root / "www") as server:
            url_csv = root / "urls.csv"
            write_url_list(url_csv, server.base_url, inputs["rows"])
            args = {"url_csv": str(url_csv), "per_partition": per_partition, "threads": threads,
                    "batch_size": batch_size, "server_pid": server.process.pid}
            for r in range(repeat):
                for w in workers if r % 2 == 0 else workers[::-1]:
                    out = root / f"out-{w}w"  # fresh for every run
                    shutil.rmtree(out, ignore_errors=True)
                    run = measure(w, {**args, "out": str(out)}, root)
                    runs[w].append(run)
                    log(f"{w} worker(s), run {r + 1}/{repeat}: {run['seconds']}s, {run['inputs_per_s']} inputs/s, "
                        f"kept {run['counts']['kept']}, other processes' CPU {run['foreign_cpu_share']:.1%}")
                    shutil.rmtree(out, ignore_errors=True)
    every = [run for done in runs.values() for run in done]
    report["same_outcome"] = len({_outcome(run) for run in every}) == 1
    report["same_shards"] = len({tuple((s["sha256"], s["sidecar_sha256"]) for s in run["shards"])
                                 for run in every}) == 1
    report["runs"] = {}
    for w, done in runs.items():
        ranked = sorted(done, key=lambda run: run["inputs_per_s"])
        report["runs"][str(w)] = {**ranked[(len(ranked) - 1) // 2],
                                  "inputs_per_s_each": [run["inputs_per_s"] for run in done]}
    first = report["runs"][str(workers[0])]
    report["speedup"] = {str(w): round(report["runs"][str(w)]["inputs_per_s"] / first["inputs_per_s"], 3)
                         for w in workers[1:]}
    report["speedup_with_start"] = {
        str(w): round(report["runs"][str(w)]["inputs_per_s_with_start"] / first["inputs_per_s_with_start"], 3)
        for w in workers[1:]}
    return report


def print_table(report: dict[str, Any]) -> None:
    names = list(report["runs"])
    runs = [report["runs"][w] for w in names]

    def mib(b: int) -> str:
        return f"{b / 2**20:,.1f}"

    rows = [
        ("inputs (kept / dropped)", lambda r: f"{r['counts']['inputs']:,} ({r['counts']['kept']:,} / "
                                              f"{r['counts']['dropped']:,})"),
        ("wall seconds (cluster up)", lambda r: f"{r['seconds']}"),
        ("**inputs/s**", lambda r: f"**{r['inputs_per_s']}**"),
        ("inputs/s per worker", lambda r: f"{r['inputs_per_s_per_worker']}"),
        ("cluster start seconds (apart)", lambda r: f"{r['cluster_start_s']}"),
        ("inputs/s, cluster start included", lambda r: f"{r['inputs_per_s_with_start']}"),
        ("row stages s (download, image, filters, phash)", lambda r: f"{r['phases']['row_stages_s']}"),
        ("global passes s (3 dedups)", lambda r: f"{r['phases']['global_passes_s']}"),
        ("plan + pack s", lambda r: f"{r['phases']['plan_pack_s']}"),
        ("driver only s (planning, manifest)", lambda r: f"{r['phases']['driver_only_s']}"),
        ("workers busy (task time / wall x workers)", lambda r: f"{r['workers_busy']:.0%}"),
        ("CPU s: workers + driver", lambda r: f"{r['cpu_s']['workers']} + {r['cpu_s']['driver']}"),
        ("CPU ms per input", lambda r: f"{r['cpu_ms_per_input']}"),
        ("server CPU s", lambda r: f"{r['cpu_s']['server']}"),
        ("other processes' CPU (share of cores)", lambda r: f"{r['foreign_cpu_share']:.1%}"),
        ("CPU stolen by the hypervisor (share of cores)", lambda r: f"{r['steal_share']:.1%}"),
        ("shards: tar MiB / sidecar MiB",
         lambda r: f"{mib(r['disk']['tar_bytes'])} / {mib(r['disk']['sidecar_bytes'])}"),
        ("peak output folder MiB (shards + intermediates)", lambda r: mib(r["disk"]["peak_output_bytes"])),
    ]
    if report["settings"]["repeat"] > 1:
        rows.append(("inputs/s of each run (median above)",
                     lambda r: " ".join(f"{x:g}" for x in r["inputs_per_s_each"])))
    titles = [f"{w} worker{'s' if w != '1' else ''}" for w in names]
    cells = [[cell(r) for r in runs] for _, cell in rows]
    width = max(12, *(len(c) for line in cells for c in line), *(len(t) for t in titles))
    label_w = max(len(label) for label, _ in rows)
    print(f"| {'':{label_w}} | " + " | ".join(f"{t:>{width}}" for t in titles) + " |")
    print(f"|{'-' * (label_w + 2)}|" + "|".join("-" * (width + 1) + ":" for _ in names) + "|")
    for (label, _), line in zip(rows, cells):
        print(f"| {label:{label_w}} | " + " | ".join(f"{c:>{width}}" for c in line) + " |")
    for w, s in report["speedup"].items():
        print(f"speedup, {w} workers vs {names[0]} (inputs/s): {s:.2f}x; cluster start included: "
              f"{report['speedup_with_start'][w]:.2f}x")
    print(f"same kept/dropped counts and drop codes in every run: {'yes' if report['same_outcome'] else 'NO'}; "
          f"byte-identical shards (manifest sha256s): {'yes' if report['same_shards'] else 'NO'}")
    drops = runs[0]["drops"]
    print("drops (first column's run): " + ", ".join(f"{k} {v}" for k, v in drops.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="URL rows (planted defects included)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, 1 thread each")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--threads", type=int, default=16, help="download threads per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="runs per worker count, alternating the order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inputs", type=Path, metavar="DIR",
                        help="build the input here, or reuse the one an earlier run built for the same --n and --seed")
    parser.add_argument("--quick", action="store_true", help=f"a toy size for tests: {QUICK}")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the report as JSON to PATH (stdout without one)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec, result = args.child
        Path(result).write_text(json.dumps(_child(json.loads(spec))))
        return 0
    size = QUICK if args.quick else {"n": args.n, "partitions": args.partitions, "threads": args.threads,
                                     "batch_size": args.batch_size}
    to_stdout = args.json == "-"
    report = bench(workers=tuple(args.workers), repeat=args.repeat, seed=args.seed, inputs_dir=args.inputs,
                   log=(lambda s: print(s, file=sys.stderr)) if to_stdout else print, **size)
    if to_stdout:
        print(json.dumps(report, indent=1))
        return 0
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

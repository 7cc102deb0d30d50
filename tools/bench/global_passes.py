"""Every global stage at millions of rows: seconds, memory and tasks per pass, as the runner runs it.

Each pass is one global stage over synthetic small columns of `--rows` rows with planted
duplicates (so every outcome is checked, not just timed), written as the runner writes a
segment's intermediate (parquet partitions of `--rows-per-partition` rows: `id`, `_partition`,
`drop_reason` and the stage's columns) and decided by the runner's own code
(`curate.engine.driver.read_live` + `decide_global`: the same shuffle setting, the same
decisions and input folders). Each pass gets a fresh cluster: `dask scheduler` in its own
process and `dask worker --nworkers W --nthreads 1` (with the runner's worker settings,
recipes/cluster/dask-worker.yaml), the bench itself being the driver. The inputs are made in
a child process beforehand, so the driver's memory is the pass's.

Measured per pass: wall seconds of `decide_global` (reading the input, the stage's passes,
writing decisions and input), rows/s, the peak resident memory of each worker, of the driver and
of the scheduler (psutil, every 50 ms), the tasks the scheduler ran (its per-prefix counts of
tasks that reached memory) and the bytes the workers sent each other (their
`transfer_outgoing_bytes_total`: a task's inputs fetched from the other worker, which is what
a shuffle moves between machines; bytes a worker passes to itself are not counted).

    python -m tools.bench.global_passes --rows 1000000 4000000 --json F [--stages url_dedup ...]
    python -m tools.bench.global_passes --rows 10000000 --stages url_dedup exact_dedup ...
    python -m tools.bench.global_passes --partitions-run 10000 1000      (the engine's own cost)

The planted data per stage (a fraction `--duplicates` of the rows, each a copy of a random
other row's value, the rows shuffled over the partitions so copies cross them):

- url_dedup / exact_dedup: URLs (~55 chars) / SHA-256 hex strings, exact copies; drops = copies.
- near_dedup: 64-bit hashes, copies with up to 4 bits flipped (random hashes are ~32 bits apart).
- semantic_dedup: `--dim`-d float16 unit vectors, copies within cosine 0.999, and a score.
- minhash_dedup: 14 random int64 band keys a row, a copy sharing one band with its original.
- paragraph_dedup: 3 paragraph hashes a row, a fraction of the paragraphs copies of others:
  removed segments = copies.
- doc_image_dedup: 2 image segments a doc (segments JSON + image_sha256s), same rule.
- score_top_fraction: uniform scores, fraction 0.3: drops = rows - ceil(0.3 rows).
- metaclip_balance: Zipf-like captions over open_clip's vocabulary, 500,000-entry metadata
  (tools.bench.metaclip_balance), t 20,000: every entry kept at most t + 5 sqrt(t) times.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import dask
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from dask.distributed import Client, get_task_stream
from dask.utils import key_split

import curate.stages  # noqa: F401 - registers every stage
from curate.engine import driver
from curate.engine.driver import decide_global, live_schema, read_live, run_recipe
from curate.recipe import parse_recipe
from curate.stages.base import STAGES
from curate.storage import parquet_files

ROOT = Path(__file__).resolve().parents[2]
WORKER_YAML = ROOT / "recipes" / "cluster" / "dask-worker.yaml"
PASSES = ["url_dedup", "exact_dedup", "near_dedup", "semantic_dedup", "minhash_dedup", "paragraph_dedup",
          "doc_image_dedup", "score_top_fraction", "metaclip_balance"]
CHEAP = ["url_dedup", "exact_dedup", "score_top_fraction", "metaclip_balance"]
FRACTION = 0.3
METACLIP_T = 20_000


# ---------------------------------------------------------------------------------------------
# Inputs (made in a child process)
# ---------------------------------------------------------------------------------------------


def planted_keys(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row -> the key of its value: its own index, or for a fraction of the rows (the copies)
    a random row's that is no copy; and which rows are copies. In a random row order."""
    keys = np.arange(n, dtype=np.int64)
    copies = rng.random(n) < fraction
    originals = np.flatnonzero(~copies)
    keys[copies] = rng.choice(originals, size=int(copies.sum()))
    order = rng.permutation(n)
    return keys[order], copies[order]


def _sha_hex(words: np.ndarray) -> list[str]:
    return [f"{a:016x}{b:016x}{c:016x}{d:016x}" for a, b, c, d in words.tolist()]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_inputs(stage: str, n: int, per_partition: int, folder: str, dup: float, dim: int, seed: int = 0) -> dict:
    """Write stage `stage`'s input of `n` rows under `folder`; return {files, expect}."""
    rng = np.random.default_rng(seed)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    expect: dict[str, Any] = {}
    kind = "pair"
    if stage in ("paragraph_dedup", "doc_image_dedup"):
        width = 3 if stage == "paragraph_dedup" else 2
        cells, copied = planted_keys(n * width, dup, rng)
        cells = cells.reshape(n, width)
        expect["removed_segments"] = int(copied.sum())
        kind = "text" if stage == "paragraph_dedup" else "doc"
    elif stage not in ("score_top_fraction", "metaclip_balance"):
        keys, copied = planted_keys(n, dup, rng)
        expect["dropped"] = int(copied.sum())
    if stage == "near_dedup":
        base = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n, dtype=np.int64)
        flips = np.zeros(n, dtype=np.uint64)
        for _ in range(4):  # up to 4 bits each (a bit drawn twice flips back: fewer)
            flips ^= np.where(rng.random(n) < 0.7, np.uint64(1) << rng.integers(0, 64, size=n).astype(np.uint64),
                              np.uint64(0))
    if stage == "semantic_dedup":
        origin = _unit(rng.standard_normal((n, dim)).astype(np.float32))
    if stage == "metaclip_balance":
        # (its open_clip vocabulary file and matcher: only this stage's inputs need them)
        from tools.bench.metaclip_balance import build_captions, build_metadata, vocabulary
        words = vocabulary()
        metadata = out / "metadata.json"
        metadata.write_text(json.dumps(build_metadata(500_000, words)))
        pool = build_captions(100_000, words)
        expect["t"] = METACLIP_T
    if stage == "score_top_fraction":
        expect["dropped"] = n - min(n, math.ceil(FRACTION * n - 1e-9))
    if stage == "exact_dedup":
        sha_words = rng.integers(0, np.iinfo(np.int64).max, size=(n, 4), dtype=np.int64)
    if stage == "paragraph_dedup":
        hashes = rng.integers(2, np.iinfo(np.int64).max, size=n * 3, dtype=np.int64)
    if stage == "doc_image_dedup":
        img_words = rng.integers(0, np.iinfo(np.int64).max, size=(n * 2, 4), dtype=np.int64)
        segments = json.dumps([{"type": "text", "text": None}, {"type": "image", "image": 0},
                               {"type": "image", "image": 1}])
    files = []
    for p, start in enumerate(range(0, n, per_partition)):
        stop = min(n, start + per_partition)
        m = stop - start
        cols: dict[str, Any] = {
            "id": pa.array([f"bench:{i:010d}" for i in range(start, stop)]),
            "_partition": pa.array(np.full(m, p, dtype=np.int32)),
            "drop_reason": pa.nulls(m, pa.string()),
        }
        if stage == "url_dedup":
            k = keys[start:stop].tolist()
            cols["url"] = pa.array([f"https://img{x % 9973}.cdn-example.com/a/{x:010d}/photo.jpg" for x in k])
        elif stage == "exact_dedup":
            cols["image_sha256"] = pa.array(_sha_hex(sha_words[keys[start:stop]]))
        elif stage == "near_dedup":
            k = keys[start:stop]
            is_copy = copied[start:stop]
            values = base[k].view(np.uint64) ^ np.where(is_copy, flips[start:stop], np.uint64(0))
            cols["image_phash"] = pa.array(values.view(np.int64))
        elif stage == "semantic_dedup":
            k = keys[start:stop]
            is_copy = copied[start:stop, None]
            v = origin[k] + is_copy * 0.02 * rng.standard_normal((m, dim)).astype(np.float32) / math.sqrt(dim)
            v = _unit(v).astype(np.float16)
            cols["clip_embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim).cast(
                pa.list_(pa.float16()))
            cols["clip_score"] = pa.array(rng.random(m).astype(np.float32))
        elif stage == "minhash_dedup":
            k = keys[start:stop]
            bands = rng.integers(1, np.iinfo(np.int64).max, size=(m, 14), dtype=np.int64)
            is_copy = copied[start:stop]
            shared = rng.integers(0, 14, size=m)
            # a copy shares one band with its original: the original's band b is a function of
            # (key, b), so both sides compute it
            copy_rows = np.flatnonzero(is_copy)
            bands[copy_rows, shared[copy_rows]] = _band_of(k[copy_rows], shared[copy_rows])
            own_rows = np.flatnonzero(~is_copy)
            for b in range(14):
                bands[own_rows, b] = _band_of(k[own_rows], np.full(len(own_rows), b))
            cols["minhash_bands"] = pa.array(list(bands), type=pa.list_(pa.int64()))
        elif stage == "paragraph_dedup":
            cols["paragraph_hashes"] = pa.array(list(hashes[cells[start:stop]]), type=pa.list_(pa.int64()))
        elif stage == "doc_image_dedup":
            c = cells[start:stop]
            digests = _sha_hex(img_words[c.reshape(-1)])
            cols["segments"] = pa.array([segments] * m)
            cols["image_sha256s"] = pa.array([digests[2 * i:2 * i + 2] for i in range(m)], type=pa.list_(pa.string()))
        elif stage == "score_top_fraction":
            cols["clip_score"] = pa.array(rng.random(m).astype(np.float32))
        elif stage == "metaclip_balance":
            cols["caption"] = pa.array([pool[i % len(pool)] for i in range(start, stop)])
        path = out / f"{p:05d}.parquet"
        pq.write_table(pa.table(cols), path, compression="zstd")
        files.append(str(path))
    return {"files": files, "expect": expect, "kind": kind}


def _band_of(keys: np.ndarray, bands: np.ndarray) -> np.ndarray:
    """A row's band value from (key, band): a splitmix64 of both, never 0."""
    x = (keys.astype(np.uint64) * np.uint64(14) + bands.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(1)).view(np.int64) | np.int64(1)


def stage_config(stage: str, folder: Path) -> Any:
    raw: dict[str, Any] = {"kind": stage}
    if stage == "score_top_fraction":
        raw["fraction"] = FRACTION
    elif stage == "metaclip_balance":
        raw.update(metadata=str(folder / "metadata.json"), t=METACLIP_T)
    elif stage == "near_dedup":
        raw["max_distance"] = 4
    cls = STAGES[stage]
    return cls(cls.Config(**raw))


# ---------------------------------------------------------------------------------------------
# The cluster: a scheduler process and a worker process of W workers
# ---------------------------------------------------------------------------------------------


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a fresh (spawned) process: each pass's driver is a process of its own, so
    its peak memory is the pass's, not what earlier passes and their checks left allocated."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchCluster:
    """`dask scheduler` and `dask worker --nworkers W` on 127.0.0.1, in their own processes."""

    def __init__(self, workers: int, tmp: Path):
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        env = {**os.environ, "DASK_CONFIG": str(WORKER_YAML), "PYTHONPATH": str(ROOT)}
        bin_dir = Path(sys.executable).parent
        self.procs = [subprocess.Popen(
            [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1],
             "--no-dashboard"], env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)]
        self.procs.append(subprocess.Popen(
            [str(bin_dir / "dask"), "worker", self.address, "--nworkers", str(workers), "--nthreads", "1",
             "--no-dashboard", "--local-directory", str(tmp / "dask-worker-space")],
            env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 120
        while True:
            try:
                self.client = Client(self.address, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.client.wait_for_workers(workers, timeout=120)
        self.worker_pids = sorted(self.client.run(os.getpid).values())
        self.scheduler_pid = self.procs[0].pid

    def tasks_done(self) -> int:
        def count(dask_scheduler: Any) -> int:
            return sum(tp.state_counts.get("memory", 0) for tp in dask_scheduler.task_prefixes.values())
        return int(self.client.run_on_scheduler(count))

    def bytes_sent(self) -> int:
        return sum(self.client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())

    def byte_digests(self) -> dict[str, int]:
        """The workers' byte metrics (their `digests_total` keyed by "bytes"), summed: what the p2p
        shuffle sent between them and wrote to disk, which task transfers do not count."""
        def digests(dask_worker: Any) -> dict[str, float]:
            return {"/".join(map(str, k)): v for k, v in dask_worker.digests_total.items()
                    if isinstance(k, tuple) and "bytes" in k}
        out: dict[str, int] = {}
        for one in self.client.run(digests).values():
            for k, v in one.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def close(self) -> None:
        """Killed, not shut down: nothing of theirs is kept, and a graceful close of the nannies
        took 8 s a cluster (each in its own session: its worker processes go with it)."""
        try:
            self.client.close()
        finally:
            for proc in reversed(self.procs):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(30)


class Peaks:
    """The peak resident memory of each named process, sampled in a thread every `every` s."""

    def __init__(self, pids: dict[str, int], every: float = 0.05):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}
        self.when = {name: 0.0 for name in pids}  # time.time() of each peak
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                try:
                    rss = proc.memory_info().rss
                    if rss > self.peak[name]:
                        self.peak[name], self.when[name] = rss, time.time()
                except psutil.Error:  # a worker restarted (a task retried): sampled again below
                    pass
            self._stop.wait(self.every)

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def peak_tasks(stream: list[dict[str, Any]], pids: dict[str, int], peaks: Peaks, around: float = 1.0) -> list[list[str]]:
    """For each worker (as `worker_rss_mib` lists them), the task prefixes it computed within
    `around` seconds of its peak RSS, most time first: where a pass's memory goes. (A p2p
    shuffle's transfers and unpacking run outside tasks: `shuffle-transfer` and the tasks after
    `shuffle-barrier` name them.)"""
    out = []
    for name, proc in sorted(((n, p) for n, p in peaks.procs.items() if n.startswith("worker")),
                            key=lambda x: x[0]):
        address = next((a for a, q in pids.items() if q == proc.pid), None)
        t, busy = peaks.when[name], {}
        for task in stream:
            if task.get("worker") != address:
                continue
            for ss in task.get("startstops", ()):
                overlap = min(ss["stop"], t + around) - max(ss["start"], t - around)
                if ss.get("action") == "compute" and overlap > 0:
                    prefix = key_split(task["key"])
                    busy[prefix] = busy.get(prefix, 0.0) + overlap
        out.append([p for p, _ in sorted(busy.items(), key=lambda x: -x[1])])
    return out


def task_seconds(stream: list[dict[str, Any]], top: int = 12) -> dict[str, float]:
    """Compute seconds per task prefix over all workers, the `top` most: where a pass's time goes
    (a p2p shuffle's transfers run outside tasks, under `shuffle-transfer` and after the barrier)."""
    busy: dict[str, float] = {}
    for task in stream:
        for ss in task.get("startstops", ()):
            if ss.get("action") == "compute":
                prefix = key_split(task["key"])
                busy[prefix] = busy.get(prefix, 0.0) + ss["stop"] - ss["start"]
    return {p: round(s, 1) for p, s in sorted(busy.items(), key=lambda x: -x[1])[:top]}


# ---------------------------------------------------------------------------------------------
# One pass
# ---------------------------------------------------------------------------------------------


def check(stage: str, expect: dict[str, Any], decisions: Path, rows: int, summary: dict[str, Any]) -> dict[str, Any]:
    """The pass's outcome against what was planted: {"ok": bool, ...}."""
    files = parquet_files(decisions)
    tables = [pq.read_table(f) for f in files]
    dropped = sum(t.num_rows for t in tables)
    got: dict[str, Any] = {"dropped": dropped}
    if "removed_segments" in expect:
        removed = sum(len(json.loads(s)) for t in tables for s in t.column("segments").to_pylist())
        got["removed_segments"] = removed
        got["ok"] = removed == expect["removed_segments"]
    elif stage == "metaclip_balance":
        lists = summary.get("lists", {})
        heads = [h for lst in lists.values() for h in lst.get("head", [])]
        t = expect["t"]
        most = max((h.get("kept", h.get("count_after", 0)) if isinstance(h, dict) else 0 for h in heads), default=0)
        got.update(kept=summary.get("kept"), most_kept_entry=most)
        got["ok"] = summary.get("kept", -1) + dropped == rows and most <= t + 5 * math.sqrt(t)
    elif stage == "near_dedup":
        # two of the random hashes fall within 4 bits of each other with probability
        # sum_k<=4 C(64, k) / 2^64 = 3.7e-14 a pair: 0.3 such pairs expected among 4M rows, 1.8
        # among 10M. Their drops are right; the planted ones must all be there.
        chance = sum(math.comb(64, k) for k in range(5)) / 2**64 * rows * (rows - 1) / 2
        got["accidental_allowed"] = 1 + math.ceil(3 * chance)
        got["ok"] = expect["dropped"] <= dropped <= expect["dropped"] + got["accidental_allowed"]
    else:
        got["ok"] = dropped == expect["dropped"]
    got["expected"] = expect.get("removed_segments", expect.get("dropped"))
    return got


def run_pass(stage_name: str, rows: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    driver.SHUFFLE_METHOD = args.shuffle
    folder = tmp / f"{stage_name}-{rows}"
    t0 = time.perf_counter()
    made = in_child(make_inputs, stage_name, rows, args.rows_per_partition, str(folder / "input"),
                    args.duplicates, args.dim)  # in a child: the driver's memory stays the pass's
    made_s = time.perf_counter() - t0
    stage = stage_config(stage_name, folder / "input")
    files = [Path(f) for f in made["files"]]
    cluster = BenchCluster(args.workers, folder)
    try:
        pids = {f"worker{i}": pid for i, pid in enumerate(cluster.worker_pids)}
        pids.update(driver=os.getpid(), scheduler=cluster.scheduler_pid)
        sent0 = cluster.bytes_sent()
        with cluster.client.as_current(), Peaks(pids) as peaks, get_task_stream(cluster.client) as stream:
            t0 = time.perf_counter()
            live = read_live(files, stage.columns, [made["kind"]] * len(files))
            dropped, decisions, inputs = decide_global(stage, live, folder / "decisions", folder / "global-input",
                                                       live_schema(files, stage.columns))
            seconds = time.perf_counter() - t0
        tasks, sent, digests = cluster.tasks_done(), cluster.bytes_sent() - sent0, cluster.byte_digests()
        at_peak = peak_tasks(stream.data, cluster.client.run(os.getpid), peaks)
        busiest = task_seconds(stream.data)
    finally:
        t0 = time.perf_counter()
        cluster.close()
        close_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcome = check(stage_name, made["expect"], decisions, rows, stage.summary() or {})
    outcome["check_s"] = round(time.perf_counter() - t0, 1)
    mib = {name: round(v / 2**20, 1) for name, v in peaks.peak.items()}
    result = {
        "stage": stage_name, "rows": rows, "partitions": len(files), "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds), "us_per_row": round(1e6 * seconds / rows, 2),
        "peak_worker_rss_mib": max(v for k, v in mib.items() if k.startswith("worker")),
        "worker_rss_mib": [v for k, v in mib.items() if k.startswith("worker")],
        "driver_peak_rss_mib": mib["driver"], "scheduler_peak_rss_mib": mib["scheduler"],
        "tasks": tasks, "worker_peak_tasks": at_peak, "task_seconds": busiest, "summary": stage.summary() or {}, "bytes_between_workers": sent, "worker_byte_digests": digests, "inputs_made_s": round(made_s, 1),
        "cluster_close_s": round(close_s, 1), **outcome,
    }
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------
# The engine's own cost per partition: a whole run of many small partitions
# ---------------------------------------------------------------------------------------------


def make_corpus(partitions: int, rows: int, path: str) -> None:
    """A text corpus of partitions x rows short documents (two paragraphs; every 10th document's
    second paragraph repeats another's), one parquet file."""
    rng = np.random.default_rng(0)
    n = partitions * rows
    words = np.array(["data", "model", "image", "text", "curation", "shard", "cluster", "token", "pixel",
                      "caption", "sample", "batch", "epoch", "layer", "vision", "language"])
    picks = rng.integers(0, len(words), size=(n, 8))
    firsts = [" ".join(w) + f" {i}." for i, w in enumerate(words[picks].tolist())]
    seconds = [f"paragraph number {i if i % 10 else i // 10} of the boilerplate kind." for i in range(n)]
    texts = [a + "\n\n" + b for a, b in zip(firsts, seconds)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100_000)


def partitions_run(partitions: int, rows: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """`run_recipe` over a text corpus cut into `partitions` partitions of `rows` records: a
    cheap row stage (paragraph_hash), a global pass (paragraph_dedup) and pack, on the bench
    cluster, timed as a whole. Two runs of the same rows in 1,000 and 10,000 partitions give the
    engine's own cost per partition (markers, plan, futures, manifest) as their difference."""
    folder = tmp / f"run-{partitions}x{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.parquet"
    in_child(make_corpus, partitions, rows, str(corpus))
    recipe = parse_recipe({
        "name": "partitions-bench",
        "sources": [{"kind": "text_corpus", "name": "corpus", "path": str(corpus), "id_column": None,
                     "url_column": None, "records_per_partition": rows}],
        "stages": [{"kind": "paragraph_hash"}, {"kind": "paragraph_dedup"}],
        "output": {"path": str(folder / "out")},
    })
    cluster = BenchCluster(args.workers, folder)
    try:
        pids = {f"worker{i}": pid for i, pid in enumerate(cluster.worker_pids)}
        pids.update(driver=os.getpid(), scheduler=cluster.scheduler_pid)
        with Peaks(pids) as peaks:
            t0 = time.perf_counter()
            manifest = run_recipe(recipe, client=cluster.client, progress=False)
            seconds = time.perf_counter() - t0
        tasks = cluster.tasks_done()
    finally:
        cluster.close()
    counts = manifest.get("counts", {})
    mib = {name: round(v / 2**20, 1) for name, v in peaks.peak.items()}
    out = folder / "out"
    work_bytes = sum(f.stat().st_size for f in (out / "_work").rglob("*") if f.is_file())
    result = {
        "partitions": partitions, "rows_per_partition": rows, "rows": partitions * rows,
        "seconds": round(seconds, 1), "ms_per_partition": round(1000 * seconds / partitions, 1),
        "us_per_row": round(1e6 * seconds / (partitions * rows), 1), "tasks": tasks,
        "inputs": counts.get("inputs"), "kept": counts.get("kept"),
        "peak_worker_rss_mib": max(v for k, v in mib.items() if k.startswith("worker")),
        "driver_peak_rss_mib": mib["driver"], "scheduler_peak_rss_mib": mib["scheduler"],
        "manifest_bytes": (out / "manifest.json").stat().st_size, "work_bytes_left": work_bytes,
        "ok": counts.get("inputs") == partitions * rows,
    }
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "dask": dask.__version__}


def print_row(r: dict[str, Any]) -> None:
    print(f"{r['stage']:<20} {r['rows']:>10,} {r['seconds']:>8.1f} s {r['rows_per_s']:>9,}/s "
          f"{r['us_per_row']:>7.2f} us/row  workers {r['peak_worker_rss_mib']:>7.0f} MiB  "
          f"driver {r['driver_peak_rss_mib']:>5.0f}  scheduler {r['scheduler_peak_rss_mib']:>5.0f}  "
          f"tasks {r['tasks']:>6}  sent {r['bytes_between_workers'] / 2**20:>7.1f} MiB  "
          f"{'ok' if r['ok'] else 'WRONG'} ({r.get('removed_segments', r['dropped'])} of {r['expected']})",
          flush=True)


def markdown(report: dict[str, Any]) -> str:
    """The report as BENCHMARKS.md's tables: per pass, each size's seconds and us per row, the
    per-row ratio to the smallest size, and peak memory; then the whole runs."""
    by_stage: dict[str, dict[int, dict[str, Any]]] = {}
    for p in report.get("passes", []):
        by_stage.setdefault(p["stage"], {})[p["rows"]] = p
    sizes = sorted({p["rows"] for p in report.get("passes", [])})
    label = {n: f"{n / 1e6:g}M" for n in sizes}
    lines = ["| pass | " + " | ".join(f"{label[n]}: s (us/row)" for n in sizes)
             + " | per-row time vs " + label[sizes[0]] + " | peak worker RSS, MiB | driver / scheduler peak, MiB"
             + " | tasks | outcome |",
             "|---|" + "---:|" * len(sizes) + "---:|---:|---:|---:|---|"] if sizes else []
    for stage in [s for s in PASSES if s in by_stage]:
        runs = by_stage[stage]
        first = runs[min(runs)]
        cells = [f"{runs[n]['seconds']:.1f} ({runs[n]['us_per_row']:.1f})" if n in runs else "" for n in sizes]
        ratios = ", ".join(f"{label[n]} {runs[n]['us_per_row'] / first['us_per_row']:.2f}x" for n in sorted(runs)
                           if n != min(runs)) or "-"
        memory = " / ".join(f"{runs[n]['peak_worker_rss_mib']:,.0f}" for n in sorted(runs))
        others = (f"{max(r['driver_peak_rss_mib'] for r in runs.values()):,.0f} / "
                  f"{max(r['scheduler_peak_rss_mib'] for r in runs.values()):,.0f}")
        tasks = " / ".join(f"{runs[n]['tasks']:,}" for n in sorted(runs))
        ok = "all checked" if all(r["ok"] for r in runs.values()) else "WRONG"
        lines.append(f"| `{stage}` | " + " | ".join(cells) + f" | {ratios} | {memory} | {others} | {tasks} | {ok} |")
    whole = report.get("partitions_runs", [])
    if whole:
        lines += ["", "| whole run | rows | seconds | ms per partition | us per row | tasks | peak worker / driver / "
                  "scheduler RSS, MiB | manifest bytes |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in whole:
            lines.append(f"| {r['partitions']:,} partitions x {r['rows_per_partition']:,} rows | {r['rows']:,} | "
                         f"{r['seconds']} | {r['ms_per_partition']} | {r['us_per_row']} | {r['tasks']:,} | "
                         f"{r['peak_worker_rss_mib']:,.0f} / {r['driver_peak_rss_mib']:,.0f} / "
                         f"{r['scheduler_peak_rss_mib']:,.0f} | {r['manifest_bytes']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--stages", nargs="+", default=PASSES, choices=PASSES)
    parser.add_argument("--rows-per-partition", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duplicates", type=float, default=0.1)
    parser.add_argument("--dim", type=int, default=64, help="semantic_dedup's embedding width")
    parser.add_argument("--shuffle", choices=["tasks", "p2p"], default=driver.SHUFFLE_METHOD,
                        help=f"dask's shuffle method for the passes (default: the runner's, {driver.SHUFFLE_METHOD})")
    parser.add_argument("--partitions-run", nargs="+", metavar="PARTITIONSxROWS",
                        help="instead of the passes, whole runs of a text corpus in so many partitions of so "
                             "many rows each, e.g. 1000x1000 10000x100")
    parser.add_argument("--json", help="write the results here (appended to what it holds)")
    parser.add_argument("--keep", action="store_true", help="keep the inputs and outputs")
    parser.add_argument("--tmp", help="where to write (default: a temporary folder)")
    parser.add_argument("--table", metavar="JSON", help="only print the markdown tables of a report")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return 0
    report: dict[str, Any] = {"machine": machine(), "passes": []}
    if args.json and Path(args.json).exists():
        report = json.loads(Path(args.json).read_text())
        report.setdefault("passes", [])
    report["machine"] = machine()
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="mm1-global-bench-"))
    ok = True
    try:
        if args.partitions_run:
            for shape in args.partitions_run:
                partitions, rows = (int(x) for x in shape.split("x"))
                result = in_child(partitions_run, partitions, rows, args, tmp)
                ok &= bool(result["ok"])
                report.setdefault("partitions_runs", []).append(result)
                print(json.dumps(result), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=1))
        else:
            for rows in args.rows:
                for stage in args.stages:
                    r = in_child(run_pass, stage, rows, args, tmp)
                    ok &= bool(r["ok"])
                    print_row(r)
                    report["passes"] = [p for p in report["passes"] if (p["stage"], p["rows"]) != (stage, rows)]
                    report["passes"].append(r)
                    if args.json:
                        Path(args.json).write_text(json.dumps(report, indent=1))
    finally:
        if not args.tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

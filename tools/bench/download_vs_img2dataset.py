"""Images/s per core of our URL-list download + resize, side by side with img2dataset.

Issue 5's goal: on the same URL list of real images of varied sizes and formats, served from
loopback by a server that is not the bottleneck, doing identical work (the smaller side resized to
256, JPEG quality 95, every image re-encoded, WebDataset tars out), our pipeline should reach at
least 1.5x img2dataset's images/s per core. Both run in one invocation, one after the other, on
the same cores, the same server and the same URLs.

- The corpus: distinct crops, resizes and mosaics of the colour photographs that ship inside
  scikit-image and scikit-learn, long sides from 200 to 2000 px (log-uniform) plus 5% of about
  3000 px (JPEGs, as cameras write them); JPEG mostly (qualities 75..95, some progressive, some
  4:4:4), some PNG and WebP, all well-formed. `--unique` distinct images behind `--urls` paths.
- The server: a minimal asyncio HTTP/1.1 server (keep-alive, or close on `Connection: close` as
  urllib asks) serving the pool from memory, in its own process so it takes no GIL from the
  clients. Its capacity is measured by a plain concurrent GET loop (a new connection per request,
  the costlier pattern) and its CPU seconds during each run are reported.
- Ours: `url_list` -> `download` (`--threads`, 127.0.0.0/8 allowed) -> `image` (keep_ratio 256,
  jpg q95) -> pack, through `curate.engine.driver.run_recipe` on a LocalCluster of `--workers`
  processes x 1 thread, the cluster's start included in the wall time.
- img2dataset: `img2dataset.download(...)` with the same size, mode, format and quality,
  `--workers` processes x `--threads` threads, webdataset output; its process start included.
- Both get the same number of URLs per task (`--per-shard`), a multiple of `--workers` tasks.
- Each run is a fresh child process. Peak RSS per process is the kernel's high-water mark
  (`VmHWM` in /proc/PID/status), read for the child's whole process tree every 0.1 s; a "worker"
  is a process started by multiprocessing's spawn that ran the download threads (dask's workers,
  img2dataset's pool; not img2dataset's stats logger). RSS counts shared pages (the libraries)
  in every process, so the tree's total overstates what the processes use together.
- images/s per core = images / wall seconds / `--workers` (= the cores the run is given).
- The machine may be shared: the CPU that other processes used during each run is reported
  (the system's busy time less the run's, the server's and this process's). `--repeat N` runs
  both N times, alternating which goes first, and reports each pipeline's median run.
- `--dask-config KEY=JSON` (repeatable) adds a third column: ours again under those dask
  settings, e.g. without the nanny's `MALLOC_TRIM_THRESHOLD_` or the workers' sampling profiler.

    python -m tools.bench.download_vs_img2dataset [--urls 5000] [--workers 2] [--threads 32] [--repeat 3]
    python -m tools.bench.download_vs_img2dataset --profile     # where our partition spends its time
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import csv
import glob
import http.client
import io
import json
import math
import multiprocessing as mp
import os
import platform
import pstats
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import numpy as np
import psutil
from PIL import Image

from tools.bench import cpu_model

# img2dataset imports albumentations (which asks PyPI for its latest version on import unless
# told not to) and wandb: neither may touch the network here. Set before any import of either,
# and inherited by every child process.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# Every process that multiprocessing spawns re-imports this module (as `__mp_main__`): the image
# server, img2dataset's pool workers, our dask workers, worker_scaling's workers. Their start is
# timed and their peak RSS reported, so the top imports only what costs them next to nothing:
# the standard library, numpy (which both pipelines' workers load anyway), Pillow and psutil (a few
# MiB). pyarrow (0.2 s), dask and curate (over 1 s and about 50 MiB a process) are imported where used.

IMAGE_SIZE = 256
RESIZE_MODE = "keep_ratio"
ENCODE_FORMAT = "jpg"
QUALITY = 95
LARGE_FRACTION = 0.05
_CTYPES = {"jpg": b"image/jpeg", "png": b"image/png", "webp": b"image/webp"}


# ---------------------------------------------------------------------------------------------
# The corpus: real photographs, varied sizes and formats, well-formed
# ---------------------------------------------------------------------------------------------


def _photographs() -> list[tuple[str, Any]]:
    # scikit-image and scikit-learn: optional (the demo extra), only to build the corpus
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
    photos = [(n, getattr(data, n)()) for n in names]
    sample = load_sample_images()
    photos += [(Path(f).stem, img) for f, img in zip(sample.filenames, sample.images)]
    return photos


def _render(photos: list[tuple[str, Any]], rng: Any, width: int, height: int) -> Any:
    """A width x height RGB picture: one photograph's crop, or for big pictures a mosaic of crops
    (so no tile is upscaled much more than 2x), with a little sensor noise so that upscaled regions
    still carry realistic entropy (and JPEG sizes like a camera's)."""
    cols = max(1, math.ceil(width / 1000))
    rows = max(1, math.ceil(height / 1000))
    canvas = np.empty((height, width, 3), np.uint8)
    xs = np.linspace(0, width, cols + 1).astype(int)
    ys = np.linspace(0, height, rows + 1).astype(int)
    for r in range(rows):
        for c in range(cols):
            tw, th = xs[c + 1] - xs[c], ys[r + 1] - ys[r]
            _, photo = photos[int(rng.integers(len(photos)))]
            ph, pw = photo.shape[:2]
            # the largest crop of the tile's aspect that fits, shrunk by up to 40%, placed at random
            scale = min(pw / tw, ph / th) * float(rng.uniform(0.6, 1.0))
            cw, ch = max(8, int(tw * scale)), max(8, int(th * scale))
            x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
            crop = Image.fromarray(np.ascontiguousarray(photo[y0 : y0 + ch, x0 : x0 + cw]))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            resample = Image.Resampling.LANCZOS if tw > cw else Image.Resampling.BOX
            canvas[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = np.asarray(crop.resize((tw, th), resample))
    noise = rng.integers(-4, 5, size=canvas.shape, dtype=np.int16)
    return np.clip(canvas.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def build_corpus(www: Path, n_unique: int, seed: int = 0) -> list[dict[str, Any]]:
    """Write `n_unique` distinct images to `www`; return one description per file."""
    www.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = _photographs()
    n_large = max(1, round(n_unique * LARGE_FRACTION)) if n_unique >= 10 else 0
    files = []
    for i in range(n_unique):
        large = bool(n_large) and i % max(1, n_unique // max(1, n_large)) == 0  # spread them out
        if large:  # a camera's picture: always a JPEG
            long_side = int(rng.integers(2800, 3201))
            n_large -= 1
        else:
            long_side = int(round(math.exp(rng.uniform(math.log(200), math.log(2000)))))
        aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0]))
        short_side = max(32, round(long_side / aspect))
        w, h = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
        pixels = _render(photos, rng, w, h)
        u = rng.random()
        fmt = "jpg" if large or u < 0.8 else "png" if u < 0.9 else "webp"
        buf = io.BytesIO()
        img = Image.fromarray(pixels)
        if fmt == "jpg":
            opts: dict[str, Any] = {"quality": int(rng.integers(75, 96))}
            if rng.random() < 0.2:
                opts["progressive"] = True
            if rng.random() < 0.2:
                opts["subsampling"] = 0  # 4:4:4, as some cameras and editors write
            img.save(buf, format="JPEG", **opts)
        elif fmt == "png":
            img.save(buf, format="PNG", compress_level=6)
        else:
            img.save(buf, format="WEBP", quality=int(rng.integers(75, 91)))
        name = f"u{i:05d}.{fmt}"
        (www / name).write_bytes(buf.getvalue())
        files.append({"name": name, "format": fmt, "width": w, "height": h, "bytes": buf.tell()})
    return files


def write_url_list(path: Path, base_url: str, files: list[dict[str, Any]], n_urls: int) -> list[str]:
    """A `url,caption` CSV of `n_urls` distinct URLs cycling over the pool; returns the URLs."""
    urls = []
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["url", "caption"])
        for i in range(n_urls):
            f = files[i % len(files)]
            url = f"{base_url}/img/{i:06d}/{f['name']}"
            urls.append(url)
            writer.writerow([url, f"photo {i}: a {f['width']}x{f['height']} picture from the sample photographs"])
    return urls


def describe_corpus(files: list[dict[str, Any]], n_urls: int) -> dict[str, Any]:
    served = [files[i % len(files)] for i in range(n_urls)]
    sides = sorted(max(f["width"], f["height"]) for f in served)
    formats: dict[str, int] = {}
    for f in served:
        formats[f["format"]] = formats.get(f["format"], 0) + 1
    return {
        "urls": n_urls,
        "unique_images": len(files),
        "formats": dict(sorted(formats.items())),
        "long_side_px": {"min": sides[0], "median": int(statistics.median(sides)), "max": sides[-1]},
        "large_ge_2800px": sum(s >= 2800 for s in sides),
        "mean_kib": round(sum(f["bytes"] for f in served) / len(served) / 1024, 1),
        "total_mib": round(sum(f["bytes"] for f in served) / 2**20, 1),
    }


# ---------------------------------------------------------------------------------------------
# The server: from memory, in its own process
# ---------------------------------------------------------------------------------------------


def _serve(www: str, conn: Any) -> None:
    """Process target: serve every file of `www` under any path whose last segment is its name."""
    files = {p.name.encode(): (_CTYPES[p.suffix.lstrip(".")], p.read_bytes()) for p in Path(www).iterdir()}

    class Http(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.buf = transport, b""
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                head, self.buf = self.buf[:end], self.buf[end + 4 :]
                line, _, headers = head.partition(b"\r\n")
                parts = line.split(b" ")
                target = parts[1] if len(parts) == 3 else b""
                close = parts[-1] == b"HTTP/1.0" or b"connection: close" in headers.lower()
                hit = files.get(target.split(b"?", 1)[0].rsplit(b"/", 1)[-1])
                status, ctype, body = (b"200 OK", *hit) if hit else (b"404 Not Found", b"text/plain", b"gone\n")
                self.transport.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                    + str(len(body)).encode() + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n"
                )
                self.transport.write(body)
                if close:
                    self.transport.close()
                    return
            if len(self.buf) > 65536:
                self.transport.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(Http, "127.0.0.1", 0, backlog=2048))
    conn.send(server.sockets[0].getsockname()[1])
    loop.run_forever()


class ImageServer:
    """`with ImageServer(www) as srv:` serves `www` on 127.0.0.1 from a separate process."""

    def __init__(self, www: Path):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(str(www), child), daemon=True, name="bench-http")
        self.process.start()
        if not parent.poll(60):
            self.process.kill()
            raise RuntimeError("the image server did not start")
        self.base_url = f"http://127.0.0.1:{parent.recv()}"

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.process.pid).cpu_times()
        return t.user + t.system

    def close(self) -> None:
        self.process.terminate()
        self.process.join(10)

    def __enter__(self) -> ImageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _get_loop(urls: list[str], threads: int) -> tuple[int, int]:
    """Process target: GET every URL, one new connection per request; (requests, bytes)."""
    def get(url: str) -> int:
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", u.path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200, resp.status
        return len(body)

    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(get, urls))
    return len(sizes), sum(sizes)


def server_capacity(server: ImageServer, urls: list[str], processes: int = 2, threads: int = 16) -> dict[str, Any]:
    """A plain concurrent GET loop against the server: a lower bound on what it serves (the
    clients share the same cores and pay for Python's HTTP client)."""
    ctx = mp.get_context("spawn")
    chunks = [urls[i::processes] for i in range(processes)]
    cpu0 = server.cpu_seconds()
    with ctx.Pool(processes) as pool:
        pool.apply(len, ([],))  # started before the clock
        t0 = time.perf_counter()
        results = pool.starmap(_get_loop, [(c, threads) for c in chunks])
        seconds = time.perf_counter() - t0
    n, nbytes = map(sum, zip(*results))
    return {
        "requests": n,
        "seconds": round(seconds, 2),
        "requests_per_s": round(n / seconds, 1),
        "mib_per_s": round(nbytes / seconds / 2**20, 1),
        "server_cpu_s": round(server.cpu_seconds() - cpu0, 2),
        "clients": f"{processes} processes x {threads} threads, a new connection per request",
    }


# ---------------------------------------------------------------------------------------------
# The two runs (each in a fresh child process)
# ---------------------------------------------------------------------------------------------


def our_recipe(url_csv: Path, out: Path, workers: int, threads: int, per_partition: int, batch_size: int) -> Any:
    from curate.recipe import parse_recipe  # not at the top, which spawned workers re-import (note there)

    return parse_recipe(
        {
            "name": "bench-download",
            "sources": [{"kind": "url_list", "name": "web", "path": str(url_csv),
                         "records_per_partition": per_partition}],
            "stages": [
                {"kind": "download", "threads": threads, "deadline_s": 10,
                 "allow_networks": ["127.0.0.0/8"]},
                {"kind": "image", "resize_mode": RESIZE_MODE, "image_size": IMAGE_SIZE,
                 "format": ENCODE_FORMAT, "quality": QUALITY},
            ],
            "output": {"path": str(out), "shard_max_samples": per_partition},
            "cluster": {"n_workers": workers, "threads_per_worker": 1, "dashboard": False},
            "execution": {"batch_size": batch_size},
        }
    )


def _child_ours(a: dict[str, Any]) -> dict[str, Any]:
    # not at the top, which spawned workers re-import (the note there)
    import dask
    import distributed  # noqa: F401 - its defaults merge into dask's config on first import: before ours

    from curate.engine.driver import run_recipe  # not at the top either

    # Read by the LocalCluster's nannies in this process, and passed on to the workers they start.
    dask.config.set(a.get("dask_config") or {})

    recipe = our_recipe(Path(a["url_csv"]), Path(a["out"]), a["workers"], a["threads"], a["per_shard"],
                        a["batch_size"])
    t0 = time.perf_counter()
    manifest = run_recipe(recipe, restart=True, progress=False)
    seconds = time.perf_counter() - t0
    counts = manifest["counts"]
    return {"seconds": seconds, "inputs": counts["inputs"], "ok": counts["kept"], "failed": counts["dropped"],
            "failures": manifest["drops"]}


def _child_img2dataset(a: dict[str, Any]) -> dict[str, Any]:
    from img2dataset import download  # the peer (bench extra)

    t0 = time.perf_counter()
    download(
        url_list=a["url_csv"], input_format="csv", url_col="url", caption_col="caption",
        output_format="webdataset", output_folder=a["out"], processes_count=a["workers"],
        thread_count=a["threads"], image_size=IMAGE_SIZE, resize_mode=RESIZE_MODE,
        encode_format=ENCODE_FORMAT, encode_quality=QUALITY, number_sample_per_shard=a["per_shard"],
        timeout=10, retries=0, enable_wandb=False,
    )
    seconds = time.perf_counter() - t0
    ok = failed = 0
    failures: dict[str, int] = {}
    for path in glob.glob(os.path.join(a["out"], "*_stats.json")):
        stats = json.loads(Path(path).read_text())
        ok += stats["successes"]
        failed += stats["failed_to_download"] + stats["failed_to_resize"]
        for reason, n in stats.get("status_dict", {}).items():
            if reason != "success":
                failures[reason] = failures.get(reason, 0) + n
    return {"seconds": seconds, "inputs": ok + failed, "ok": ok, "failed": failed, "failures": failures}


_CHILDREN = {"ours": _child_ours, "ours_tuned": _child_ours, "img2dataset": _child_img2dataset}
TITLES = {"ours": "ours", "ours_tuned": "ours, tuned", "img2dataset": "img2dataset"}


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class TreeMemory:
    """Samples a process tree every `interval` s: each process's peak RSS (the kernel's VmHWM,
    exact up to the last sample before it exits), its role, and the tree's peak total RSS."""

    def __init__(self, root_pid: int, worker_threads: int, interval: float = 0.1):
        self.root_pid, self.worker_threads, self.interval = root_pid, worker_threads, interval
        self.peak_kib: dict[int, int] = {}
        self.cpu_s: dict[int, float] = {}
        self.threads: dict[int, int] = {}
        self.role: dict[int, str] = {}
        self.tree_peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")
        self._thread.start()

    @staticmethod
    def _role(proc: Any, root_pid: int) -> str:
        if proc.pid == root_pid:
            return "driver"
        try:
            cmd = " ".join(proc.cmdline())
        except Exception:  # noqa: BLE001 - gone already
            return "other"
        if "resource_tracker" in cmd or "forkserver" in cmd:
            return "helper"
        return "worker" if "spawn_main" in cmd else "other"

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in procs:
            hwm, rss = _status_kib(proc.pid, "VmHWM"), _status_kib(proc.pid, "VmRSS")
            if hwm is None:
                continue
            if proc.pid not in self.role:
                self.role[proc.pid] = self._role(proc, self.root_pid)
            self.peak_kib[proc.pid] = max(self.peak_kib.get(proc.pid, 0), hwm)
            total += rss or 0
            try:
                t = proc.cpu_times()
                self.cpu_s[proc.pid] = t.user + t.system
                self.threads[proc.pid] = max(self.threads.get(proc.pid, 0), proc.num_threads())
            except psutil.Error:
                pass
        self.tree_peak_kib = max(self.tree_peak_kib, total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()

        def mib(kib: int) -> float:
            return round(kib / 1024, 1)

        # Spawned processes that ran the download threads: img2dataset also spawns a stats logger
        # process (one thread, asleep most of the time), which is not a worker.
        spawned = [pid for pid in self.peak_kib if self.role[pid] == "worker"]
        workers = [self.peak_kib[pid] for pid in spawned if self.threads.get(pid, 0) >= self.worker_threads]
        return {
            "worker_peak_rss_mib": mib(max(workers, default=0)),
            "worker_peak_rss_each_mib": sorted(mib(k) for k in workers),
            "spawned_processes": sorted(
                ({"peak_rss_mib": mib(self.peak_kib[pid]), "cpu_s": round(self.cpu_s.get(pid, 0.0), 1),
                  "max_threads": self.threads.get(pid, 0)} for pid in spawned), key=lambda d: -d["cpu_s"]),
            "driver_peak_rss_mib": mib(self.peak_kib.get(self.root_pid, 0)),
            "tree_peak_rss_mib": mib(self.tree_peak_kib),
        }


def measure(which: str, args: dict[str, Any], server: ImageServer, workdir: Path) -> dict[str, Any]:
    """Run one pipeline in a fresh interpreter; its timing, counts, memory and CPU."""
    result_path = workdir / f"{which}.result.json"
    log_path = workdir / f"{which}.log"
    cmd = [sys.executable, "-m", "tools.bench.download_vs_img2dataset", "--child", which, json.dumps(args),
           str(result_path)]
    cpu0, sys0, me0 = server.cpu_seconds(), psutil.cpu_times(), psutil.Process().cpu_times()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        # img2dataset's workers are told from its stats logger (one thread) by their download
        # threads; ours are every spawned Dask worker (several threads from the start): a short run's
        # download pool can end between two samples, and under load it did (worker RSS read as 0)
        mem = TreeMemory(proc.pid, worker_threads=args["threads"] if which == "img2dataset" else 2)
        rc = proc.wait()
        memory = mem.stop()
    lifetime, sys1, me1 = time.perf_counter() - t0, psutil.cpu_times(), psutil.Process().cpu_times()
    server_cpu = server.cpu_seconds() - cpu0
    if rc != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"the {which} run failed (exit {rc}); its log ends:\n{tail}")
    res = json.loads(result_path.read_text())
    n, seconds = res["ok"], res["seconds"]
    # Whatever else ran on the machine meanwhile (it is shared): the system's busy CPU less this
    # run's tree, the server and this process.
    busy = sum(getattr(sys1, f) - getattr(sys0, f) for f in ("user", "nice", "system", "irq", "softirq"))
    ours = res["cpu_s"] + server_cpu + (me1.user + me1.system - me0.user - me0.system)
    foreign = max(0.0, busy - ours)
    return {
        **res,
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 1),
        "images_per_s_per_core": round(n / seconds / args["workers"], 1),
        "cpu_s": round(res["cpu_s"], 1),
        "cpu_ms_per_image": round(1000 * res["cpu_s"] / max(1, n), 2),
        "server_cpu_s": round(server_cpu, 2),
        "foreign_cpu_s": round(foreign, 1),
        "foreign_cpu_share": round(foreign / (lifetime * (os.cpu_count() or 1)), 3),
        "steal_s": round(getattr(sys1, "steal", 0.0) - getattr(sys0, "steal", 0.0), 1),
        **memory,
    }


def _child_main(which: str, args_json: str, result_path: str) -> None:
    res = _CHILDREN[which](json.loads(args_json))
    # CPU of this process and of every descendant it waited for (the workers, after they exit)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    res["cpu_s"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    Path(result_path).write_text(json.dumps(res))


def compare_outputs(ours_out: Path, theirs_out: Path) -> dict[str, Any]:
    """Output sizes per URL, ours against img2dataset's (their rounding may differ by a pixel)."""
    # pyarrow: 0.2 s that worker_scaling's dask workers would pay in their timed start (note at the top)
    import pyarrow as pa
    import pyarrow.parquet as pq

    def sizes(files: list[Path]) -> dict[str, tuple[int, int]]:
        table = pa.concat_tables([pq.read_table(f, columns=["url", "width", "height"]) for f in files])
        return {u: (w, h) for u, w, h in zip(*(table.column(c).to_pylist() for c in ("url", "width", "height")))}

    ours = sizes(sorted((ours_out / "pairs").glob("*.parquet")))
    theirs = sizes(sorted(theirs_out.glob("*.parquet")))
    common = [u for u in ours if u in theirs]
    same = sum(ours[u] == theirs[u] for u in common)
    close = sum(max(abs(a - b) for a, b in zip(ours[u], theirs[u])) <= 1 for u in common)
    return {"compared": len(common), "same_size": same, "within_1px": close,
            "min_side_256": sum(min(ours[u]) == IMAGE_SIZE for u in common)}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("img2dataset", "pillow", "opencv-python-headless", "dask",
                                             "pyarrow")},
    }


def default_per_shard(urls: int, workers: int) -> int:
    return max(1, min(500, math.ceil(urls / (2 * workers))))


def bench(urls: int = 5000, workers: int = 2, threads: int = 32, per_shard: int | None = None,
          batch_size: int = 128, unique: int = 500, seed: int = 0, repeat: int = 1,
          dask_config: dict[str, Any] | None = None, log: Any = print) -> dict[str, Any]:
    """Build the corpus, start the server, measure its capacity, run both pipelines `repeat`
    times (alternating which goes first); the report, with each pipeline's median run.

    `dask_config`: also run ours with these dask settings ("ours_tuned"), beside the defaults."""
    per_shard = per_shard or default_per_shard(urls, workers)
    report: dict[str, Any] = {"machine": machine(), "settings": {
        "urls": urls, "workers": workers, "threads": threads, "per_shard": per_shard, "batch_size": batch_size,
        "repeat": repeat, "image_size": IMAGE_SIZE, "resize_mode": RESIZE_MODE, "format": ENCODE_FORMAT,
        "quality": QUALITY, "dask_config_tuned": dask_config}}
    report["machine"]["load_avg_1m_at_start"] = round(psutil.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-dl-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        files = build_corpus(root / "www", min(unique, urls), seed)
        report["corpus"] = describe_corpus(files, urls)
        log(f"corpus: {report['corpus']} (built in {time.perf_counter() - t0:.0f}s)")
        with ImageServer(root / "www") as server:
            url_csv = root / "urls.csv"
            url_list = write_url_list(url_csv, server.base_url, files, urls)
            report["server"] = server_capacity(server, url_list)
            log(f"server capacity (plain GET loop): {report['server']}")
            args = {"url_csv": str(url_csv), "workers": workers, "threads": threads, "per_shard": per_shard,
                    "batch_size": batch_size}
            names = ["ours", "ours_tuned", "img2dataset"] if dask_config else ["ours", "img2dataset"]
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for r in range(repeat):
                for which in names if r % 2 == 0 else names[::-1]:
                    out = root / f"out-{which}"
                    shutil.rmtree(out, ignore_errors=True)
                    extra = {"dask_config": dask_config} if which == "ours_tuned" else {}
                    runs[which].append(measure(which, {**args, **extra, "out": str(out)}, server, root))
                    log(f"{which} (run {r + 1}/{repeat}): {runs[which][-1]}")
        report["outputs"] = compare_outputs(root / "out-ours", root / "out-img2dataset")
    for which, done in runs.items():
        ranked = sorted(done, key=lambda run: run["images_per_s"])
        report[which] = {**ranked[(len(ranked) - 1) // 2], "runs": [
            {k: run[k] for k in ("ok", "failed", "images_per_s", "seconds", "foreign_cpu_share")} for run in done]}
    theirs = report["img2dataset"]["images_per_s_per_core"]
    report["ratio"] = round(report["ours"]["images_per_s_per_core"] / theirs, 2)
    report["goal_met"] = report["ratio"] >= 1.5
    if dask_config:
        report["ratio_tuned"] = round(report["ours_tuned"]["images_per_s_per_core"] / theirs, 2)
    return report


def print_table(report: dict[str, Any]) -> None:
    names = [name for name in TITLES if name in report]
    rows = [
        ("images ok / inputs", lambda r: f"{r['ok']} / {r['inputs']}"),
        ("wall seconds", lambda r: f"{r['seconds']}"),
        ("images/s", lambda r: f"{r['images_per_s']}"),
        ("images/s per core", lambda r: f"{r['images_per_s_per_core']}"),
        ("CPU ms per image (all processes)", lambda r: f"{r['cpu_ms_per_image']}"),
        ("peak RSS per worker (MiB)", lambda r: f"{r['worker_peak_rss_mib']}"),
        ("peak RSS, driver (MiB)", lambda r: f"{r['driver_peak_rss_mib']}"),
        ("peak RSS, whole tree (MiB)", lambda r: f"{r['tree_peak_rss_mib']}"),
        ("server CPU s during the run", lambda r: f"{r['server_cpu_s']}"),
        ("other processes' CPU (share of cores)", lambda r: f"{r['foreign_cpu_share']:.1%}"),
    ]
    if report["settings"]["repeat"] > 1:
        rows.append(("images/s of each run (median above)",
                     lambda r: " ".join(f"{run['images_per_s']:g}" for run in r["runs"])))
    cells = [[cell(report[name]) for name in names] for _, cell in rows]
    width = max(12, *(len(c) for line in cells for c in line), *(len(TITLES[n]) for n in names))
    print(f"| {'':38} | " + " | ".join(f"{TITLES[n]:>{width}}" for n in names) + " |")
    print(f"|{'-' * 40}|" + "|".join("-" * (width + 1) + ":" for _ in names) + "|")
    for (label, _), line in zip(rows, cells):
        print(f"| {label:38} | " + " | ".join(f"{c:>{width}}" for c in line) + " |")
    print(f"ratio ours / img2dataset (images/s per core): {report['ratio']:.2f}x; "
          f"goal 1.5x {'met' if report['goal_met'] else 'NOT met'}")
    if "ratio_tuned" in report:
        print(f"ratio ours, tuned / img2dataset: {report['ratio_tuned']:.2f}x "
              f"(dask settings {json.dumps(report['settings']['dask_config_tuned'])})")


# ---------------------------------------------------------------------------------------------
# --profile: where one of our partitions spends its time, in-process
# ---------------------------------------------------------------------------------------------


def _timed(record: dict[str, list[float]], name: str, fn: Any) -> Any:
    """`fn` wrapped to add its wall and process CPU seconds to record[name]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc = record.setdefault(name, [0.0, 0.0])
            acc[0] += time.perf_counter() - t
            acc[1] += time.process_time() - c

    return wrapper


def _partition(job: Any) -> int:
    """Run partition 0's three tasks (segment, plan, pack) from scratch; its row count."""
    # at call time: profile() patches these names in curate.engine.steps, and its workers re-import
    # this module (the note at the top)
    from curate.engine.driver import prepare_output
    from curate.engine.pack import cut_shards
    from curate.engine.steps import run_pack, run_plan, run_segment

    prepare_output(job, restart=True)
    seg = run_segment(job, 0, 0)
    plan = run_plan(job, 0)
    run_pack(job, 0, cut_shards(job.kinds, {0: plan["footprints"]}, job.recipe.output)[0])
    return int(seg["rows"])


def profile(urls: int, threads: int, per_shard: int, batch_size: int, unique: int, seed: int,
            top: int = 30) -> None:
    """Where one of our partitions spends its time, in this process (one core's worth of work):

    1. the three per-partition tasks timed step by step (wall and CPU seconds, no profiler);
    2. the same under cProfile counting CPU time per thread (`time.thread_time`), the download
       stage's fetch threads included and merged into one table;
    3. the resize step alone, per image and format, ours against img2dataset's `Resizer`."""
    # not at the top, which spawned workers re-import (the note there)
    import curate.engine.steps as tasks
    from curate.engine.driver import plan_job
    from curate.engine.steps import run_segment
    from curate.stages.download import DownloadStage
    from curate.stages.image import ImageConfig, ImageStage, transform_image

    with tempfile.TemporaryDirectory(prefix="bench-dl-prof-") as tmp:
        root = Path(tmp)
        files = build_corpus(root / "www", min(unique, urls), seed)
        with ImageServer(root / "www") as server:
            write_url_list(root / "urls.csv", server.base_url, files, urls)
            job = plan_job(our_recipe(root / "urls.csv", root / "out", 1, threads, per_shard, batch_size))
            _partition(job)  # warm: imports, the stage's setup, its thread pool and connections

            # 1. step by step, no profiler
            steps: dict[str, list[float]] = {}
            with mock.patch.object(DownloadStage, "process", _timed(steps, "download", DownloadStage.process)), \
                    mock.patch.object(ImageStage, "process", _timed(steps, "image", ImageStage.process)), \
                    mock.patch.object(tasks, "run_segment", _timed(steps, "segment", run_segment)), \
                    mock.patch.object(tasks, "run_plan", _timed(steps, "plan", tasks.run_plan)), \
                    mock.patch.object(tasks, "run_pack", _timed(steps, "pack", tasks.run_pack)):
                server_cpu = server.cpu_seconds()
                t, c = time.perf_counter(), time.process_time()
                rows = _partition(job)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                server_cpu = server.cpu_seconds() - server_cpu
            seg_w, seg_c = steps["segment"]
            other = [seg_w - steps["download"][0] - steps["image"][0],
                     seg_c - steps["download"][1] - steps["image"][1]]
            print(f"partition 0: {rows} rows in {wall:.2f}s wall, {cpu:.2f}s CPU, one process, no profiler: "
                  f"{rows / wall:.1f} images/s on one core ({1000 * cpu / rows:.2f} ms CPU per image; "
                  f"the server used {server_cpu:.2f}s CPU)")
            print(f"  {'step':58} {'wall s':>7} {'CPU s':>7} {'CPU ms/image':>13}")
            for label, (w, c) in [
                ("download stage (fetches on its threads; Arrow <-> rows)", steps["download"]),
                ("image stage (decode, resize, encode, sha256)", steps["image"]),
                ("rest of the segment task (read the list, parquet write)", other),
                ("plan task", steps["plan"]),
                ("pack task (read back, tars, sidecars, ledger)", steps["pack"]),
            ]:
                print(f"  {label:58} {w:7.2f} {c:7.2f} {1000 * c / rows:13.2f}")

            # 2. cProfile on CPU time, every thread that works for the partition
            profiles: list[cProfile.Profile] = []
            local = threading.local()
            fetch = DownloadStage._fetch

            def profiled_fetch(self: Any, url: str) -> Any:
                prof = getattr(local, "prof", None)
                if prof is None:
                    prof = local.prof = cProfile.Profile(time.thread_time)
                    profiles.append(prof)
                prof.enable()
                try:
                    return fetch(self, url)
                finally:
                    prof.disable()

            main_prof = cProfile.Profile(time.thread_time)
            with mock.patch.object(DownloadStage, "_fetch", profiled_fetch):
                main_prof.enable()
                _partition(job)
                main_prof.disable()
        stats = pstats.Stats(main_prof)
        for prof in profiles:
            stats.add(prof)
        by_func = {f"{Path(k[0]).name}:{k[2]}": v for k, v in stats.stats.items()}  # type: ignore[attr-defined]
        print(f"\nunder cProfile (CPU seconds by thread CPU clock, {len(profiles)} fetch threads merged in):")
        for label, key in [
            ("fetches (Fetcher.fetch, on the download threads)", "fetcher.py:fetch"),
            ("  reading bodies (Fetcher._read_body)", "fetcher.py:_read_body"),
            ("download stage's own thread (to_pylist, digest, from_pylist)", "download.py:process"),
            ("image stage", "base.py:process"),
            ("  transform_image", "image.py:transform_image"),
            ("    Pillow decode (ImageFile.load)", "ImageFile.py:load"),
            ("    Pillow resize", "Image.py:resize"),
            ("    Pillow encode (Image.save)", "Image.py:save"),
            ("sha256 (image_digest, both stages)", "contract.py:image_digest"),
            ("parquet write of the intermediate (ParquetWriter.write_table)", "core.py:write_table"),
            ("run_plan", "steps.py:run_plan"),
            ("run_pack", "steps.py:run_pack"),
        ]:
            hit = by_func.get(key)
            if hit is not None:
                print(f"  {label:64} {hit[3]:7.2f}s")
        out = io.StringIO()
        stats.stream = out  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(top)
        print("\n" + out.getvalue().strip())

        # 3. Per image, single-threaded, no I/O: the CPU each pipeline's resize step costs.
        from img2dataset.resizer import Resizer  # the peer (bench extra), loaded after steps 1 and 2

        cfg = ImageConfig(resize_mode=RESIZE_MODE, image_size=IMAGE_SIZE, format=ENCODE_FORMAT, quality=QUALITY)
        cfg_full = cfg.model_copy(update={"jpeg_draft": False})
        theirs = Resizer(image_size=IMAGE_SIZE, resize_mode=RESIZE_MODE, resize_only_if_bigger=False,
                         encode_format=ENCODE_FORMAT, encode_quality=QUALITY)
        per_kind: dict[str, list[float]] = {}
        for f in files:
            data = (root / "www" / f["name"]).read_bytes()
            kind = "large jpg" if max(f["width"], f["height"]) >= 2800 else f["format"]
            acc = per_kind.setdefault(kind, [0.0, 0.0, 0.0, 0])
            for i, fn in enumerate((lambda: transform_image(data, cfg), lambda: transform_image(data, cfg_full),
                                    lambda: theirs(io.BytesIO(data)))):
                t = time.process_time()
                fn()
                acc[i] += time.process_time() - t
            acc[3] += 1
        print("\nthe resize step alone, one thread, no I/O (CPU ms per image, each corpus image once):")
        print(f"  {'images':>10} {'n':>5} {'ours':>8} {'ours, no JPEG draft':>20} {'img2dataset':>12}")
        total = [0.0, 0.0, 0.0, 0]
        for kind, acc in sorted(per_kind.items()) + [("all", total)]:
            if kind != "all":
                total[:] = [t + a for t, a in zip(total, acc)]
            ms = [1000 * a / acc[3] for a in acc[:3]]
            print(f"  {kind:>10} {acc[3]:>5} {ms[0]:8.2f} {ms[1]:20.2f} {ms[2]:12.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="processes for each pipeline (the cores used)")
    parser.add_argument("--threads", type=int, default=32, help="downloads in flight per process")
    parser.add_argument("--per-shard", type=int, default=None,
                        help="URLs per partition (ours) and per shard (img2dataset); default "
                             "min(500, URLs / (2 x workers)): a multiple of --workers shards keeps either "
                             "pipeline from ending on one busy process")
    parser.add_argument("--batch-size", type=int, default=128, help="our execution.batch_size")
    parser.add_argument("--unique", type=int, default=500, help="distinct images behind the URLs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run both this many times, alternating which goes first; report the medians")
    parser.add_argument("--dask-config", action="append", default=[], metavar="KEY=JSON",
                        help="also run ours with this dask setting (repeatable), as a third column, e.g. "
                             "'distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_=null' (null unsets)")
    parser.add_argument("--profile", action="store_true", help="profile one of our partitions in-process")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_main(*args.child)
        return 0
    if args.per_shard is None:
        args.per_shard = default_per_shard(args.urls, args.workers)
    m = machine()
    print(f"machine: {m['arch']} {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB, Python {m['python']}; "
          + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    if args.profile:
        profile(args.per_shard, args.threads, args.per_shard, args.batch_size, args.unique, args.seed)
        return 0
    print(f"{args.urls} URLs; {args.workers} processes x {args.threads} download threads each; "
          f"resize {RESIZE_MODE} {IMAGE_SIZE}, {ENCODE_FORMAT} q{QUALITY}", flush=True)
    tuned = {}
    for item in args.dask_config:
        key, _, value = item.partition("=")
        try:
            tuned[key] = json.loads(value)
        except json.JSONDecodeError:
            tuned[key] = value
    report = bench(args.urls, args.workers, args.threads, args.per_shard, args.batch_size, args.unique, args.seed,
                   args.repeat, tuned or None, log=lambda s: print(s, flush=True))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    for which in (name for name in TITLES if name in report):
        for run in report[which]["runs"]:
            assert (run["ok"], run["failed"]) == (args.urls, 0), f"{which}: {run['ok']}/{args.urls} ok"
    print(f"outputs: {report['outputs']}")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

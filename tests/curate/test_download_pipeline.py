"""The URL-list path end to end, on loopback, under failure (issue 4).

One real HTTP server (tools.demo.server.LoopbackHTTPServer, in a thread of this process) serves
60 distinct real photographs (crops of scikit-image's bundled samples, JPEG and a few PNG, many
sizes), each after a small fixed delay, plus the failures web data is full of: a body dripped
slower than the deadline, bodies over the byte cap (with a Content-Length, without one read to
the close, chunked), a redirect, a 404 and a 500. A URL list (url, caption, license) names all of
them, a repeated URL, two URLs serving the same bytes, a tiny image and a malformed row, in
partitions of 6 records. Some URLs name `img.test`, which only the recipe's static host map
resolves; 127.0.0.0/8 is allowed explicitly.

The recipe: caption_length_filter -> url_dedup (global) -> download -> image -> image_size_filter
-> exact_dedup (global). The download stage runs in segment 1, after url_dedup's pass.

1. A clean in-process run on the session's LocalCluster (`shared_cluster`, once per module):
   every bad input is exactly one ledger row with its stable stage/code, the redirect is kept,
   the extra column reaches KEY.json and the sidecar, every input is accounted for once, and
   `mm1 verify` passes.
2. The `mm1 curate` driver (its own LocalCluster) SIGKILLed while segment 1 (the downloads) is
   under way, then rerun with `--address` on an external `dask scheduler` + two `dask worker`s:
   the external workers fetch what the killed run left, and the output is byte-identical to
   run 1 (a resume, and the external cluster giving the LocalCluster's bytes, in one rerun).

The server stays up across all of them (the URLs carry its port). Waits are bounded generously
(only a hang reaches them); nothing asserts on timings.
"""

from __future__ import annotations

import csv
import http.server
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from PIL import Image
from skimage import data as skdata

from curate.contract import LEDGER_DIR, read_ledger, read_manifest, read_sidecars
from curate.recipe import parse_recipe
from tools.demo.server import LoopbackHTTPServer
from tools.verify import verify

BIN = Path(sys.executable).parent
MM1 = str(BIN / "mm1") if (BIN / "mm1").exists() else shutil.which("mm1") or "mm1"
WAIT = 300  # seconds: many times what any step here takes; only a hang reaches it

N_IMAGES = 60
DELAY_S = 0.1  # every image answer waits this long: a run lasts long enough to be killed mid-download
DEADLINE_S = 2.0  # per request; 20x an image's delay, so only /slow ever reaches it
MAX_BYTES = 256 * 1024
BIG = 2_000_000  # bytes the /big* routes would send
DRIP_EVERY_S = 0.2  # /slow: one byte per tick, a body that would take hours
SLOW_LENGTH = 50_000
PER_PARTITION = 6
HOST = "img.test"  # resolved by the recipe's static host map only


# ---------------------------------------------------------------------------------------------
# The web: real images and failing routes, on 127.0.0.1
# ---------------------------------------------------------------------------------------------


def _photos() -> list[np.ndarray]:
    """RGB and grey photographs bundled with scikit-image (no download)."""
    return [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(),
            skdata.immunohistochemistry(), skdata.camera()]


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(array).save(buf, format="PNG", optimize=False)
    else:
        Image.fromarray(array).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def build_images() -> dict[str, bytes]:
    """N_IMAGES distinct crops (varied sizes, every tenth a PNG), plus `tiny.jpg` (20x16)."""
    photos = _photos()
    images: dict[str, bytes] = {}
    for i in range(N_IMAGES):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        png = i % 10 == 4
        cw = min(w, (96 + (i * 37) % 320) if not png else 80 + (i * 11) % 120)
        ch = min(h, (80 + (i * 53) % 280) if not png else 72 + (i * 13) % 110)
        x, y = (i * 29) % (w - cw + 1), (i * 17) % (h - ch + 1)
        name = f"photo{i:02d}.{'png' if png else 'jpg'}"
        images[name] = _encode(np.ascontiguousarray(photo[y : y + ch, x : x + cw]), "png" if png else "jpg")
    images["tiny.jpg"] = _encode(np.ascontiguousarray(photos[1][100:116, 200:220]), "jpg")
    assert len(set(images.values())) == len(images), "the served images must be distinct"
    assert max(map(len, images.values())) < MAX_BYTES
    return images


@dataclass
class Site:
    """What the server serves and what it saw."""

    images: dict[str, bytes]
    base: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    hits: Counter = field(default_factory=Counter)  # request path -> count
    slow_abandoned: int = 0  # /slow requests whose client hung up before the body was done

    def hit(self, path: str) -> None:
        with self.lock:
            self.hits[path] += 1

    def snapshot(self) -> Counter:
        with self.lock:
            return Counter(self.hits)


class _Handler(http.server.BaseHTTPRequestHandler):
    site: Site
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _head(self, status: int, ctype: str = "text/plain", length: int | None = 0, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain", **headers: str) -> None:
        self._head(status, ctype, len(body), **headers)
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        site, path = self.site, self.path.split("?")[0]
        site.hit(path)
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "img" and parts[1] in site.images:
            time.sleep(DELAY_S)
            ctype = "image/png" if parts[1].endswith(".png") else "image/jpeg"
            return self._send(200, site.images[parts[1]], ctype)
        if len(parts) == 2 and parts[0] == "redirect":
            return self._send(302, b"moved\n", Location=f"/img/{parts[1]}")
        if path == "/missing":
            return self._send(404, b"not found\n")
        if path == "/error":
            return self._send(500, b"server error\n")
        if path == "/slow":
            return self._drip()
        if path.startswith("/big"):
            return self._big(path)
        self._send(404, b"not found\n")

    def _drip(self) -> None:
        """Headers at once, then one byte per tick: slower than any deadline."""
        self._head(200, "image/jpeg", SLOW_LENGTH)
        try:
            for _ in range(SLOW_LENGTH):
                if self.site.stop.wait(DRIP_EVERY_S):
                    break
                self.wfile.write(b"\xff")
                self.wfile.flush()
        except (ConnectionError, OSError):
            with self.site.lock:
                self.site.slow_abandoned += 1
        self.close_connection = True

    def _big(self, path: str) -> None:
        """A body of BIG bytes: announced (/big), read to the close (/big-stream), chunked."""
        block = b"\xff\xd8\xff" + bytes(64 * 1024 - 3)
        chunked = path == "/big-chunked"
        if path == "/big":
            self._head(200, "image/jpeg", BIG)
        elif path == "/big-stream":
            self._head(200, "image/jpeg", None, Connection="close")
        elif chunked:
            self._head(200, "image/jpeg", None, Transfer_Encoding="chunked")
        else:
            return self._send(404, b"not found\n")
        self.close_connection = True
        sent = 0
        while sent < BIG and not self.site.stop.is_set():
            piece = block[: BIG - sent]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def site() -> Any:
    """The server, up for the whole module: every run fetches the same URLs (they name its port)."""
    images = build_images()
    images["copy_of_photo07.jpg"] = images["photo07.jpg"]  # the same bytes under two URLs
    s = Site(images)
    handler = type("PipelineHandler", (_Handler,), {"site": s})
    server = LoopbackHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="pipeline-http", daemon=True)
    thread.start()
    s.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield s
    finally:
        s.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


# ---------------------------------------------------------------------------------------------
# The URL list and the recipe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UrlList:
    path: Path
    records: int
    expected: dict[str, tuple[str, str]]  # url -> (stage, reason) for every input that must drop
    malformed_index: int
    redirect_url: str
    redirect_license: str
    repeated_url: str  # listed twice: url_dedup keeps one
    copies: tuple[str, str]  # two URLs serving the same bytes: exact_dedup keeps one
    good: list[str]  # urls that must be kept (the two copies aside)


def write_url_list(root: Path, site: Site) -> UrlList:
    port = site.base.rsplit(":", 1)[1]
    named = f"http://{HOST}:{port}"
    photos = sorted(n for n in site.images if n.startswith("photo"))
    redirect_target = photos[-1]  # reachable only through the redirect
    rows: list[list[str]] = []
    good: list[str] = []
    for i, name in enumerate(photos[:-1]):
        url = f"{named if i % 3 == 0 else site.base}/img/{name}"  # a third through the host map
        rows.append([url, f"crop number {i} of a sample photograph", f"cc-by-{i}"])
        good.append(url)
    redirect_url = f"{named}/redirect/{redirect_target}"
    rows.append([redirect_url, "a photograph behind a redirect", "cc0-redirected"])
    good.append(redirect_url)
    repeated = good[3]
    rows.append([repeated, "the same URL listed a second time", "cc-by-again"])
    copies = (f"{site.base}/img/photo07.jpg", f"{site.base}/img/copy_of_photo07.jpg")
    good.remove(copies[0])  # which of the two exact_dedup keeps is its business (the smaller id)
    rows.append([copies[1], "the same bytes under another name", "cc-by-copy"])
    bad = {
        f"{site.base}/slow": ("download", "timeout"),
        f"{site.base}/big": ("download", "too_large"),
        f"{named}/big-stream": ("download", "too_large"),
        f"{site.base}/big-chunked": ("download", "too_large"),
        f"{site.base}/missing": ("download", "http_404"),
        f"{named}/error": ("download", "http_500"),
        f"{site.base}/img/tiny.jpg": ("image_size_filter", "image_too_small"),
    }
    rows += [[url, f"an input that must drop as {reason}", "cc-by-bad"] for url, (_, reason) in bad.items()]
    random.Random(4).shuffle(rows)  # failures spread over the partitions, the same every time
    malformed_at = 23
    path = root / "urls.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption", "license"])
        writer.writerows(rows[:malformed_at])
        f.write(f"{site.base}/img/photo00.jpg,a row with one field too few\n")
        writer.writerows(rows[malformed_at:])
    expected = dict(bad)
    return UrlList(path, len(rows) + 1, expected, malformed_at, redirect_url, "cc0-redirected",
                   repeated, copies, good)


def recipe_data(urls: UrlList, out: Path) -> dict[str, Any]:
    return {
        "name": "download-pipeline-test",
        "sources": [{"kind": "url_list", "name": "web", "path": str(urls.path),
                     "records_per_partition": PER_PARTITION}],
        "stages": [
            {"kind": "caption_length_filter", "min_chars": 5, "max_chars": 1000},
            {"kind": "url_dedup"},
            {"kind": "download", "threads": 4, "deadline_s": DEADLINE_S, "max_bytes": "256KiB", "retries": 0,
             "max_redirects": 3, "allow_networks": ["127.0.0.0/8"], "hosts": {HOST: "127.0.0.1"}},
            {"kind": "image", "resize_mode": "keep_ratio", "image_size": 256, "format": "jpg",
             "quality": 90},
            {"kind": "image_size_filter", "min_width": 32, "min_height": 32},
            {"kind": "exact_dedup"},
        ],
        "output": {"path": str(out), "shard_max_samples": 8, "shard_max_bytes": "4MB"},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB", "dashboard": False},
        "execution": {"batch_size": 4},
    }


@dataclass(frozen=True)
class Clean:
    urls: UrlList
    out: Path
    manifest: dict[str, Any]
    pairs: dict[str, str]
    ledger: dict[str, str]
    hits: Counter  # what the server saw during the clean run


@pytest.fixture(scope="module")
def clean(site, output_checks, shared_cluster, tmp_path_factory) -> Clean:
    """The clean, uninterrupted in-process run every other run must equal (once per module), on
    the session's LocalCluster: its URLs name this module's server port, so no stage, robots.txt
    cache or host semaphore another run left on that cluster is this run's."""
    root = tmp_path_factory.mktemp("download-pipeline")
    urls = write_url_list(root, site)
    out = root / "curated"
    before = site.snapshot()
    manifest = shared_cluster.run(parse_recipe(recipe_data(urls, out), "<test recipe>"))
    hits = site.snapshot() - before
    return Clean(urls, out, manifest, output_checks.pairs_digests(out), output_checks.ledger_digests(out),
                 hits)


def _assert_same_output(clean: Clean, out: Path, checks: Any) -> None:
    got_pairs, got_ledger = checks.pairs_digests(out), checks.ledger_digests(out)
    assert sorted(got_pairs) == sorted(clean.pairs), "different shard files than the clean run"
    differ = sorted(k for k in clean.pairs if got_pairs[k] != clean.pairs[k])
    assert not differ, f"shards or sidecars differ from the clean run: {differ[:5]}"
    if got_ledger != clean.ledger:
        ours, theirs = _ledger_rows(out), _ledger_rows(clean.out)
        changed = [(i, ours.get(i), theirs.get(i)) for i in sorted(set(ours) | set(theirs))
                   if ours.get(i) != theirs.get(i)]
        raise AssertionError(f"the ledger differs from the clean run: {changed[:5]}")
    manifest = read_manifest(out)
    assert manifest["counts"] == clean.manifest["counts"]
    assert manifest["kinds"] == clean.manifest["kinds"]  # shard names, counts, bytes, sha256
    assert manifest["drops"] == clean.manifest["drops"]
    assert not checks.leftover_temporaries(out)
    checks.check_ledger_invariant(out)
    report = verify(out)
    assert report.ok, report.format()


def _ledger_rows(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read_ledger(out).to_pylist()}


def _markers(out: Path, step: str) -> list[Path]:
    done = out / "_work" / "done"
    return sorted(done.glob(f"{step}-*.json")) if done.exists() else []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_until(predicate, timeout: float = WAIT, every: float = 0.05, what: str = "a condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
    return value


# ---------------------------------------------------------------------------------------------
# 1. The clean run: every input accounted for once, under its stable code
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(WAIT * 2)
def test_clean_run_accounts_for_every_url(clean, site, output_checks):
    urls, out, manifest = clean.urls, clean.out, clean.manifest
    assert manifest["counts"]["partitions"] == -(-urls.records // PER_PARTITION) >= 10
    ledger = read_ledger(out).to_pylist()
    by_url: dict[str | None, list[dict[str, Any]]] = {}
    for row in ledger:
        by_url.setdefault(row["url"], []).append(row)

    # Each bad URL: exactly one ledger row, dropped by the right stage with its stable code.
    for url, (stage, reason) in urls.expected.items():
        rows = by_url.get(url, [])
        assert len(rows) == 1, f"{url}: {len(rows)} ledger rows"
        got = (rows[0]["outcome"], rows[0]["stage"], rows[0]["drop_reason"])
        assert got == ("dropped", stage, reason), f"{url}: {got} {rows[0]['drop_detail']}"
    slow = by_url[f"{site.base}/slow"][0]
    assert slow["drop_detail"] == f"deadline of {DEADLINE_S:g}s passed reading the body"
    big = by_url[f"{site.base}/big"][0]
    assert big["drop_detail"] == f"Content-Length {BIG} exceeds the cap of {MAX_BYTES} bytes"
    for name in ("big-stream", "big-chunked"):  # no Content-Length: stopped while reading
        row = next(r for u, rs in by_url.items() if u and u.endswith("/" + name) for r in rs)
        assert row["drop_detail"] == f"body exceeds the cap of {MAX_BYTES} bytes", row
    # The drip was abandoned by the client: the deadline, not the end of the body, ended it
    # (the server notices on its next write; the body would have taken hours).
    _wait_until(lambda: site.slow_abandoned >= clean.hits["/slow"] >= 1, timeout=60,
                what="the server to see the /slow client hang up")

    malformed = [r for r in ledger if r["id"] == f"web:urls.csv#{urls.malformed_index}"]
    assert len(malformed) == 1
    assert (malformed[0]["outcome"], malformed[0]["stage"], malformed[0]["drop_reason"]) == \
        ("dropped", "source", "malformed_row")
    assert "2 fields, the header has 3" in malformed[0]["drop_detail"]

    # The repeated URL: one row kept, one dropped by url_dedup (so it was fetched once).
    rep = sorted((r["outcome"], r["stage"], r["drop_reason"]) for r in by_url[urls.repeated_url])
    assert rep == [("dropped", "url_dedup", "duplicate"), ("kept", None, None)], rep
    # Two URLs serving the same bytes: exact_dedup keeps one.
    copies = sorted((r["outcome"], r["stage"], r["drop_reason"]) for u in urls.copies for r in by_url[u])
    assert copies == [("dropped", "exact_dedup", "duplicate"), ("kept", None, None)], copies

    # Every good URL kept, the redirect included, with the list's extra column in KEY.json.
    for url in urls.good:
        assert any(r["outcome"] == "kept" for r in by_url[url]), f"{url} was not kept: {by_url[url]}"
    (redirected,) = by_url[urls.redirect_url]
    with tarfile.open(out / redirected["shard"]) as tar:
        meta = json.loads(tar.extractfile(f"{redirected['key']}.json").read())
        image = Image.open(io.BytesIO(tar.extractfile(f"{redirected['key']}.jpg").read()))
        assert image.format == "JPEG" and min(image.size) == 256
    assert meta["license"] == urls.redirect_license and meta["url"] == urls.redirect_url
    # ... and in the sidecar, as `meta_license` (a csv's columns are text)
    carried = read_sidecars(out, "pair", columns=["key", "meta_license"])
    assert str(carried.schema.field("meta_license").type) == "string"
    assert dict(zip(*carried.to_pydict().values()))[redirected["key"]] == urls.redirect_license

    # Fetched once each in the clean run: url_dedup ran before the download; no retries.
    assert clean.hits["/redirect/" + urls.redirect_url.rsplit("/", 1)[1]] == 1
    repeated_path = "/" + urls.repeated_url.split("/", 3)[3]
    assert clean.hits[repeated_path] == 1
    hits = {path: n for path, n in clean.hits.items() if path != "/robots.txt"}  # once per worker
    assert all(n == 1 for n in hits.values()), {k: n for k, n in hits.items() if n != 1}

    # Every input exactly once: ids unique; inputs = kept + dropped = manifest = CSV records.
    output_checks.check_ledger_invariant(out)
    counts = manifest["counts"]
    assert counts["inputs"] == len(ledger) == urls.records
    assert counts["kept"] == len(urls.good) + 1  # + the kept one of the two copies
    assert sum(manifest["drops"].values()) == counts["dropped"] == urls.records - counts["kept"]
    assert manifest["drops"] == {
        "download/http_404": 1, "download/http_500": 1, "download/timeout": 1, "download/too_large": 3,
        "exact_dedup/duplicate": 1, "image_size_filter/image_too_small": 1, "source/malformed_row": 1,
        "url_dedup/duplicate": 1,
    }
    assert len(manifest["kinds"]["pair"]["shards"]) >= 5
    assert not output_checks.leftover_temporaries(out)
    report = verify(out)
    assert report.ok, report.format()


# ---------------------------------------------------------------------------------------------
# 2. The driver SIGKILLed mid-download; a rerun on an external cluster finishes it exactly
# ---------------------------------------------------------------------------------------------

DOWNLOAD_SEGMENT = "seg1"  # seg0: source + caption filter, then url_dedup's pass; seg1: download ...


@pytest.mark.slow
@pytest.mark.timeout(WAIT * 2)
def test_sigkill_driver_mid_download_then_rerun_on_an_external_cluster_is_byte_identical(
        clean, output_checks, external_scheduler, tmp_path):
    from distributed import Client

    out = tmp_path / "curated"
    recipe_file = output_checks.write_recipe(tmp_path / "recipe.yaml", recipe_data(clean.urls, out))
    cmd = [MM1, "curate", str(recipe_file), "--no-progress"]
    n = clean.manifest["counts"]["partitions"]

    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    family: list[psutil.Process] = []
    try:
        driver = psutil.Process(proc.pid)
        deadline = time.monotonic() + WAIT
        while len(_markers(out, DOWNLOAD_SEGMENT)) < 2:
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "the download segment never got going"
            time.sleep(0.005)
        family = driver.children(recursive=True)  # the LocalCluster's workers (and helpers)
        os.kill(proc.pid, signal.SIGKILL)
        at_kill = len(_markers(out, DOWNLOAD_SEGMENT))
        assert proc.wait(timeout=WAIT) == -signal.SIGKILL
        # No orphans: the workers die with their driver (one may finish the task in hand first).
        _wait_until(lambda: not _alive(family), what="the killed driver's worker processes to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _alive(family):  # only processes our driver started
            p.kill()
    assert len(_markers(out, "seg0")) == n, "the kill should land after url_dedup's pass"
    assert 2 <= at_kill < n, f"the kill should land inside the downloads ({at_kill}/{n} done)"
    assert not (out / "manifest.json").exists() and not _markers(out, "pack")
    finished = {p.name: p.stat().st_mtime_ns for p in _markers(out, DOWNLOAD_SEGMENT)}
    assert len(finished) < n, "the workers outlived the driver and finished the downloads"

    # The rerun: the same recipe, on the external scheduler's `dask worker`s.
    rerun = subprocess.run([*cmd, "--address", external_scheduler], capture_output=True, text=True,
                           cwd=tmp_path, timeout=WAIT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    # Resumed: download partitions finished before the kill were not fetched again ...
    after = {p.name: p.stat().st_mtime_ns for p in _markers(out, DOWNLOAD_SEGMENT)}
    assert {k: after[k] for k in finished} == finished and len(after) == n
    assert not list(out.rglob("*.tmp"))
    # ... and the external workers fetched the rest (each process builds the stages it runs),
    # not a LocalCluster of the driver.
    with Client(external_scheduler, timeout=WAIT) as client:
        loaded = client.run(
            lambda: sorted(s.name for s in __import__("curate.engine.steps").engine.steps.loaded_stages()))
    assert len(loaded) == 2 and any("download" in names for names in loaded.values()), loaded
    _assert_same_output(clean, out, output_checks)
    assert (out / LEDGER_DIR).is_dir()

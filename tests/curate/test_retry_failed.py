"""`mm1 curate RECIPE --retry-failed` (issue 5), against a real loopback server whose answers
change between runs, compared with a run where everything succeeded the first time.

The server serves distinct real photographs (crops of scikit-image's samples) and moves through
phases; the test sets the phase before each run:

    phase 0 (the first run)  the FLAKY urls, GONE and STUBBORN answer 503
    phase 1 (retry round 1)  FLAKY serve their image, GONE answers 404, STUBBORN still 503
    phase 2 (retry round 2)  STUBBORN serves its image too; this is also what the reference
                             run (everything succeeds the first time) sees

The url list holds the cases a retry must get right: a recovered image whose id is SMALLER than
an already shipped copy of the same bytes (exact_dedup keeps the smallest id, so the shipped
one is withdrawn, and a third copy's "duplicate of" detail changes), a recovered copy with a
larger id (dropped as a duplicate), a recovered image too small for the size filter, a url listed
twice (url_dedup before the download: only one is ever fetched), a permanent 404 (never fetched
again), and a url that fails again with a permanent code.

Equality with the reference, as the issue defines it: the same kept set, the same image bytes per
sample, the same ledger outcome (outcome, stage, reason, detail) per id. Finished shards are
never rewritten (their bytes are compared before and after). Waits are generous; nothing
asserts on timings.

The runs and rounds in this process use the session's LocalCluster (`shared_cluster`,
tests/conftest.py): the requests are counted on this module's server, whose URLs (its port) no
other run names (round 2, through `mm1 curate --retry-failed --address`, too). The S3 test
starts one cluster for its three runs, whose worker inherits the store's AWS_*.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data as skdata

from curate.contract import read_ledger, read_manifest, withdrawn_keys
from curate.recipe import parse_recipe
from curate.engine.retry import RetryError, retry_failed
from curate.engine.driver import run_recipe
from tools.demo.server import LoopbackHTTPServer
from tools.stats import compute_stats
from tools.verify import verify

pytestmark = pytest.mark.usefixtures("loopback_only")

BIN = Path(sys.executable).parent
MM1 = str(BIN / "mm1")
WAIT = 300  # seconds: many times what a run takes here; only a hang reaches it


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    out = {}
    for i in range(14):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        ch, cw = 90 + (i * 23) % 150, 100 + (i * 31) % 170
        y, x = (i * 19) % (h - ch), (i * 41) % (w - cw)
        out[f"p{i:02d}.jpg"] = _jpeg(p[y : y + ch, x : x + cw])
    out["tiny.jpg"] = _jpeg(photos[1][50:70, 60:84])
    assert len(set(out.values())) == len(out)
    return out


# The url list, by record index (ids are "web:urls.csv#<index>", compared as STRINGS: "#12" <
# "#3"; dedup keeps the smallest). Each
# entry: (path on the server, what happens). Paths under /dup/<x>/<name> serve image <name>.
ROWS: list[tuple[str, str]] = [
    ("/img/p00.jpg", "good"),                # 0
    ("/flaky/dup/a/p01.jpg", "flaky"),       # 1: same bytes as 5 and 9, the smallest id
    ("/img/p02.jpg", "good"),                # 2
    ("/flaky/dup/e/p03.jpg", "flaky"),       # 3: recovered, a duplicate of 12 ("#12" < "#3")
    ("/flaky/p04.jpg", "flaky"),             # 4
    ("/img/dup/b/p01.jpg", "good"),          # 5: shipped by run 1, withdrawn after the retry
    ("/flaky/p06.jpg", "flaky"),             # 6: listed again at 16 ("#16" < "#6": 16 stays)
    ("/missing", "404"),                     # 7: permanent, never retried
    ("/img/p08.jpg", "good"),                # 8
    ("/img/dup/c/p01.jpg", "good"),          # 9: a duplicate in every run; of 5, then of 1
    ("/gone/p10.jpg", "gone"),               # 10: 503, then 404
    ("/flaky/p11.jpg", "flaky"),             # 11
    ("/img/dup/e/p03.jpg", "good"),          # 12: same bytes as 3, the smaller id
    ("/stubborn/p13.jpg", "stubborn"),       # 13: 503 twice, recovered by the second round
    ("/flaky/tiny.jpg", "flaky"),            # 14: recovered, then too small
    ("/img/p09.jpg", "good"),                # 15
    ("/flaky/p06.jpg", "flaky"),             # 16: the same url as 6: url_dedup drops 6 first
    ("/img/p12.jpg", "good"),                # 17
    ("/flaky/p05.jpg", "flaky"),             # 18
    ("/img/p07.jpg", "good"),                # 19
]


class Site:
    def __init__(self) -> None:
        self.images = _images()
        self.phase = 0
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()

    def answer(self, path: str) -> tuple[int, bytes]:
        with self.lock:
            self.hits[path] += 1
        head, _, rest = path.lstrip("/").partition("/")
        name = rest.rsplit("/", 1)[-1]
        failing = {"flaky": self.phase < 1, "gone": self.phase < 1, "stubborn": self.phase < 2}
        if head in failing and failing[head]:
            return 503, b"try later"
        if head == "gone":
            return 404, b"gone for good"
        if head in ("img", "flaky", "stubborn") and name in self.images:
            return 200, self.images[name]
        return 404, b"no such thing"


@pytest.fixture(scope="module")
def site() -> Any:
    s = Site()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            status, body = s.answer(self.path)
            self.send_response(status)
            self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="retry-http", daemon=True)
    thread.start()
    s.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield s
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def _recipe_data(urls: Path, out: Path) -> dict[str, Any]:
    return {
        "name": "retry-failed-test",
        "sources": [{"kind": "url_list", "name": "web", "path": str(urls), "records_per_partition": 4}],
        "stages": [
            {"kind": "caption_length_filter", "min_chars": 3, "max_chars": 500},
            {"kind": "url_dedup"},
            {"kind": "download", "threads": 4, "deadline_s": 10, "retries": 0, "respect_robots_txt": False,
             "allow_networks": ["127.0.0.0/8"]},
            {"kind": "image", "resize_mode": "keep_ratio", "image_size": 64, "format": "jpg", "quality": 90},
            {"kind": "image_size_filter", "min_width": 32, "min_height": 32},
            {"kind": "exact_dedup"},
        ],
        "output": {"path": str(out), "shard_max_samples": 3},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB", "dashboard": False},
        "execution": {"batch_size": 3},
    }


def _write_inputs(root: Path, site: Site) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    urls = root / "urls.csv"
    lines = ["url,caption"] + [f"{site.base}{path},row {i}: {what}" for i, (path, what) in enumerate(ROWS)]
    urls.write_text("\n".join(lines) + "\n")
    return urls


def _id(i: int) -> str:
    return f"web:urls.csv#{i}"


def _outcomes(out: Path) -> dict[str, tuple]:
    t = read_ledger(out, columns=["id", "outcome", "stage", "drop_reason", "drop_detail"])
    return {r["id"]: (r["outcome"], r["stage"], r["drop_reason"], r["drop_detail"]) for r in t.to_pylist()}


def _kept_images(out: Path) -> dict[str, bytes]:
    """id -> the image bytes of every kept sample, read from the tars by the ledger's shard/key."""
    by_shard: dict[str, dict[str, str]] = {}
    for r in read_ledger(out, columns=["id", "outcome", "shard", "key"]).to_pylist():
        if r["outcome"] == "kept":
            by_shard.setdefault(r["shard"], {})[r["key"]] = r["id"]
    images: dict[str, bytes] = {}
    for shard, keys in by_shard.items():
        with tarfile.open(out / shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if key in keys and ext == "jpg":
                    images[keys[key]] = tar.extractfile(member).read()
    return images


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _kept_attempts(out: Path) -> dict[str, int]:
    return {r["id"]: r["attempts"] for r in read_ledger(out, columns=["id", "attempts"]).to_pylist()}


def _retry(client: Any, recipe: Any) -> dict[str, Any]:
    """`retry_failed` on `client`'s cluster."""
    return retry_failed(recipe, progress=False, client=client)


@pytest.fixture(scope="module")
def reference(site, shared_cluster, tmp_path_factory) -> Path:
    """Everything succeeds the first time (the server in its final phase)."""
    root = tmp_path_factory.mktemp("retry-reference")
    urls = _write_inputs(root / "in", site)
    site.phase = 2
    out = root / "out"
    shared_cluster.run(parse_recipe(_recipe_data(urls, out), "<reference recipe>"))
    return out


def test_retry_failed_recovers_exactly_what_an_all_success_run_keeps(site, reference, shared_cluster, tmp_path,
                                                                      monkeypatch):
    urls = _write_inputs(tmp_path / "in", site)
    out = tmp_path / "out"
    data = _recipe_data(urls, out)
    recipe = parse_recipe(data, "<test recipe>")
    client = shared_cluster.client

    # --- the first run: flaky, gone and stubborn urls answer 503 ------------------------------
    site.phase = 0
    shared_cluster.run(recipe)
    first = _outcomes(out)
    transient = {i for i, (_, what) in enumerate(ROWS) if what in ("flaky", "gone", "stubborn")} - {6}
    assert {i for i in range(len(ROWS)) if first[_id(i)][2] == "http_503"} == transient
    assert first[_id(6)][1:3] == ("url_dedup", "duplicate")  # before any fetch
    assert first[_id(5)][0] == "kept" and first[_id(9)][3] == f"same image bytes as {_id(5)}"
    shipped = _digests(out / "pairs")
    sizes_before = json.loads((out / "pairs" / "sizes.json").read_text())
    assert verify(out).ok

    # --- retry round 1, first killed before its commit, then run again -----------------------
    site.phase = 1
    before = Counter(site.hits)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed before the round's manifest")

    monkeypatch.setattr("curate.engine.retry.write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        _retry(client, recipe)
    monkeypatch.undo()
    assert read_manifest(out).get("retries") is None  # nothing committed
    fetched_in_killed_round = Counter(site.hits) - before
    manifest = _retry(client, recipe)
    # only the transient drops were asked for again, once each, and the resumed round fetched
    # nothing twice (its finished tasks were kept)
    fetched = Counter(site.hits) - before
    assert set(fetched) == {ROWS[i][0] for i in transient}
    assert fetched == fetched_in_killed_round
    assert all(n == 1 for n in fetched.values())

    r1 = manifest["retries"][0]
    assert r1["round"] == 1 and r1["retried"] == len(transient)
    assert r1["failed_again"] == 1  # stubborn: 503 again, left for another round
    assert r1["dropped"] == 3  # gone (now 404), a duplicate of 3, one too small
    assert r1["recovered"] == len(transient) - 4
    assert r1["withdrawn"] == 1
    # the round's stage times: its row stages over the retried rows, its global pass over all
    # the rows that reach it (the earlier ones and the recovered), one row removed (withdrawn 5)
    dedup = r1["stages"]["exact_dedup"]
    assert dedup["pass"] == "global" and dedup["wall_s"] > 0 and dedup["rows_in"] > r1["recovered"], r1["stages"]
    assert r1["stages"]["download"]["rows_in"] == len(transient), r1["stages"]
    after1 = _outcomes(out)
    assert after1[_id(10)][:3] == ("dropped", "download", "http_404")
    assert after1[_id(13)][:3] == ("dropped", "download", "http_503")
    assert after1[_id(1)][0] == "kept"
    assert after1[_id(5)] == ("dropped", "exact_dedup", "duplicate", f"same image bytes as {_id(1)}")
    assert after1[_id(9)][3] == f"same image bytes as {_id(1)}"
    assert after1[_id(3)] == ("dropped", "exact_dedup", "duplicate", f"same image bytes as {_id(12)}")
    assert after1[_id(14)][1:3] == ("image_size_filter", "image_too_small")
    assert _kept_attempts(out)[_id(13)] == 2 and _kept_attempts(out)[_id(10)] == 2
    # the withdrawn sample: still in its (unchanged) tar, listed by the manifest, skipped by readers
    (w,) = manifest["kinds"]["pair"]["withdrawn"]
    assert w["id"] == _id(5) and withdrawn_keys(manifest, "pair") == {w["shard"]: {w["key"]}}
    assert {k: v for k, v in _digests(out / "pairs").items() if k in shipped} == shipped
    assert r1["new_shards"]["pair"] >= 1
    sizes = json.loads((out / "pairs" / "sizes.json").read_text())
    assert {k: v for k, v in sizes.items() if k in sizes_before} == sizes_before
    report = verify(out)
    assert report.ok, report.errors
    stats = compute_stats(out)
    assert stats["kinds"]["pair"]["withdrawn"] == 1
    # verify holds the manifest to it: a withdrawn sample the manifest forgets is an orphan
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    m = read_manifest(tampered)
    m["kinds"]["pair"]["withdrawn"] = []
    m["kinds"]["pair"]["count"] += 1
    m["counts"]["kept"] += 1
    (tampered / "manifest.json").write_text(json.dumps(m))
    errors = verify(tampered).errors
    assert any(f"{w['shard']}/{w['key']} is in a sidecar but has no kept ledger row" in e for e in errors), errors
    shutil.rmtree(tampered)
    assert stats["kinds"]["pair"]["samples"] == manifest["kinds"]["pair"]["count"] == manifest["counts"]["kept"]

    # --- retry round 2 through the CLI: the stubborn url comes back --------------------------
    site.phase = 2
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    before = Counter(site.hits)
    proc = subprocess.run([MM1, "curate", str(recipe_file), "--retry-failed", "--no-progress",
                           "--address", shared_cluster.cluster.scheduler_address],
                          capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retry round 2: 1 retried, 1 recovered" in proc.stdout
    assert set(Counter(site.hits) - before) == {ROWS[13][0]}
    assert _kept_attempts(out)[_id(13)] == 3

    # --- equal to the run where everything succeeded the first time --------------------------
    got, want = _outcomes(out), _outcomes(reference)
    assert got == want
    assert {i for i, o in got.items() if o[0] == "kept"} == {i for i, o in want.items() if o[0] == "kept"}
    assert _kept_images(out) == _kept_images(reference)
    final = read_manifest(out)
    assert final["counts"] == read_manifest(reference)["counts"]
    assert final["drops"] == read_manifest(reference)["drops"]
    assert final["global"]["exact_dedup"]["dropped"] == read_manifest(reference)["global"]["exact_dedup"]["dropped"]
    assert {k: v for k, v in _digests(out / "pairs").items() if k in shipped} == shipped
    report = verify(out)
    assert report.ok, report.errors

    # --- nothing left to retry; a plain rerun keeps the retried output as it is ---------------
    text = (out / "manifest.json").read_bytes()
    before = Counter(site.hits)
    assert _retry(client, recipe) == final
    shared_cluster.run(recipe)
    assert (out / "manifest.json").read_bytes() == text
    assert Counter(site.hits) == before
    assert sorted(p.name for p in (out / "ledger").iterdir()) == sorted(Path(n).name for n in final["ledger"])


def test_retry_rounds_on_s3_end_where_the_all_success_run_does(site, reference, s3, tmp_path):
    """The same rounds with the output on an object store (a real S3-compatible server on
    loopback, tests/conftest.py): there the global stages' decisions and a round's changes keep
    their attempts' own names and the markers name them. Two rounds end with the reference's
    outcomes and image bytes, `mm1 verify` passes on s3://, and no attempt is left unnamed. The
    run and both rounds share one LocalCluster, started once the store's AWS_* environment is set
    (its worker inherits it): one worker process of two threads (the cluster block is execution
    only; the reference ran on two processes)."""
    from curate.contract import fs_path, location
    from curate.engine.cluster import connect
    from curate.engine.commit import ATTEMPT_NAME

    urls = _write_inputs(tmp_path / "in", site)
    out = f"{s3}/retried"
    data = _recipe_data(urls, out)
    data["cluster"] = {**data["cluster"], "n_workers": 1, "threads_per_worker": 2}
    recipe = parse_recipe(data, "<s3 recipe>")
    with connect(recipe) as client:
        site.phase = 0
        run_recipe(recipe, progress=False, client=client)
        site.phase = 1
        first = _retry(client, recipe)["retries"][0]
        assert first["withdrawn"] == 1 and first["failed_again"] == 1
        site.phase = 2
        final = _retry(client, recipe)
    assert final["retries"][1]["recovered"] == 1
    report = verify(out)
    assert report.ok, report.errors

    where, fs = fs_path(location(out))
    copy = tmp_path / "copy"
    fs.get(where, str(copy), recursive=True)
    assert _outcomes(copy) == _outcomes(reference)
    assert _kept_images(copy) == _kept_images(reference)
    named = {v for g in final["global"].values() for v in g.get("state", {}).values()}
    left = {p.relative_to(copy).as_posix() for p in (copy / "_work").rglob("*") if ATTEMPT_NAME.match(p.name)}
    assert left and left <= named, (left, named)


def test_retry_failed_needs_a_finished_run_of_the_same_recipe(site, tmp_path):
    urls = _write_inputs(tmp_path / "in", site)
    data = _recipe_data(urls, tmp_path / "out")
    with pytest.raises(RetryError, match="no finished run"):
        retry_failed(parse_recipe(data, "<test recipe>"), progress=False)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    for flags, says in ((["--retry-failed"], "no finished run"),
                        (["--retry-failed", "--restart"], "exclude each other")):
        proc = subprocess.run([MM1, "curate", str(recipe_file), "--no-progress", *flags],
                              capture_output=True, text=True, timeout=WAIT)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]

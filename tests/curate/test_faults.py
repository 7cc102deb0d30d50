"""Faults end a run or are survived, never a stall (issue 24, item 4).

1. A Dask worker that cannot import the tasks' modules: a real `dask scheduler` and one `dask
   worker` on 127.0.0.1, the worker's PYTHONPATH led first to a `curate` package that raises
   ImportError (a LocalCluster's workers inherit the driver's sys.path, so only an external
   worker shows it). Such a worker dies unpickling its first task and the task waits for a
   worker forever; `mm1 curate --address` must exit 2 with the import error instead, well
   within a generous bound (it takes a few seconds). One whose import hangs fails the import
   check after its timeout.
2. Twin attempts of one segment task on a local disk (Dask may run a task twice, at once) fed
   differently by the network (a loopback server that answers each request 200 or 404 at
   random): whichever attempt's marker stands, its `rows` and `dropped` counts are those of the
   file it names, and no attempt file or lock is left.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curate.contract import inside
from curate.engine.driver import plan_job
from curate.engine.steps import run_segment
from curate.recipe import parse_recipe
from tools.demo.server import LoopbackHTTPServer

BIN = Path(sys.executable).parent
WAIT = 60  # seconds: many times what failing the run takes (~3 s); only a hang reaches it

pytestmark = pytest.mark.usefixtures("loopback_only")


def _exe(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (48, 48), (40 * i, 90, 160)).save(root / f"{i:03d}.jpg")
        (root / f"{i:03d}.txt").write_text(f"a small square, number {i}")
    return root


@contextmanager
def _shadowed_worker(tmp_path: Path, init: str) -> Iterator[str]:
    """A `dask scheduler` and one `dask worker` (127.0.0.1) whose `curate` package is a shadow
    running `init` on import; yields the scheduler's address once the worker has registered."""
    from distributed import Client

    shadow = tmp_path / "shadow" / "curate"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(init)
    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}
    http = ("--no-dashboard", "--dashboard-address", "127.0.0.1:0")
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str], env: dict[str, str]) -> None:
        with open(tmp_path / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([_exe("dask"), *args], stdout=log, stderr=subprocess.STDOUT,
                                          cwd=tmp_path, env=env, start_new_session=True))

    try:
        start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], *http], env)
        start("worker", ["worker", address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1", *http],
              {**env, "PYTHONPATH": str(tmp_path / "shadow")})
        with Client(address, timeout=WAIT) as client:
            client.wait_for_workers(1, timeout=WAIT)
        yield address
    finally:
        for proc in reversed(procs):  # the worker, then the scheduler: each its own process group
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a worker stuck in an import does not answer SIGTERM
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture
def broken_worker(tmp_path: Path) -> Iterator[str]:
    """A worker whose environment cannot import `curate`."""
    with _shadowed_worker(tmp_path, "raise ImportError('curate is broken on this worker (test shadow)')\n") as address:
        yield address


@pytest.mark.timeout(WAIT * 3)
def test_a_worker_that_cannot_import_the_tasks_ends_the_run_with_exit_2(broken_worker, tmp_path):
    images = _tiny_folder(tmp_path / "images", 3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "broken-worker",
        "sources": [{"kind": "image_folder", "name": "f", "path": str(images), "captions": "sidecar"}],
        "stages": [{"kind": "caption_length_filter", "min_chars": 5, "max_chars": 1000}],
        "output": {"path": str(tmp_path / "out")},
    }))
    try:
        run = subprocess.run([_exe("mm1"), "curate", str(recipe), "--address", broken_worker, "--no-progress"],
                             capture_output=True, text=True, timeout=WAIT, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the run hung for {WAIT} s: {exc.stderr!r}")
    assert run.returncode == 2, run.stderr
    assert "ImportError: curate is broken on this worker (test shadow)" in run.stderr
    assert "cannot import" in run.stderr and "curate.engine.steps" in run.stderr
    assert "Traceback" not in run.stderr  # one message, as for every exit 2
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.timeout(WAIT * 3)
def test_a_worker_whose_import_hangs_fails_the_import_check_within_its_timeout(tmp_path):
    """`Client.run` waits without a bound: a worker stuck importing the tasks' modules (here a
    `curate` that sleeps on import) would hang the run. `check_imports` gives up after its
    timeout with a WorkerEnvironmentError (exit 2) that says so."""
    from distributed import Client

    from curate.engine.cluster import WorkerEnvironmentError, check_imports

    with _shadowed_worker(tmp_path, "import time\ntime.sleep(3600)\n") as address, \
            Client(address, timeout=WAIT) as client:
        with pytest.raises(WorkerEnvironmentError, match=r"did not finish importing .*curate\.engine\.steps.* within 2 s"):
            check_imports(client, ["curate.engine.steps"], timeout=2)


class FlakySite(LoopbackHTTPServer):
    """A loopback server answering each image request with a small JPEG or a 404, at random:
    two fetches of one URL list differ (robots.txt: 404, i.e. everything allowed)."""

    def __init__(self) -> None:
        body = io.BytesIO()
        Image.new("RGB", (40, 40), (200, 30, 30)).save(body, "JPEG")
        self.body, self.coin = body.getvalue(), random.Random(24)
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _FlakyHandler)

    def heads(self) -> bool:
        with self.lock:
            return self.coin.random() < 0.5


class _FlakyHandler(BaseHTTPRequestHandler):
    server: FlakySite

    def do_GET(self) -> None:
        if self.path.startswith("/img/") and self.server.heads():
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(self.server.body)))
            self.end_headers()
            self.wfile.write(self.server.body)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def flaky_site() -> Iterator[FlakySite]:
    site = FlakySite()
    thread = threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield site
    site.shutdown()
    site.server_close()


def test_twin_attempts_fed_differently_leave_a_marker_that_counts_its_file(flaky_site, tmp_path):
    parts, per = 12, 4
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(
        f"http://127.0.0.1:{flaky_site.server_port}/img/{i}.jpg,a red square number {i}\n" for i in range(parts * per)))
    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "twins",
        "sources": [{"kind": "url_list", "name": "web", "path": str(urls), "records_per_partition": per}],
        "stages": [{"kind": "download", "threads": 2, "retries": 0, "deadline_s": 10,
                    "allow_networks": ["127.0.0.0/8"]}],
        "output": {"path": str(out)},
        "execution": {"batch_size": 2},
    }, "<test recipe>")
    job = plan_job(recipe)
    assert len(job.partitions) == parts
    with ThreadPoolExecutor(2) as pool:
        for p in range(parts):  # the two attempts of (seg 0, p), at once
            twins = [pool.submit(run_segment, job, 0, p) for _ in range(2)]
            returned = [t.result(timeout=WAIT) for t in twins]
            marker = job.storage.read_marker(job.marker("seg0", p))
            assert returned == [marker, marker]  # the first marker stands, for both attempts
            table = pq.read_table(inside(job.out, marker["data"]))
            drops = Counter(f"{s}/{r}" for s, r in zip(table.column("drop_stage").to_pylist(),
                                                        table.column("drop_reason").to_pylist()) if r)
            assert (marker["rows"], marker["dropped"]) == (table.num_rows, dict(drops)), p
    names = sorted(f.name for f in (out / "_work").rglob("*") if f.is_file())
    assert names == sorted([f"{p:05d}.parquet" for p in range(parts)] + [f"seg0-{p:05d}.json" for p in range(parts)])


# ---------------------------------------------------------------------------------------------
# 3. Workers killed in the middle of a global pass's p2p shuffle
# ---------------------------------------------------------------------------------------------


def test_workers_killed_during_a_p2p_global_pass_leave_the_same_decisions(tmp_path):
    """url_dedup (the runner's `decide_global`, its p2p shuffle) over 12,000 rows with planted
    duplicates on a `dask scheduler` + `dask worker --nworkers 2` of their own; both worker processes
    are SIGKILLed while the pass runs (their nannies start others; killing them together, not
    one after the other, keeps the pass from ending before the second kill). The pass ends, within a
    bound only a hang reaches, with exactly the planted duplicates dropped. (The task shuffle was
    used until p2p was measured: BENCHMARKS.md, global passes.)"""
    from tools.bench.global_passes import BenchCluster, check, make_inputs, stage_config  # (the bench's cluster)
    from curate.engine.driver import decide_global, live_schema, read_live

    made = make_inputs("url_dedup", 12_000, 1_500, str(tmp_path / "in"), 0.1, 8)
    stage = stage_config("url_dedup", tmp_path / "in")
    files = [Path(f) for f in made["files"]]
    cluster = BenchCluster(2, tmp_path)
    kills: list[int] = []
    stop = threading.Event()

    def kill_both() -> None:  # once a worker holds tasks of the pass, both worker processes at once
        while not kills and not stop.wait(0.1):
            if any(keys for keys in cluster.client.processing().values()):
                for pid in cluster.client.run(os.getpid).values():
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)

    killer = threading.Thread(target=kill_both, daemon=True)
    try:
        killer.start()
        # (pytest-timeout's 600 s ends a hang; the pass takes a few seconds)
        dropped, decisions, _ = decide_global(stage, read_live(files, stage.columns), tmp_path / "dec",
                                              tmp_path / "input", live_schema(files, stage.columns))
    finally:
        stop.set()
        killer.join(WAIT)
        cluster.close()
    assert len(kills) == 2
    outcome = check("url_dedup", made["expect"], decisions, 12_000, {})
    assert outcome["ok"] and dropped == made["expect"]["dropped"], outcome

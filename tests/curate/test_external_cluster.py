"""The cluster path runs the same code as the embedded default: a recipe run against a real
`dask scheduler` and two `dask worker` processes (all on 127.0.0.1) gives shards and a ledger
byte-identical to the session's LocalCluster reference run (conftest.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import Client

from tools.verify import verify

BIN = Path(sys.executable).parent
WAIT = 300  # seconds: many times what a step takes; only a hang reaches it


def _exe(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop what we started: each process group we created, gently, then for good."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def scheduler(tmp_path):
    """A `dask scheduler` and two single-threaded `dask worker`s bound to 127.0.0.1; yields the
    scheduler address once both workers have registered."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        log = open(tmp_path / f"{name}.log", "wb")
        procs.append(subprocess.Popen(
            [_exe("dask"), *args], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
            start_new_session=True,  # its own process group: teardown reaches its nanny's worker too
        ))
        log.close()

    try:
        # --no-dashboard still starts each process's HTTP server (health, metrics), by default
        # on every interface: keep it on loopback
        http = ("--no-dashboard", "--dashboard-address", "127.0.0.1:0")
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), *http)
        for i in range(2):
            start(f"worker{i}", "worker", address, "--nthreads", "1", "--nworkers", "1",
                  "--host", "127.0.0.1", *http, "--memory-limit", "2GiB")
        with Client(address, timeout=WAIT) as client:
            client.wait_for_workers(2, timeout=WAIT)
        yield address
    finally:
        _stop(procs[1:])  # workers first, then the scheduler
        _stop(procs[:1])


@pytest.mark.slow
@pytest.mark.timeout(WAIT * 2)
def test_external_scheduler_gives_the_localcluster_shards(reference, scheduler, tmp_path):
    out = tmp_path / "curated"
    recipe_file = reference.write_recipe(tmp_path / "recipe.yaml", reference.data(out))
    run = subprocess.run(
        [_exe("mm1"), "curate", str(recipe_file), "--no-progress", "--address", scheduler],
        capture_output=True, text=True, timeout=WAIT,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    # The external workers did the work (each loaded the stages), not a LocalCluster of the driver.
    with Client(scheduler, timeout=WAIT) as client:
        stages_loaded = client.run(lambda: len(__import__("curate.tasks").tasks._STAGE_CACHE))
    assert len(stages_loaded) == 2 and all(stages_loaded.values()), stages_loaded

    reference.assert_same_output(out)
    reference.check_ledger_invariant(out)
    report = verify(out)
    assert report.ok, report.format()

"""Session-wide guards (nothing in the tests may reach the network) and what the session shares,
built once because each costs seconds to minutes: one Dask LocalCluster (`shared_cluster`), one
curated demo (`demo_run`) and its training run (`demo_trained`), the tiny models, and the chat and
S3 server processes."""

from __future__ import annotations

import contextlib
import fcntl
import io
import ipaddress
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# albumentations (pulled in by img2dataset) checks PyPI for updates on import; wandb and the
# Hugging Face hub must stay offline too.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def loopback_only():
    """Fail any connection to a non-loopback address and any real name lookup. Modules that
    talk to servers opt in: `pytestmark = pytest.mark.usefixtures("loopback_only")`."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            assert ipaddress.ip_address(address[0]).is_loopback, f"test tried to dial {address[0]}"
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise AssertionError(f"test tried to resolve {host!r}") from None
        return real_getaddrinfo(host, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("test tried a name lookup")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        for name in ("gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getfqdn"):
            mp.setattr(socket, name, refuse)
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(vlm folder, llm folder): tools.demo.tiny_models' LLaVA-architecture VLM and Llama chat model,
    RANDOM weights built from configs (mechanics only), saved as ordinary model folders."""
    from tools.demo.tiny_models import build_tiny_lm, build_tiny_vlm

    def build(root: Path) -> dict[str, Any]:
        return {"vlm": str(build_tiny_vlm(root / "vlm")), "llm": str(build_tiny_lm(root / "llm"))}

    _, built = built_once(tmp_path_factory, "tiny_models", build)  # once for all of make test's processes
    return Path(built["vlm"]), Path(built["llm"])


class ChatServerProcess:
    """tools.servers.chat in its own process on 127.0.0.1, with its control endpoints."""

    def __init__(self, vlm, llm, tmp, max_batch: int = 16):
        import subprocess
        import sys
        import time

        port_file = tmp / "port"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.servers.chat", "--vlm", str(vlm), "--llm", str(llm),
             "--port-file", str(port_file), "--max-batch", str(max_batch)],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"))
        deadline = time.monotonic() + 180  # a bound against a hang, not a timing
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chat server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _call(self, path: str, body: dict | None = None) -> dict:
        import json
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method="GET" if data is None else "POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)

    def script(self, *steps: dict) -> None:
        self._call("/control", {"script": list(steps)})

    def stats(self) -> dict:
        return self._call("/stats")

    def reset(self) -> None:
        self._call("/reset", {})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def chat_server(tiny_models, tmp_path_factory):
    """A real OpenAI-compatible server process on loopback over the tiny models, for the session:
    every test that uses it starts with `chat_server.reset()` (no script, counters at zero)."""
    server = ChatServerProcess(*tiny_models, tmp_path_factory.mktemp("chat_server"))
    yield server
    server.stop()


# The session's cluster sits idle between runs for most of the session: its scheduler, nannies
# and workers wake every 20-500 ms for health ticks, system and memory monitors and work stealing,
# 1.5 CPU-s each 30 s for the four processes of an idle 2-worker cluster, 0.4 with these (measured;
# its 2 cores are what bounds the suite). Nothing the tests check depends on them.
IDLE_QUIET = {"distributed.admin.tick.interval": "1s", "distributed.admin.system-monitor.interval": "2s",
              "distributed.worker.memory.monitor-interval": "1s", "distributed.scheduler.work-stealing-interval": "1s"}


class SharedCluster:
    """The session's one Dask LocalCluster, started the way the runner starts one (worker processes
    bound to 127.0.0.1, the runner's WORKER_CONFIG), and a client on it. `run(recipe)` is
    `run_recipe` on it."""

    def __init__(self) -> None:
        import dask
        from dask.distributed import Client, LocalCluster

        from curate.engine.cluster import WORKER_CONFIG

        with dask.config.set({**WORKER_CONFIG, **IDLE_QUIET}):  # the nannies copy it when they start
            self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                        dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False},
                                        memory_limit="3GiB")
        self.client = Client(self.cluster, set_as_default=False)

    def run(self, recipe: Any, **kwargs: Any) -> dict[str, Any]:
        from curate.engine.driver import run_recipe

        return run_recipe(recipe, progress=False, client=self.client, **kwargs)

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


@pytest.fixture(scope="session")
def shared_cluster():
    """One LocalCluster (2 single-threaded worker processes) for the session's runs that need no
    cluster of their own: starting one per run costs seconds each. Its workers outlive each run,
    with what the runs loaded into them (the per-process stage cache keeps a stage, and its models
    and state, per stage config). Its scheduler keeps the per-host semaphores a downloading run
    used, idle once the run ends: their names carry the limits (curate/stages/download.py), so a
    later run with other limits meets none of them and one with the same limits shares them as any
    resumed run would; downloading runs may use it (a test counting its server's requests serves
    URLs no other run names; a worker's download stage also keeps its robots.txt answers per scheme,
    host and port for a day, so such a test's server, robots.txt included, is on an origin no
    earlier run fetched). A test that counts a stage's work or model calls inside the workers (what
    a worker process loaded or ran), needs a stage's in-memory state to start empty where another
    stage config will not do (a config differing in any setting, execution-only ones included, gets
    a new stage instance: that is how test_recaption_pipeline's second run reads its captions from
    the cache folder), kills or restarts workers, tests the recipe's cluster block, or needs an
    environment in the workers (the S3 tests' AWS_*) starts its own cluster, through
    `run_recipe(recipe)`."""
    shared = SharedCluster()
    yield shared
    shared.close()


@dataclass(frozen=True)
class DemoRun:
    """The demo curated once for the session, laid out under `root` as `mm1 demo` lays it out
    (inputs/, curated/, recaption_cache/; run/ and export/ once `demo_trained` has run).
    Shared and read-only: a test that changes any of it works on a copy."""

    root: Path
    out: Path  # root/curated: the three kinds' shards, sidecars, ledger and manifest
    tokenizer: Path  # the demo's byte-level BPE tokenizer.json
    summary: dict[str, Any]  # what tools.demo's inputs expect: inputs, kept, drop reasons per source
    manifest: dict[str, Any]  # what the run returned


def built_once(tmp_path_factory, name: str, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """(folder, what `build(folder)` returned, JSON-able) of `name`, built once for the whole run.

    Under `make test` (pytest-xdist) every worker process has a session of its own, so a session
    fixture is built once per process: what is built here lives under the run's shared temporary
    folder, the first process to ask builds it under a file lock while the others wait, and they
    all read the same folder. A build that failed is retried by the next process that asks."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/, above every worker's popen-gwK/
    folder, done = base / name, base / f"{name}.json"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(build(folder)))
    return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, request) -> DemoRun:
    """The demo's inputs (tools.demo) curated once per run (`built_once`: once for all of
    `make test`'s processes) by the real runner on a LocalCluster of 2 single-threaded workers, as
    the demo recipe's cluster block asks (the session's `shared_cluster` of the process that builds
    it; `make demo` starts its own): the one curated demo that the
    end-to-end, manifest, report, training and demo tests all read."""
    from curate.recipe import load_recipe
    from tools.demo.run import DEMO_RECIPE, demo_inputs, demo_overrides

    def build(root: Path) -> dict[str, Any]:
        with demo_inputs(root) as summary:  # the URL list's and the crawl's server runs while the recipe does
            recipe = load_recipe(DEMO_RECIPE, demo_overrides(root))
            manifest = request.getfixturevalue("shared_cluster").run(recipe)  # started only where it builds
        return {"out": recipe.output.path, "summary": summary, "manifest": manifest}

    root, built = built_once(tmp_path_factory, "demo", build)
    return DemoRun(root, Path(built["out"]), root / "inputs" / "tokenizer" / "tokenizer.json", built["summary"],
                   built["manifest"])


@pytest.fixture(scope="session")
def demo_output(demo_run):
    """(curated output folder, its tokenizer.json) of the session's demo."""
    return demo_run.out, demo_run.tokenizer


@pytest.fixture(scope="session")
def demo_trained(tmp_path_factory, demo_run) -> tuple[DemoRun, dict[str, Any], str]:
    """The run's demo after the demo's own training step (tools.demo `train_demo`: the tiny
    MM1, random init, 40 steps on CPU over the curated shards, checkpoints in root/run, the newest
    exported to root/export), once per run (`built_once`): what an `mm1 demo` run leaves behind.
    (demo run, the trainer's result, what train_demo printed)."""
    from tools.demo.run import train_demo

    def build(_: Path) -> dict[str, Any]:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = train_demo(demo_run.root, demo_run.out)
        return {"result": result, "printed": printed.getvalue()}

    _, built = built_once(tmp_path_factory, "demo_trained", build)
    return demo_run, built["result"], built["printed"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server process (moto's server mode) on 127.0.0.1 for the session."""
    from tools.servers.s3 import S3Server

    server = S3Server(log=tmp_path_factory.mktemp("s3_server") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """'s3://<a fresh bucket>' on the loopback server, with this process's environment (and so
    every process it starts: Dask workers, torchrun ranks) pointed at the server."""
    from tools.servers.s3 import forget_clients

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    forget_clients()
    yield f"s3://{s3_server.create_bucket()}"
    forget_clients()


# The files that take longest (seconds of one `make test` run's --durations on the 2-core
# machine, heaviest first). Under `make test` (pytest-xdist, whole files per process, in this
# order: --no-loadscope-reorder) they are handed out first, so the processes do not end with one
# long file running alone; the second goes to the other process while the first builds the
# session's demo (test_trainer: `demo_trained`), so it is one that does not read the demo. A
# serial run only changes its order.
LONGEST_FILES = ("tests/train/test_trainer.py", "tests/curate/test_retry_failed.py", "tests/train/test_layouts.py",
                 "tests/curate/test_object_store.py", "tests/tools/test_demo.py", "tests/train/data/test_loader.py",
                 "tests/curate/test_resume.py", "tests/tools/test_report.py", "tests/train/test_object_store_training.py",
                 "tests/curate/test_download_pipeline.py", "tests/tools/test_bench_worker_scaling.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    root = Path(__file__).resolve().parents[1]

    def key(item) -> int:
        try:
            return rank.get(Path(item.fspath).resolve().relative_to(root).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=key)  # stable: collection order within a file and among the others

"""Session-wide guards (nothing in the tests may reach the network) and what the session shares,
built once because each costs seconds to minutes: one Dask LocalCluster (`shared_cluster`), one
curated demo (`demo_run`) and its training run (`demo_trained`), the tiny models, and the chat and
S3 server processes."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import socket
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

    root = tmp_path_factory.mktemp("tiny_models")
    return build_tiny_vlm(root / "vlm"), build_tiny_lm(root / "llm")


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


class SharedCluster:
    """The session's one Dask LocalCluster, started the way the runner starts one (worker processes
    bound to 127.0.0.1, the runner's WORKER_CONFIG), and a client on it. `run(recipe)` is
    `run_recipe` on it, the client current while the run's global passes compute."""

    def __init__(self) -> None:
        import dask
        from dask.distributed import Client, LocalCluster

        from curate.engine.cluster import WORKER_CONFIG

        with dask.config.set(WORKER_CONFIG):  # the nannies copy it when they start
            self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                        dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False},
                                        memory_limit="3GiB")
        self.client = Client(self.cluster, set_as_default=False)

    def run(self, recipe: Any, **kwargs: Any) -> dict[str, Any]:
        from curate.engine.driver import run_recipe

        with self.client.as_current():
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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, shared_cluster) -> DemoRun:
    """The demo's inputs (tools.demo) curated once per session by the real runner on the
    session's LocalCluster (2 single-threaded workers, as the demo recipe's cluster block asks;
    `mm1 demo` starting its own is test_demo_twice's): the one curated demo that the
    end-to-end, manifest, report, training and demo tests all read."""
    from curate.recipe import load_recipe
    from tools.demo.run import DEMO_RECIPE, demo_inputs, demo_overrides

    root = tmp_path_factory.mktemp("demo")
    with demo_inputs(root) as summary:  # the URL list's and the crawl's server runs while the recipe does
        recipe = load_recipe(DEMO_RECIPE, demo_overrides(root))
        manifest = shared_cluster.run(recipe)
    return DemoRun(root, Path(recipe.output.path), root / "inputs" / "tokenizer" / "tokenizer.json", summary,
                   manifest)


@pytest.fixture(scope="session")
def demo_output(demo_run):
    """(curated output folder, its tokenizer.json) of the session's demo."""
    return demo_run.out, demo_run.tokenizer


@pytest.fixture(scope="session")
def demo_trained(demo_run) -> tuple[DemoRun, dict[str, Any], str]:
    """The session's demo after the demo's own training step (tools.demo `train_demo`: the tiny
    MM1, random init, 40 steps on CPU over the curated shards, checkpoints in root/run, the newest
    exported to root/export): what an `mm1 demo` run leaves behind. (demo run, the trainer's
    result, what train_demo printed)."""
    from tools.demo.run import train_demo

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train_demo(demo_run.root, demo_run.out)
    return demo_run, result, printed.getvalue()


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


# The files that take longest (seconds of one run's --durations on the 2-core machine, heaviest
# first). Under `make test` (pytest-xdist, whole files per process) they are handed out first, so
# the processes do not end with one long file running alone; a serial run only changes its order.
LONGEST_FILES = ("tests/train/test_layouts.py", "tests/train/test_trainer.py", "tests/curate/test_object_store.py",
                 "tests/curate/test_retry_failed.py", "tests/tools/test_demo.py", "tests/curate/test_resume.py",
                 "tests/tools/test_bench_worker_scaling.py", "tests/train/test_object_store_training.py",
                 "tests/curate/test_download_pipeline.py", "tests/train/data/test_loader.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    root = Path(__file__).resolve().parents[1]

    def key(item) -> int:
        try:
            return rank.get(Path(item.fspath).resolve().relative_to(root).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=key)  # stable: collection order within a file and among the others

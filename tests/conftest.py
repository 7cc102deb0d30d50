"""Session-wide guards: nothing in the tests may reach the network."""

from __future__ import annotations

import ipaddress
import os
import socket

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


@pytest.fixture(scope="module")
def chat_server(tiny_models, tmp_path_factory):
    """A real OpenAI-compatible server process on loopback over the tiny models (reset per use
    by the tests that script it)."""
    server = ChatServerProcess(*tiny_models, tmp_path_factory.mktemp("chat_server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_output(tmp_path_factory):
    """(curated output folder, its tokenizer.json): the demo's three kinds, curated once per
    session by the real runner from `tools.demo`'s inputs (training, report tests)."""
    from pathlib import Path

    from curate.recipe import load_recipe
    from curate.engine.driver import run_recipe
    from tools.demo.run import DEMO_RECIPE, demo_inputs, demo_overrides

    root = tmp_path_factory.mktemp("demo")
    with demo_inputs(root):
        recipe = load_recipe(DEMO_RECIPE, demo_overrides(root))
        run_recipe(recipe, progress=False)
    return Path(recipe.output.path), root / "inputs" / "tokenizer" / "tokenizer.json"


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

"""Shared fixtures for the runner's resume and failure tests.

One medium input corpus and one clean, uninterrupted reference run per session: every test that
kills, repeats or resumes work compares its output against that reference byte for byte.

The corpus mixes a bulk image folder (120 real JPEG crops plus an exact copy of one of them, so
dedup drops it across partitions; 10 files a partition, so a run has enough partitions for a
kill to land mid-stage) with the demo's three sources (their deliberately bad inputs give every
drop reason the stages emit). Small shards (7 samples) make partitions write several of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from curate.contract import LEDGER_DIR, read_manifest
from curate.recipe import Recipe, parse_recipe
from tools.bench.partition_memory import build_folder
from tools.demo.data import build_demo_inputs

BULK_IMAGES = 120
BULK_PER_PARTITION = 10
TMP_SUFFIX = ".tmp"


def recipe_data(inputs: Path, out: Path, **execution: Any) -> dict[str, Any]:
    """The test recipe as plain data (YAML-able); the demo's stages, small partitions and shards."""
    return {
        "name": "resume-test",
        "sources": [
            {"kind": "image_folder", "name": "bulk", "path": str(inputs / "bulk"),
             "captions": "sidecar", "files_per_partition": BULK_PER_PARTITION},
            {"kind": "image_folder", "name": "folder", "path": str(inputs / "demo" / "folder"),
             "captions": "sidecar", "files_per_partition": 12},
            {"kind": "image_folder", "name": "mapped", "path": str(inputs / "demo" / "mapped"),
             "captions": "captions.jsonl"},
            {"kind": "webdataset", "name": "wds", "path": str(inputs / "demo" / "wds")},
        ],
        "stages": [
            {"kind": "caption_length_filter", "min_chars": 5, "max_chars": 1000},
            {"kind": "image", "resize_mode": "keep_ratio", "image_size": 256, "format": "jpg",
             "quality": 90, "max_pixels": 50_000_000},
            {"kind": "image_size_filter", "min_width": 32, "min_height": 32},
            {"kind": "aspect_ratio_filter", "max_aspect_ratio": 3.0},
            {"kind": "exact_dedup"},
        ],
        "output": {"path": str(out), "shard_max_samples": 7, "shard_max_bytes": "4MB"},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB", "dashboard": False},
        "execution": {"batch_size": 4, **execution},
    }


def make_recipe(data: dict[str, Any]) -> Recipe:
    return parse_recipe(data, "<test recipe>")


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def digests(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def pairs_digests(out: Path) -> dict[str, str]:
    """Tars, sidecars and sizes.json: what a trainer reads."""
    return digests(Path(out) / "pairs")


def ledger_digests(out: Path) -> dict[str, str]:
    return digests(Path(out) / LEDGER_DIR)


def leftover_temporaries(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in Path(out).rglob(f"*{TMP_SUFFIX}"))


def check_ledger_invariant(out: Path) -> None:
    """Every input exactly once: ledger ids unique, inputs = kept + dropped = the manifest's counts."""
    manifest = read_manifest(out)
    ids: list[str] = []
    outcomes: dict[str, int] = {"kept": 0, "dropped": 0}
    for f in sorted((Path(out) / LEDGER_DIR).glob("*.parquet")):
        table = pq.read_table(f, columns=["id", "outcome"])
        ids += table.column("id").to_pylist()
        for o in table.column("outcome").to_pylist():
            outcomes[o] += 1
    assert len(ids) == len(set(ids)), "an input id appears twice in the ledger"
    counts = manifest["counts"]
    assert len(ids) == counts["inputs"] == counts["kept"] + counts["dropped"]
    assert outcomes == {"kept": counts["kept"], "dropped": counts["dropped"]}


@dataclass(frozen=True)
class Reference:
    """The clean, uninterrupted run every other run must equal."""

    inputs: Path
    out: Path
    manifest: dict[str, Any]
    pairs: dict[str, str]
    ledger: dict[str, str]

    # helpers for the tests (exposed here so test modules need not import conftest)
    write_recipe = staticmethod(write_recipe)
    pairs_digests = staticmethod(pairs_digests)
    check_ledger_invariant = staticmethod(check_ledger_invariant)

    def data(self, out: Path, **execution: Any) -> dict[str, Any]:
        """The reference recipe (as YAML-able data) writing to `out`; `execution` overrides."""
        return recipe_data(self.inputs, out, **execution)

    @staticmethod
    def manifest_bytes(out: Path) -> bytes:
        return (Path(out) / "manifest.json").read_bytes() + (Path(out) / "_work" / "run.json").read_bytes()

    def assert_same_output(self, out: Path) -> None:
        got_pairs, got_ledger = pairs_digests(out), ledger_digests(out)
        assert sorted(got_pairs) == sorted(self.pairs), "different shard files than the clean run"
        differ = sorted(k for k in self.pairs if got_pairs[k] != self.pairs[k])
        assert not differ, f"shards differ from the clean run: {differ[:5]}"
        assert got_ledger == self.ledger, "the ledger differs from the clean run"
        manifest = read_manifest(out)
        assert manifest["counts"] == self.manifest["counts"]
        assert manifest["kinds"] == self.manifest["kinds"]  # shard names, counts, bytes, sha256
        assert not leftover_temporaries(out)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only input corpus shared by the session (tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("resume-inputs")
    build_demo_inputs(root / "demo")
    bulk = root / "bulk"
    build_folder(bulk, BULK_IMAGES)
    shutil.copyfile(bulk / "000005.jpg", bulk / "000119_copy.jpg")  # an exact duplicate, another partition
    (bulk / "000119_copy.txt").write_text("the same crop as number five, copied")
    return root


@pytest.fixture(scope="session")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory, shared_cluster) -> Reference:
    """The clean run, on the session's LocalCluster (tests/conftest.py)."""
    out = tmp_path_factory.mktemp("resume-reference") / "curated"
    manifest = shared_cluster.run(make_recipe(recipe_data(corpus, out)))
    assert manifest["drops"].get("exact_dedup/duplicate", 0) >= 2  # the bulk copy and the demo's
    assert manifest["counts"]["partitions"] >= 15
    packs = [json.loads(m.read_text()) for m in (out / "_work" / "done").glob("pack-*.json")]
    assert sum(len(m["shards"]) >= 2 for m in packs) >= 4  # partitions write several shards (kills land in packs)
    for kind, entry in manifest["kinds"].items():  # full shards over partitions: only a kind's last is short
        assert [s["count"] for s in entry["shards"][:-1]] == [7] * (len(entry["shards"]) - 1), kind
    assert not leftover_temporaries(out)
    return Reference(corpus, out, manifest, pairs_digests(out), ledger_digests(out))


# ---------------------------------------------------------------------------------------------
# Shared with test modules that make their own reference runs (pytest's importlib mode means a
# test module cannot `import conftest`): the output checks above, and an external Dask cluster.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def output_checks() -> SimpleNamespace:
    """The helpers above, for modules comparing their runs with a reference of their own."""
    return SimpleNamespace(
        write_recipe=write_recipe, digests=digests, pairs_digests=pairs_digests,
        ledger_digests=ledger_digests, leftover_temporaries=leftover_temporaries,
        check_ledger_invariant=check_ledger_invariant,
    )


def _dask_exe(name: str) -> str:
    bin_dir = Path(sys.executable).parent
    return str(bin_dir / name) if (bin_dir / name).exists() else shutil.which(name) or name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_groups(procs: list[subprocess.Popen]) -> None:
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


@contextmanager
def dask_processes(tmp_path: Path, worker_args: list[tuple[str, ...]]) -> Iterator[str]:
    """A `dask scheduler` and one single-threaded `dask worker` per entry of `worker_args` (extra
    flags, e.g. ("--resources", "FAKEGPU=1")), all bound to 127.0.0.1; yields the scheduler address
    once every worker has registered, and always stops them all."""
    from distributed import Client

    wait = 300
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    # as the README tells external clusters: no sampling profiler in the workers (CPU we never read)
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}

    def start(name: str, *args: str) -> None:
        with open(tmp_path / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [_dask_exe("dask"), *args], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                start_new_session=True,  # its own process group: teardown reaches its nanny's worker too
                env=env,
            ))

    try:
        # --no-dashboard still starts each process's HTTP server: keep it on loopback
        http = ("--no-dashboard", "--dashboard-address", "127.0.0.1:0")
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), *http)
        for i, extra in enumerate(worker_args):
            start(f"worker{i}", "worker", address, "--nthreads", "1", "--nworkers", "1",
                  "--host", "127.0.0.1", *http, "--memory-limit", "2GiB", *extra)
        with Client(address, timeout=wait) as client:
            client.wait_for_workers(len(worker_args), timeout=wait)
        yield address
    finally:
        _stop_groups(procs[1:])  # workers first, then the scheduler
        _stop_groups(procs[:1])


@pytest.fixture
def external_scheduler(tmp_path: Path) -> Iterator[str]:
    """A `dask scheduler` and two single-threaded `dask worker`s bound to 127.0.0.1."""
    with dask_processes(tmp_path, [(), ()]) as address:
        yield address


@pytest.fixture
def fake_gpu_cluster(tmp_path: Path) -> Iterator[str]:
    """Like external_scheduler, but the first worker advertises a made-up resource, FAKEGPU=1
    (what a GPU worker advertises as GPU=1): placement is tested without a GPU."""
    with dask_processes(tmp_path, [("--resources", "FAKEGPU=1"), ()]) as address:
        yield address

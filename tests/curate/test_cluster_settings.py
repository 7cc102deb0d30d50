"""The dask settings the runner gives its workers reach them, and the YAML we ship for external
clusters says the same (README, "On a Dask cluster")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from curate.recipe import parse_recipe
from curate.engine.cluster import WORKER_CONFIG, Cluster

ROOT = Path(__file__).resolve().parents[2]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _probe() -> tuple[str | None, bool]:
    import dask

    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), dask.config.get("distributed.worker.profile.enabled")


def test_local_cluster_workers_get_the_worker_settings(tmp_path, monkeypatch):
    recipe = parse_recipe({
        "name": "cluster-settings",
        "sources": [{"kind": "image_folder", "name": "f", "path": str(tmp_path)}],
        "stages": [],
        "output": {"path": str(tmp_path / "out")},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "1GiB", "dashboard": False},
    }, "<test>")
    # A nanny started without these settings (a test's own LocalCluster) exports dask's default
    # MALLOC_TRIM_THRESHOLD_ into this process's environment for good (distributed's
    # `os.environ.update(pre_spawn_env)`), and every later worker inherits it: start clean.
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with Cluster(recipe) as cluster:
        seen = cluster.client.run(_probe)
    assert len(seen) == 2
    assert all(v == (None, False) for v in seen.values()), seen


def test_shipped_worker_yaml_matches_the_runner():
    path = ROOT / "recipes" / "cluster" / "dask-worker.yaml"
    assert _flatten(yaml.safe_load(path.read_text())) == WORKER_CONFIG
    # and dask reads it as meant (DASK_CONFIG=<file>): the variable is unset, not "None"
    code = ("import dask, distributed.nanny as n; "
            "print(sorted(n._get_env_variables('distributed.nanny.pre-spawn-environ')), "
            "dask.config.get('distributed.worker.profile.enabled'))")
    env = {**os.environ, "DASK_CONFIG": str(path)}
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MALLOC_TRIM_THRESHOLD_" not in out.stdout and out.stdout.strip().endswith("False")

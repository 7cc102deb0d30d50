"""The cluster path runs the same code as the embedded default: a recipe run against a real
`dask scheduler` and two `dask worker` processes (all on 127.0.0.1) gives shards and a ledger
byte-identical to the session's LocalCluster reference run (conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
from distributed import Client

from tools.verify import verify

BIN = Path(sys.executable).parent
MM1 = str(BIN / "mm1") if (BIN / "mm1").exists() else shutil.which("mm1") or "mm1"
WAIT = 300  # seconds: many times what a step takes; only a hang reaches it


@pytest.mark.slow
@pytest.mark.timeout(WAIT * 2)
def test_external_scheduler_gives_the_localcluster_shards(reference, external_scheduler, tmp_path):
    scheduler = external_scheduler
    out = tmp_path / "curated"
    recipe_file = reference.write_recipe(tmp_path / "recipe.yaml", reference.data(out))
    run = subprocess.run(
        [MM1, "curate", str(recipe_file), "--no-progress", "--address", scheduler],
        capture_output=True, text=True, timeout=WAIT,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    # The external workers did the work (each loaded the stages), not a LocalCluster of the driver.
    with Client(scheduler, timeout=WAIT) as client:
        stages_loaded = client.run(lambda: len(import_module("curate.engine.steps").loaded_stages()))
    assert len(stages_loaded) == 2 and all(stages_loaded.values()), stages_loaded

    reference.assert_same_output(out)
    reference.check_ledger_invariant(out)
    report = verify(out)
    assert report.ok, report.format()

"""The cluster path runs the same code as the embedded default: a recipe run against a real
`dask scheduler` and two `dask worker` processes (all on 127.0.0.1) gives shards and a ledger
byte-identical to the session's LocalCluster reference run (conftest.py). The run's driver is
this process (`run_recipe` with `cluster.address`); `mm1 curate --address` on such a cluster:
tests/curate/test_download_pipeline.py."""

from __future__ import annotations

from importlib import import_module

import pytest
from distributed import Client

from curate.engine.driver import run_recipe
from curate.recipe import parse_recipe
from tools.verify import verify

WAIT = 300  # seconds: many times what a step takes; only a hang reaches it


@pytest.mark.slow
@pytest.mark.timeout(WAIT * 2)
def test_external_scheduler_gives_the_localcluster_shards(reference, external_scheduler, tmp_path):
    scheduler = external_scheduler
    out = tmp_path / "curated"
    data = reference.data(out)
    data["cluster"] = {"address": scheduler}
    run_recipe(parse_recipe(data, "<test recipe>"), progress=False)

    # The external workers did the work (each loaded the stages), not a LocalCluster of the driver.
    with Client(scheduler, timeout=WAIT) as client:
        stages_loaded = client.run(lambda: len(import_module("curate.engine.steps").loaded_stages()))
    assert len(stages_loaded) == 2 and all(stages_loaded.values()), stages_loaded

    reference.assert_same_output(out)
    reference.check_ledger_invariant(out)
    report = verify(out)
    assert report.ok, report.format()

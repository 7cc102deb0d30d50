"""The 1-vs-2-worker benchmark at its smallest size (40 rows, the least that plants every defect;
`--quick`'s 64 add rows, not mechanisms): both runs curate the same URL list from the loopback
server, give the same outcome and byte-identical shards (determinism across worker counts,
DESIGN.md), and the report carries what BENCHMARKS.md quotes. No timing is asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tools.bench.worker_scaling import DEFECTS, QUICK, bench, main, print_table

pytestmark = pytest.mark.usefixtures("loopback_only")

RUN_KEYS = {
    "workers", "seconds", "cluster_start_s", "counts", "drops", "shards", "disk", "cpu_s", "phases",
    "inputs_per_s", "inputs_per_s_per_worker", "inputs_per_s_with_start", "cpu_ms_per_input", "workers_busy",
    "foreign_cpu_share", "steal_share", "inputs_per_s_each",
}


@pytest.mark.slow
def test_one_and_two_workers_give_the_same_shards(capsys: pytest.CaptureFixture[str]) -> None:
    size = {**QUICK, "n": 40}
    report = bench(workers=(1, 2), log=lambda s: None, **size)

    assert {"machine", "settings", "corpus", "planted", "runs", "speedup", "speedup_with_start",
            "same_outcome", "same_shards"} <= set(report)
    assert report["settings"]["partitions"] >= 8
    one, two = report["runs"]["1"], report["runs"]["2"]
    for run in (one, two):
        assert RUN_KEYS <= set(run)
        counts = run["counts"]
        assert counts["inputs"] == size["n"] == counts["kept"] + counts["dropped"]
        assert counts["partitions"] == report["settings"]["partitions"]
        assert run["shards"] and sum(s["count"] for s in run["shards"]) == counts["kept"]
        assert run["disk"]["tar_bytes"] == sum(s["bytes"] for s in run["shards"]) > 0
        assert run["seconds"] > 0 and run["cpu_s"]["workers"] > 0
        # every wall second is accounted to one phase
        ph = run["phases"]
        assert math.isclose(ph["row_stages_s"] + ph["global_passes_s"] + ph["plan_pack_s"] + ph["driver_only_s"],
                            run["seconds"], abs_tol=0.1)
        # three segments (each ending in a dedup pass), each with its own row stages
        assert len(ph["each_segment_s"]) == len(ph["each_global_s"]) == 3
    # every planted defect reached the stage meant to drop it
    for name, (_, code) in DEFECTS.items():
        assert one["drops"].get(code, 0) >= report["planted"][name] > 0, (name, one["drops"])

    # determinism across worker counts: the same kept/dropped counts and drop codes, the same bytes
    assert (one["counts"]["kept"], one["counts"]["dropped"], one["drops"]) == \
        (two["counts"]["kept"], two["counts"]["dropped"], two["drops"])
    assert [(s["name"], s["sha256"], s["sidecar_sha256"]) for s in one["shards"]] == \
        [(s["name"], s["sha256"], s["sidecar_sha256"]) for s in two["shards"]]
    assert report["same_outcome"] and report["same_shards"]

    speedup = report["speedup"]["2"]
    assert math.isfinite(speedup) and speedup > 0
    assert math.isfinite(report["speedup_with_start"]["2"]) and report["speedup_with_start"]["2"] > 0

    print_table(report)
    out = capsys.readouterr().out
    assert " 1 worker |" in out and " 2 workers |" in out and "speedup, 2 workers vs 1" in out


def test_cli_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """`--quick --json PATH` reaches bench with the quick size and writes the report (bench itself
    is replaced: the run above covers it)."""
    import tools.bench.worker_scaling as ws

    seen = {}

    def fake_bench(**kwargs):
        seen.update(kwargs)
        return {"settings": {k: v for k, v in kwargs.items() if k != "log"}}

    monkeypatch.setattr(ws, "bench", fake_bench)
    monkeypatch.setattr(ws, "print_table", lambda report: print("table"))
    target = tmp_path / "report.json"
    assert main(["--quick", "--json", str(target)]) == 0
    assert {k: seen[k] for k in QUICK} == QUICK and seen["workers"] == (1, 2)
    assert json.loads(target.read_text())["settings"]["n"] == QUICK["n"]
    assert capsys.readouterr().out.strip() == "table"
    assert main(["--n", "120", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["n"] == 120

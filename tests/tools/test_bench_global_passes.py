"""The global-passes benchmark (tools/bench/global_passes.py) at a toy size: its planted inputs
hold the duplicates it says, a pass runs through the runner's decide_global on a scheduler and
workers of their own and checks its outcome, and the JSON carries what BENCHMARKS.md quotes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from tools.bench.global_passes import PASSES, main, make_inputs, planted_keys


def test_planted_keys_copy_originals_only():
    keys, copied = planted_keys(10_000, 0.1, np.random.default_rng(0))
    assert 800 < copied.sum() < 1200
    assert len(np.unique(keys)) == 10_000 - copied.sum()  # each copy repeats an original's key
    assert set(keys[copied]) <= set(keys[~copied])


def test_every_stage_gets_inputs_with_its_columns(tmp_path):
    for stage in PASSES:
        if stage == "metaclip_balance":  # (a 500,000-entry metadata file: the pass test below covers it)
            continue
        made = make_inputs(stage, 300, 100, str(tmp_path / stage), 0.1, 8)
        assert len(made["files"]) == 3
        table = pq.read_table(made["files"][0])
        assert {"id", "_partition", "drop_reason"} < set(table.column_names) and table.num_rows == 100


def test_a_pass_and_a_whole_run_report_their_numbers(tmp_path, capsys):
    out = tmp_path / "gp.json"
    assert main(["--rows", "4000", "--rows-per-partition", "1000", "--stages", "paragraph_dedup",
                 "--json", str(out), "--tmp", str(tmp_path / "work")]) == 0
    assert main(["--partitions-run", "4x50", "--json", str(out), "--tmp", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert [p["stage"] for p in report["passes"]] == ["paragraph_dedup"]
    for p in report["passes"]:
        assert p["ok"] and p["rows"] == 4000 and p["partitions"] == 4 and p["tasks"] > 4
        assert p["peak_worker_rss_mib"] > 50 and p["driver_peak_rss_mib"] > 50 and p["scheduler_peak_rss_mib"] > 50
    run = report["partitions_runs"][0]
    assert run["ok"] and run["partitions"] == 4 and run["inputs"] == 200 and run["manifest_bytes"] > 0
    assert report["machine"]["cores"] >= 1
    assert "paragraph_dedup" in capsys.readouterr().out

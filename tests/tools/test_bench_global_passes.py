"""The global-passes benchmark (tools/bench/global_passes.py) at a toy size: its planted inputs
hold the duplicates it says, a pass runs through the runner's decide_global on a scheduler and
workers of their own and checks its outcome, and the JSON carries what BENCHMARKS.md quotes."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq

from tools.bench.global_passes import PASSES, machine, main, make_inputs, partitions_run, planted_keys, run_pass


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
    """run_pass and partitions_run in this process (main() runs each in a spawned driver of its
    own: the same functions, a few seconds of imports more), then the JSON main() writes and
    the markdown tables BENCHMARKS.md quotes."""
    args = argparse.Namespace(rows_per_partition=1000, duplicates=0.1, dim=8, workers=2, keep=False,
                              shuffle="p2p")
    p = run_pass("paragraph_dedup", 4000, args, tmp_path)
    assert p["ok"] and p["rows"] == 4000 and p["partitions"] == 4 and p["tasks"] > 4
    assert p["peak_worker_rss_mib"] > 50 and p["driver_peak_rss_mib"] > 50 and p["scheduler_peak_rss_mib"] > 50
    run = partitions_run(4, 50, args, tmp_path)
    assert run["ok"] and run["partitions"] == 4 and run["inputs"] == 200 and run["manifest_bytes"] > 0
    report = {"machine": machine(), "passes": [p], "partitions_runs": [run]}
    out = tmp_path / "gp.json"
    out.write_text(json.dumps(report))
    assert main(["--table", str(out)]) == 0
    table = capsys.readouterr().out
    assert "`paragraph_dedup`" in table and "all checked" in table and "4 partitions x 50 rows" in table
    assert report["machine"]["cores"] >= 1

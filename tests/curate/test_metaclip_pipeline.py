"""metaclip_balance through the runner: a resumed run, after an interruption in the first
segment or after the balancing pass wrote its decisions but not its marker, decides exactly what
the clean run decided (the draws hang on the sample ids, not on a process RNG or the order of
work), and the manifest carries the pass's entry-count distribution.

The pool is a URL list with no download stage: the balancing decisions are the point, and the
pack step drops every pair it keeps (no image), which the ledger records as any other outcome.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq

from curate.engine.driver import plan_job, prepare_output
from curate.engine.steps import run_segment
from curate.recipe import parse_recipe
from tools.report_balance import balance_section

from .conftest import check_ledger_invariant, ledger_digests

HEAD, T = 400, 50


def _pool(folder: Path) -> dict:
    rows = ["url,caption"]
    rows += [f"http://127.0.0.1:9/c{i}.jpg,a cat photo {i}" for i in range(HEAD)]
    rows += [f"http://127.0.0.1:9/t{j}_{k}.jpg,tail{j} drawing" for j in range(10) for k in range(5 + j)]
    rows += [f"http://127.0.0.1:9/n{i}.jpg,nothing here {i}" for i in range(50)]
    (folder / "urls.csv").write_text("\n".join(rows) + "\n")
    (folder / "metadata.txt").write_text("cat\n" + "".join(f"tail{j}\n" for j in range(10)))
    return {"name": "balance", "stages": [{"kind": "metaclip_balance", "metadata": str(folder / "metadata.txt"),
                                           "t": T}],
            "sources": [{"kind": "url_list", "name": "u", "path": str(folder / "urls.csv"),
                         "records_per_partition": 100}]}


def _recipe(data: dict, out: Path):
    # intermediates kept: the third run copies an output as a kill before the pass's marker leaves it
    return parse_recipe({**data, "output": {"path": str(out)}, "execution": {"keep_intermediate": True}},
                        "<test recipe>")


def _outcomes(out: Path) -> dict[str, str]:
    ledger = pq.read_table(out / "ledger").to_pandas()
    return dict(zip(ledger["id"], ledger["drop_reason"].fillna("kept")))


def test_interrupted_and_resumed_runs_balance_as_the_clean_run(shared_cluster, tmp_path):
    data = _pool(tmp_path)
    clean = tmp_path / "clean"
    manifest = shared_cluster.run(_recipe(data, clean))
    check_ledger_invariant(clean)
    outcomes = _outcomes(clean)
    reasons = sorted(set(outcomes.values()))
    assert {"balanced_out", "no_metadata_match"} <= set(reasons), reasons
    summary = manifest["global"]["metaclip_balance"]["summary"]
    head = summary["lists"]["other"]["head"]
    assert head[0]["entry"] == "cat" and head[0]["before"] == HEAD and head[0]["after"] < 2 * T
    assert all(h["before"] == h["after"] for h in head[1:])  # the tails, all under t
    assert summary["kept"] == sum(1 for i, r in outcomes.items() if r != "balanced_out"
                                  and r != "no_metadata_match")
    # the report's section: both curves, t, the head
    section = balance_section(manifest["global"], manifest["recipe"])
    assert section.count("<polyline") == 2 and f"t = {T}" in section and "<td>cat</td><td class=n>400</td>" in section

    # interrupted inside the first segment: half its partitions done, then resumed on the cluster
    resumed = tmp_path / "resumed"
    job = plan_job(_recipe(data, resumed))
    prepare_output(job, restart=False)
    for p in range(0, len(job.partitions), 2):
        run_segment(job, 0, p)
    shared_cluster.run(_recipe(data, resumed))
    assert ledger_digests(resumed) == ledger_digests(clean)

    # killed after the balancing pass wrote its decisions, before its marker: the pass runs again
    again = tmp_path / "again"
    shutil.copytree(clean, again)
    done = again / "_work" / "done"
    for marker in [done / "global0.json", *done.glob("pack-*.json")]:
        marker.unlink()
    (again / "manifest.json").unlink()
    shared_cluster.run(_recipe(data, again))
    assert ledger_digests(again) == ledger_digests(clean)
    check_ledger_invariant(again)

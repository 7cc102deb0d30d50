"""The MinHash benchmark (tools/bench/minhash_dedup.py) at a toy size: the corpus plants near
copies of real prose, both sides run to the end on the same files and find about the same
duplicates, and the report carries what BENCHMARKS.md quotes."""

from __future__ import annotations

import pytest

from tools.bench.minhash_dedup import build_corpus, print_table, run, sentence_pool
from curate.stages.minhash import shingles


def test_the_corpus_is_prose_with_planted_near_copies():
    assert len(sentence_pool()) > 1000
    docs, planted = build_corpus(500, seed=3)
    assert len(docs) == 500 and planted == 100 and len(set(docs)) == 500
    assert build_corpus(500, seed=3) == (docs, planted)  # deterministic
    # every planted copy has a near twin (Jaccard well above datatrove's 0.72 threshold)
    sets = [shingles(d, 5) for d in docs]
    best = sorted(max(len(a & b) / len(a | b) for b in sets if b is not a) for a in sets[:60])
    near = [j for j in best if j > 0.7]
    assert len(near) >= 10 and min(near) > 0.75
    assert best[0] < 0.2  # and unrelated documents are far apart


@pytest.mark.slow
def test_both_sides_run_and_agree_on_the_duplicates(capsys: pytest.CaptureFixture[str]) -> None:
    # no memory sizes: each would start another cluster (the comparison's own run reports its RSS)
    report = run(600, memory_sizes=[], workers=2, per_file=150)
    assert {"machine", "settings", "corpus", "ours", "datatrove", "speedup", "memory"} <= set(report)
    ours, theirs = report["ours"], report["datatrove"]
    assert ours["docs"] == theirs["docs"] == 600
    planted = report["corpus"]["planted_near_copies"]
    assert 0.8 * planted <= ours["duplicates"] <= planted + 5
    assert abs(ours["duplicates"] - theirs["duplicates"]) <= 0.05 * planted + 2
    assert ours["summary"]["duplicates"] == ours["duplicates"]
    assert ours["peak_rss_workers_mib"] >= ours["peak_rss_one_worker_mib"] > 0
    print_table(report)
    out = capsys.readouterr().out
    assert "speedup:" in out and "datatrove" in out

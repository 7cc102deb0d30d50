"""The MetaCLIP benchmark (tools/bench/metaclip_balance.py) at a toy size: its metadata and
captions are what it says, our matcher and the reference's agree on every caption, and the
balancing pass runs through a cluster and reports what BENCHMARKS.md quotes."""

from __future__ import annotations

import pytest

from tools.bench.metaclip_balance import build_captions, build_metadata, print_table, run, vocabulary


def test_metadata_and_captions_are_deterministic_and_overlap():
    words = vocabulary()
    assert len(words) > 20_000 and all(w.isalpha() for w in words[:1000])
    metadata = build_metadata(len(words) + 500, words)
    assert len(set(metadata)) == len(metadata) == len(words) + 500
    assert sum(" " in e for e in metadata) == 500  # the bigrams after the words
    captions = build_captions(200, words, seed=3)
    assert captions == build_captions(200, words, seed=3) and 4 <= min(len(c.split()) for c in captions)


@pytest.mark.slow
def test_ours_and_the_reference_match_the_same_and_balancing_runs(capsys, shared_cluster):
    report = run(entries=30_000, captions=2_000, rows=6_000, t=50, workers=2, loop_sample=5,
                 client=shared_cluster.client)  # the balancing pass on the session's cluster
    m = report["matching"]
    assert m["captions_differing"] == 0 and m["matches_per_caption"] > 1
    assert m["ours"]["captions_per_s"] > 0 and m["reference"]["captions_per_s"] > 0
    b = report["balance"]
    assert b["rows"] == 6_000 and b["kept"] + b["dropped"] == 6_000 and b["kept"] < 6_000
    assert set(b["drop_reasons"]) <= {"balanced_out", "no_metadata_match"}
    assert b["peak_rss_workers_mib"] > 0
    print_table(report)
    assert "speedup:" in capsys.readouterr().out

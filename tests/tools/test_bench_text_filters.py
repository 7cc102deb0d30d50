"""The text-filter benchmark at a toy size: both pipelines run in their own processes on the same
jsonl, keep the same documents, and the report carries what BENCHMARKS.md quotes."""

from __future__ import annotations

import pytest

from tools.bench.text_filters import corpus, print_table, run


def test_corpus_is_seeded_prose_and_junk():
    docs = corpus(200, seed=5)
    assert docs == corpus(200, seed=5) and docs != corpus(200, seed=6)
    assert len({d["id"] for d in docs}) == 200
    assert sum("\n\n" in d["text"] for d in docs) > 100  # multi-paragraph prose documents
    assert any("Lorem ipsum" in d["text"] for d in docs)


def test_both_pipelines_keep_the_same_documents(capsys: pytest.CaptureFixture[str]) -> None:
    r = run(120, batch_size=32, seed=1, repeat=1)
    assert r["same_kept"] and 0 < r["ours"]["kept"] == r["datatrove"]["kept"] < 120
    assert r["ours"]["docs_per_s"] > 0 and r["datatrove"]["docs_per_s"] > 0 and r["ratio"] > 0
    print_table(r)
    assert "same kept ids: True" in capsys.readouterr().out

"""The HTML extraction benchmark at a toy size: mechanics only (pages built, all three extractors
run on them, rates and ratios reported). Never a speed assertion."""

from __future__ import annotations

import pytest

from tools.bench.html_extraction import make_pages, print_table, run


def test_pages_are_deterministic_and_extract_to_documents():
    from curate.html_segments import Extracted, extract

    pages = make_pages(5, seed=1)
    assert pages == make_pages(5, seed=1)
    for url, page in pages:
        result = extract(page, url)
        assert isinstance(result, Extracted)
        assert any(s["type"] == "image" for s in result.segments)
        text = " ".join(s.get("text", "") for s in result.segments)
        assert "cookies" not in text and "Related topics" not in text and "Great explanation" not in text
        assert result.lang == "en" and result.title


def test_toy_run_reports_all_three(capsys: pytest.CaptureFixture[str]):
    r = run(12, batch_size=5, repeat=1)
    assert r["ours"]["dropped"] == 0 and r["ours"]["images"] > 0 and r["ours"]["chars"] > 0
    for name in ("ours", "trafilatura", "resiliparse"):
        assert r[name]["docs_per_s"] > 0
    assert set(r["ratio"]) == {"ours_vs_trafilatura", "ours_vs_resiliparse"}
    print_table(r)
    assert "| trafilatura.extract |" in capsys.readouterr().out

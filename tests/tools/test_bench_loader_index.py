"""The loader-index benchmark at a toy size (mechanics, not the figures BENCHMARKS.md quotes)."""

from __future__ import annotations

import json

from tools.bench.loader_index import main


def test_runs_at_tiny_sizes(tmp_path) -> None:
    out = tmp_path / "r.json"
    result = main(["--samples", "200", "2000", "--shard-samples", "100", "--repeats", "1", "--slots", "2", "--yield", "50", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert [s["samples"] for s in result["sizes"]] == [200, 2000]
    assert [s["shards"] for s in result["sizes"]] == [2, 20]
    for s in result["sizes"]:
        assert s["peak_rss_mib"] > 0 and s["startup_s"] > 0

"""tools/bench/recaption.py at toy size (the tiny RANDOM-weight VLM: mechanics only): both sides
run, every caption comes back, and the server's batcher sees concurrent requests together."""

from __future__ import annotations

import json

import pytest

from tools.bench.recaption import main

pytestmark = pytest.mark.usefixtures("loopback_only")


def test_recaption_benchmark_runs_at_toy_size(tmp_path):
    out = tmp_path / "bench.json"
    results = main(["--images", "8", "--new-tokens", "4", "--batches", "4", "--concurrency", "1", "4",
                    "--json", str(out)])
    assert [(r["side"], r.get("batch_size", r.get("concurrency"))) for r in results] == [
        ("local", 1), ("local", 4), ("server", 1), ("server", 4)]
    assert all(r["captions"] == 8 and r["captions_per_s"] > 0 for r in results)
    assert results[1]["model_calls"] == 2 and results[0]["model_calls"] == 8
    assert results[2]["server_max_batch"] == 1 and results[3]["server_max_batch"] > 1
    assert json.loads(out.read_text())["results"] == results

"""The CLIP-scoring and semantic-dedup benchmarks at toy sizes: they run, check their own
results (the semantic bench asserts the exact planted drops and the all-pairs count) and report
what BENCHMARKS.md quotes. Random weights: speed only, never quality. The smallest sizes that show
each mechanism: open_clip's smallest ViT config and two batches; one worker for the semantic
bench, whose sizes fit one partition each (a second worker would only add its start)."""

from __future__ import annotations

import pytest


def test_clip_scoring_bench_reports_both_rates():
    from tools.bench.clip_scoring import run

    r = run("ViT-S-32-alt", n_images=4, batch_size=2, device="cpu", precision="fp32", threads=2)
    assert r["bare_images_per_s"] > 0 and r["stage_images_per_s"] > 0 and r["ratio"] > 0


@pytest.mark.slow
def test_semantic_scaling_bench_finds_exactly_the_planted_copies():
    from tools.bench.semantic_scaling import run

    rows = run([1000, 3000], workers=1, dim=64, threshold=0.95)
    assert [r["rows"] for r in rows] == [1000, 3000]
    assert all(r["dropped"] > 0 and r["candidate_pairs"] >= r["verified_pairs"] for r in rows)
    assert "all_pairs_seconds" in rows[0]

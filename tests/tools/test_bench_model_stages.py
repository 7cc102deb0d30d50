"""The CLIP-scoring and semantic-dedup benchmarks at toy sizes: they run, check their own
results (the semantic bench asserts the exact planted drops and the all-pairs count) and report
what BENCHMARKS.md quotes. Random weights: speed only, never quality."""

from __future__ import annotations

import pytest


def test_clip_scoring_bench_reports_both_rates():
    from tools.bench.clip_scoring import run

    r = run("ViT-B-32", n_images=8, batch_size=4, device="cpu", precision="fp32", threads=2)
    assert r["bare_images_per_s"] > 0 and r["stage_images_per_s"] > 0 and r["ratio"] > 0


@pytest.mark.slow
def test_semantic_scaling_bench_finds_exactly_the_planted_copies():
    from tools.bench.semantic_scaling import run

    rows = run([1000, 3000], workers=2, dim=64, threshold=0.95)
    assert [r["rows"] for r in rows] == [1000, 3000]
    assert all(r["dropped"] > 0 and r["candidate_pairs"] >= r["verified_pairs"] for r in rows)
    assert "all_pairs_seconds" in rows[0]

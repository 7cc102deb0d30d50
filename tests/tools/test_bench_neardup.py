"""The near-dedup scaling benchmark at a toy size: decide finds exactly the planted duplicates at
both sizes, and the report carries what BENCHMARKS.md quotes. One worker: both sizes fit one
partition (10,000 rows), so a second worker would only add its start."""

from __future__ import annotations

import pytest

from tools.bench.neardup_scaling import brute_force_pairs, print_table, run, synthetic


def test_synthetic_planted_pairs_are_the_only_near_pairs():
    frame, expected = synthetic(3000, max_distance=4)
    assert expected > 100 and frame["id"].is_unique
    # every planted copy is within 4 bits of its seed; nothing else is near anything
    assert brute_force_pairs(frame["image_phash"].to_numpy(), 4) >= expected


@pytest.mark.slow
def test_decide_is_correct_at_both_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    report = run([2000, 6000], workers=1, bands=None, max_distance=4)
    assert {"machine", "settings", "sizes", "ratio", "brute_force"} <= set(report)
    for size in (2000, 6000):
        r = report["sizes"][size]
        assert r["correct"] and r["dropped"] == r["expected_dropped"] > 0
        assert r["candidate_pairs"] >= r["verified_pairs"]
    assert report["settings"]["band_keys"] == 35
    print_table(report)
    assert "brute force all pairs" in capsys.readouterr().out

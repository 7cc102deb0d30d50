"""MM1's learning-rate rule and schedule: values at the ends and at warmup's peak."""

from __future__ import annotations

import math

import pytest

from train.schedule import lr_lambda, mm1_peak_lr


def test_mm1_peak_lr_follows_the_papers_fit():
    for n in (9e6, 1.2e9, 3e9, 30e9):
        assert mm1_peak_lr(int(n)) == pytest.approx(math.exp(-0.4214 * math.log(n) - 0.5535))
    # about 5.8e-5 for 3B parameters, falling with size
    assert mm1_peak_lr(3_000_000_000) == pytest.approx(5.84e-5, rel=0.01)
    assert mm1_peak_lr(30_000_000_000) < mm1_peak_lr(3_000_000_000) < mm1_peak_lr(300_000_000)
    with pytest.raises(ValueError):
        mm1_peak_lr(0)


def test_warmup_then_cosine_to_the_floor():
    warmup, total = 2000, 100_000
    assert lr_lambda(0, warmup, total) == 0.0
    assert lr_lambda(1000, warmup, total) == pytest.approx(0.5)
    assert lr_lambda(warmup, warmup, total) == pytest.approx(1.0)
    midway = warmup + (total - warmup) // 2
    assert lr_lambda(midway, warmup, total) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_lambda(total, warmup, total) == pytest.approx(0.1)
    assert lr_lambda(total + 500, warmup, total) == pytest.approx(0.1)  # held after the end
    values = [lr_lambda(s, warmup, total) for s in range(warmup, total + 1, 997)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically


def test_no_warmup_and_other_floors():
    assert lr_lambda(0, 0, 10) == pytest.approx(1.0)
    assert lr_lambda(10, 0, 10, floor=0.0) == pytest.approx(0.0)
    assert lr_lambda(5, 5, 5, floor=0.2) == pytest.approx(1.0)  # warmup ends at the last step

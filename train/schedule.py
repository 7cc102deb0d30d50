"""MM1's learning-rate rule and schedule (McKinzie et al. 2024, §3.4 and appendix).

The peak learning rate follows the paper's fit over model sizes, eta = exp(-0.4214 ln N - 0.5535)
for N parameters; the schedule warms up linearly from 0 over `warmup` steps (2000 in MM1) and
then decays along a cosine to `floor` times the peak (10% in MM1) at the last step. Pure
functions: the trainer wraps `lr_lambda` in a `LambdaLR`.
"""

from __future__ import annotations

import math


def mm1_peak_lr(n_params: int) -> float:
    """MM1's peak learning rate for a model of `n_params` parameters."""
    if n_params <= 0:
        raise ValueError(f"n_params must be positive, got {n_params}")
    return math.exp(-0.4214 * math.log(n_params) - 0.5535)


def lr_lambda(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """The multiplier of the peak learning rate for optimizer step `step` (1-based: the first
    update is step 1, so it is not wasted at 0): `step / warmup` during warmup, then a cosine from
    1 to `floor` reached at `total` and held after."""
    if step < warmup:
        return step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

"""Monte Carlo checks shared by the noise and sampler tests.

Tolerances: a pooled mean of n independent unit-variance values has standard error
1/sqrt(n); a pooled variance estimate of n Gaussian values has standard error sqrt(2/n)
(relative); a pooled mean of products of two independent N(0, 1) has standard error
1/sqrt(n).  Checks use SIGMAS standard errors (fixed seeds make them deterministic).
"""

from __future__ import annotations

import math

SIGMAS = 5.0


def check_unit(values, expected_var, label):
    n = values.numel()
    assert abs(values.mean().item()) < SIGMAS * math.sqrt(expected_var / n), f"{label}: mean {values.mean().item()}"
    ratio = values.var().item() / expected_var
    assert abs(ratio - 1) < SIGMAS * math.sqrt(2 / n), f"{label}: variance {values.var().item()} expected {expected_var}"


def block_pairs(residual, mask):
    """Products of the (0,0) pixel of each 2x2 block with its three partners, where ``mask``."""
    top_left = residual[..., 0::2, 0::2]
    keep = mask[..., 0::2, 0::2]
    return [(top_left * residual[..., dy::2, dx::2])[keep] for dy, dx in ((0, 1), (1, 0), (1, 1))]

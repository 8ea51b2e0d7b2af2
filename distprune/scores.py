"""Importance of each weight: pure tensor functions, (out, in) weights in, scores out.

Scores are non-negative. |W| of bf16/fp16 weights stays in that dtype (abs is exact, so
the order is the float32 order and the radix selector needs one pass); everything else
is computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from distprune.select import HALF_DTYPES


def magnitude(weight: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """|W|, shape (out, in)."""
    return weight.abs() if weight.dtype in HALF_DTYPES else weight.float().abs()


def wanda(weight: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al., 2023): norms is (in,), the L2 norm of each input
    channel over the calibration tokens."""
    if norms is None:
        raise ValueError("wanda scores need the activation norms of the layer")
    # abs of a 16-bit weight is exact; the product is computed in float32 by type promotion
    return weight.abs() * norms.to(device=weight.device, dtype=torch.float32)[None, :]


@dataclass(frozen=True)
class Scorer:
    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    needs_stats: bool  # needs calibration statistics (activation norms)


SCORERS = {
    "magnitude": Scorer(magnitude, needs_stats=False),
    "wanda": Scorer(wanda, needs_stats=True),
}

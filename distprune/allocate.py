"""Sparsity per layer: how many weights each layer loses (its target), adding up to exactly
round(sparsity * n) over the model whatever the allocation.

- ``uniform``: every layer at prune.sparsity (N:M: exactly sparsity * m of every group).
- ``owl`` (Yin et al., ICML 2024, Outlier Weighed Layerwise sparsity): per decoder block
  b, D_b = the fraction of its scores above prune.owl_m times the block's mean score;
  r_b = (D_b - min D) / (max D - min D) * 2 * owl_lambda; block sparsity = prune.sparsity
  + mean(r) - r_b: blocks with more outliers keep more weights.
- ``global``: a layer's target is how many of its weights fall below one exact global
  threshold over the (normalized, ``normalized``) scores; the layer's own rule (per row,
  or SparseGPT's solve) then decides which weights.

A layer's ideal count (sparsity_l * numel_l) is rounded by largest remainder so that the
targets add up exactly (``exact``); within a row scope a layer's target is spread over its
rows by ``select.rows_mask`` (k // rows each, one more where the next weight is cheapest).

Every rank passes its own layers; the layer list is gathered (rank order is layer order),
and what the scores contribute (per-layer sums and counts) is reduced as vectors with one
entry per layer that exactly one rank fills, so targets never depend on the number of
ranks. The one floating-point reduction, a layer's mean score, is computed by the rank
that owns the layer and rounded to float32 before it is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distprune.dist import SINGLE, Comm
from distprune.layers import PrunableLayer
from distprune.select import ScoreStream, TieBudget, select, target_count

TINY = torch.finfo(torch.float32).tiny  # a mean of 0 divides 0 scores: 0 / tiny = 0


@dataclass(frozen=True)
class Entry:
    """What allocation needs to know of a layer on any rank."""
    name: str
    rows: int
    cols: int
    block: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass
class Allocation:
    targets: dict[str, int]  # layer name -> weights to prune, every layer of the model
    block_sparsity: dict[int, float] | None = None  # owl: each block's sparsity before rounding


def entries(own: list[PrunableLayer], comm: Comm = SINGLE) -> list[Entry]:
    """Every rank's layers, in layer order (rank order is layer order)."""
    mine = [Entry(layer.name, *layer.weight.shape, layer.block) for layer in own]
    return [e for part in comm.all_gather_objects(mine) for e in part]


def normalized(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Scores divided by the mean score of their layer or of their output row (float32),
    so that one global threshold compares layers of different scale; ``none``: as they are."""
    if how == "none":
        return scores
    if how == "layer":
        mean = scores.sum(dtype=torch.float64) / scores.numel()
    elif how == "row":  # float32 sums (cascade summation), 9x faster than float64 on CPU; float64 on overflow
        mean = scores.float().sum(1, keepdim=True)
        if not bool(torch.isfinite(mean).all()):
            mean = scores.sum(1, keepdim=True, dtype=torch.float64)
        mean = mean / scores.shape[1]
    else:
        raise ValueError(f"unknown normalization {how!r}")
    return scores.float() / mean.float().clamp_min(TINY)


def exact(ideal: list[float], layers: list[Entry], k: int) -> dict[str, int]:
    """Whole targets near the ideal counts that add up to exactly k: the ideal counts are
    shifted by one common sparsity so that they add up to k, kept inside [0, numel], and
    rounded by largest remainder (ties: layer order)."""
    numels = [e.numel for e in layers]
    shift = (k - math.fsum(ideal)) / max(sum(numels), 1)
    x = [min(max(v + shift * n, 0.0), n) for v, n in zip(ideal, numels, strict=True)]
    counts = [math.floor(v) for v in x]
    order = sorted(range(len(x)), key=lambda i: (counts[i] - x[i], i))  # largest remainder first
    left = k - sum(counts)
    while left:
        step = 1 if left > 0 else -1
        for i in order if step > 0 else reversed(order):
            if left and 0 <= counts[i] + step <= numels[i]:
                counts[i] += step
                left -= step
    return {e.name: c for e, c in zip(layers, counts, strict=True)}


def uniform(layers: list[Entry], sparsity: float, scope: str, m: int = 4) -> Allocation:
    if scope == "nm":  # sparsity * m is whole: every layer exactly
        n = round(sparsity * m)
        return Allocation({e.name: e.numel // m * n for e in layers})
    total = target_count(sparsity, sum(e.numel for e in layers))
    return Allocation(exact([sparsity * e.numel for e in layers], layers, total))


Score = Callable[[PrunableLayer], torch.Tensor]  # a layer's (out, in) non-negative scores


def _per_layer(layers: list[Entry], own: list[PrunableLayer], value: Callable[[PrunableLayer], float | int],
               dtype: torch.dtype, comm: Comm) -> list:
    """value(layer) of every layer of the model on every rank: each rank fills its own
    layers' entries of a zero vector and the vectors are summed (x + 0 is exact)."""
    index = {e.name: i for i, e in enumerate(layers)}
    out = torch.zeros(len(layers), dtype=dtype, device="cpu")
    for layer in own:
        out[index[layer.name]] = value(layer)
    return comm.all_reduce_sum(out).tolist()


def owl(layers: list[Entry], own: list[PrunableLayer], score: Score, sparsity: float, owl_m: float,
        owl_lambda: float, comm: Comm = SINGLE) -> Allocation:
    sums = _per_layer(layers, own, lambda layer: float(score(layer).sum(dtype=torch.float64)), torch.float64, comm)
    blocks: dict[int, list[int]] = {}
    for i, e in enumerate(layers):
        blocks.setdefault(e.block, []).append(i)
    size = {b: sum(layers[i].numel for i in members) for b, members in blocks.items()}
    mean = {b: math.fsum(sums[i] for i in members) / size[b] for b, members in blocks.items()}
    block_of = {e.name: e.block for e in layers}

    def outliers(layer: PrunableLayer) -> int:
        s = score(layer)
        limit = torch.tensor(owl_m * mean[block_of[layer.name]], dtype=torch.float32, device=s.device)
        return int(torch.count_nonzero(s.float() > limit))

    counts = _per_layer(layers, own, outliers, torch.int64, comm)
    ratio = {b: sum(counts[i] for i in members) / size[b] for b, members in blocks.items()}
    low, high = min(ratio.values()), max(ratio.values())
    r = {b: (d - low) / (high - low) * 2 * owl_lambda if high > low else 0.0 for b, d in ratio.items()}
    centre = math.fsum(r.values()) / len(r)
    block_sparsity = {b: sparsity + centre - rb for b, rb in r.items()}
    total = target_count(sparsity, sum(e.numel for e in layers))
    targets = exact([block_sparsity[e.block] * e.numel for e in layers], layers, total)
    return Allocation(targets, block_sparsity)


def global_budgets(layers: list[Entry], own: list[PrunableLayer], score: Score, sparsity: float, selector: str,
                   comm: Comm = SINGLE, **search) -> Allocation:
    """Each layer's count below one exact global threshold over ``score`` (normalize it
    first: ``normalized``)."""
    n = sum(e.numel for e in layers)
    k = target_count(sparsity, n)
    stream = ScoreStream([layer.name for layer in own], lambda i: score(own[i]))
    budget = TieBudget(select(selector, stream, k, n, comm, **search), comm)
    counts = _per_layer(layers, own, lambda layer: int(torch.count_nonzero(budget.mask(score(layer)))), torch.int64,
                        comm)
    return Allocation(exact(counts, layers, k))  # exact already but for the approximate search selector


def allocate(cfg, own: list[PrunableLayer], score: Score | None, comm: Comm = SINGLE) -> Allocation:
    """The config's allocation (cfg: a PruneConfig) over every rank's ``own`` layers; score
    gives a layer's allocation scores (unused by uniform)."""
    layers = entries(own, comm)
    if cfg.allocation == "uniform":
        return uniform(layers, cfg.sparsity, cfg.scope, cfg.m)
    if cfg.allocation == "owl":
        return owl(layers, own, score, cfg.sparsity, cfg.owl_m, cfg.owl_lambda, comm)
    if cfg.allocation == "global":
        return global_budgets(layers, own, lambda layer: normalized(score(layer), cfg.normalization), cfg.sparsity,
                              cfg.selector, comm, search_tol=cfg.search_tol, search_max_iter=cfg.search_max_iter)
    raise ValueError(f"unknown allocation {cfg.allocation!r}")

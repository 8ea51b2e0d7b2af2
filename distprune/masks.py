"""Comparison groups (global, layer, row, N:M) and applying their masks as +0.0.

Scores are recomputed from the weights for every pass instead of cached, so memory
holds one layer's scores at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distprune import allocate
from distprune.dist import SINGLE, Comm
from distprune.layers import PrunableLayer
from distprune.progress import progress
from distprune.select import (
    ScoreStream,
    Selection,
    TieBudget,
    check_finite,
    row_mask,
    rows_mask,
    select,
    target_count,
)

ScoreFn = Callable[[PrunableLayer], torch.Tensor]  # layer -> (out, in) scores
RowsFn = Callable[[PrunableLayer, int, int], torch.Tensor]  # (layer, a, b) -> the scores of rows [a, b)
# comparison groups: the whole model, a layer, an output row, m consecutive weights of a row


@dataclass
class LayerResult:
    name: str
    numel: int
    pruned: int  # weights this run set to zero
    zeros: int  # zeros in the weight afterwards (pruned or zero before)
    target: int  # weights it was to lose (its allocation; global scope: what the threshold took)
    block: int  # its decoder block
    expert: int | None = None  # its expert's index in a fused experts tensor (moe.py)


@dataclass
class GroupsResult:
    layers: list[LayerResult]
    selection: Selection | None = None  # the global selection, for global scope
    passes: int = 0  # streaming passes over the scores, summed over groups
    seconds: dict[str, float] = field(default_factory=lambda: {"score+select": 0.0, "mask": 0.0})

    def extend(self, other: GroupsResult) -> None:
        """Add the results of more per-layer groups (sequential pruning, block by block)."""
        self.layers += other.layers
        self.passes += other.passes
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


def _apply(layer: PrunableLayer, mask: torch.Tensor, target: int | None = None) -> LayerResult:
    w = layer.weight
    w.masked_fill_(mask, 0.0)  # +0.0, never -0.0
    pruned = int(torch.count_nonzero(mask))
    zeros = int(torch.count_nonzero(w == 0))  # faster than count_nonzero(w) on 16-bit weights
    return LayerResult(layer.name, layer.numel, pruned, zeros, pruned if target is None else target, layer.block,
                       layer.expert)


def write_solved(layer: PrunableLayer, weight: torch.Tensor, mask: torch.Tensor, target: int) -> LayerResult:
    """Replace a layer's weight by a solve's (out, in) result, with the masked entries +0.0."""
    layer.weight.copy_(weight.to(device=layer.weight.device, dtype=layer.weight.dtype))
    return _apply(layer, mask.to(layer.weight.device), target)


def prune_groups(layers: list[PrunableLayer], score: ScoreFn, scope: str, sparsity: float,
                 selector: str, comm: Comm = SINGLE, show: bool = True, m: int = 4,
                 targets: dict[str, int] | None = None, rows: RowsFn | None = None, **search) -> GroupsResult:
    """Prune the comparison groups of the scope: global, round(sparsity * n) weights of the
    whole model; layer and row, each layer its target (``targets``, allocate.py; a row
    scope spreads it over the rows, ``rows_mask``); nm, sparsity * m of every run of m
    consecutive weights of a row. ``rows``: the scores of a row range of a layer, when a
    layer's scores go row by row (the global scope then streams pieces of layers,
    ``ScoreStream``)."""
    if scope == "global":
        return _prune_global(layers, score, rows, sparsity, selector, comm, show, search)
    targets = targets if targets is not None else allocate.uniform(allocate.entries(layers), sparsity, scope, m).targets
    res = GroupsResult([])
    for layer in progress(layers, f"{scope} prune", "layer", show):
        t0 = time.perf_counter()
        s = score(layer)
        k = targets[layer.name]
        if scope in ("row", "nm"):
            check_finite(layer.name, s)
            mask = rows_mask(s, k) if scope == "row" else row_mask(s.view(-1, m), round(sparsity * m)).view_as(s)
            res.passes += 1
        elif scope == "layer":
            stream = ScoreStream([layer.name], lambda _i, s=s: s)  # one layer: its scores fit
            sel = select(selector, stream, k, s.numel(), SINGLE, **search)
            mask = TieBudget(sel).mask(s)
            res.passes += sel.passes
        else:
            raise ValueError(f"unknown scope {scope!r}")
        t1 = time.perf_counter()
        res.layers.append(_apply(layer, mask, k))
        res.seconds["score+select"] += t1 - t0
        res.seconds["mask"] += time.perf_counter() - t1
    return res


def _prune_global(layers, score, rows, sparsity, selector, comm, show, search) -> GroupsResult:
    n = torch.tensor([sum(layer.numel for layer in layers)], dtype=torch.int64, device="cpu")
    comm.all_reduce_sum(n)
    n = int(n)

    # one layer at a time (scoring whole layers in threads was 16-44% slower on CPU,
    # docs/BENCHMARKS.md), a row-wise layer in pieces
    stream = ScoreStream([layer.name for layer in layers], lambda i: score(layers[i]), 1,
                         lambda it, desc: progress(it, desc, "layer", show),
                         rows=None if rows is None else lambda i, a, b: rows(layers[i], a, b),
                         shapes=[tuple(layer.weight.shape) for layer in layers])
    t0 = time.perf_counter()
    sel = select(selector, stream, target_count(sparsity, n), n, comm, **search)
    t1 = time.perf_counter()
    budget = TieBudget(sel, comm)
    # a zero weight scores 0 (scores.py): below a threshold > 0 it is pruned, so counted already
    positive = sel.threshold is not None and float(sel.threshold) > 0
    results = []
    for i in progress(range(len(layers)), "mask", "layer", show):
        layer = layers[i]
        pruned = budget.prune_layer_(layer.weight, stream, i)
        zeros = pruned if positive else int(torch.count_nonzero(layer.weight == 0))
        results.append(LayerResult(layer.name, layer.numel, pruned, zeros, pruned, layer.block, layer.expert))
    seconds = {"score+select": t1 - t0, "mask": time.perf_counter() - t1}
    return GroupsResult(results, sel, sel.passes, seconds)

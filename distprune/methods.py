"""The pruning methods: one registry entry each, and the only place that names them.

A method declares what it accumulates during calibration (nothing, or a ``stats``
accumulator, which says how its statistics reduce over ranks and whether they are
cached), and then either scores weights (``score``: every scope and selector applies) or
solves a layer (``solve``: new weights and mask for a target sparsity). ``options`` are
the PruneConfig keys that only this method reads; ``scopes`` the comparison groups it
supports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from distprune import scores, sparsegpt
from distprune.masks import SCOPES
from distprune.stats import ChannelSums, Hessians

if TYPE_CHECKING:
    from distprune.config import PruneConfig

# (weight (out, in), the layer's statistics or None, config) -> (out, in) non-negative scores
ScoreFn = Callable[[torch.Tensor, Any, "PruneConfig"], torch.Tensor]
# (weight (out, in), the layer's statistics, config, weights to prune) -> new weight and mask (sparsegpt.Solved)
SolveFn = Callable[[torch.Tensor, Any, "PruneConfig", int], sparsegpt.Solved]


@dataclass(frozen=True)
class Method:
    statistic: Callable | None  # (layers, comm) -> a stats accumulator; None: needs no calibration
    score: ScoreFn | None = None
    solve: SolveFn | None = None
    options: tuple[str, ...] = ()
    scopes: tuple[str, ...] = SCOPES
    allocation: str | None = None  # a method without scores: the method whose scores allocate its sparsity

    @property
    def calibrated(self) -> bool:
        return self.statistic is not None


METHODS: dict[str, Method] = {
    "magnitude": Method(None, score=lambda w, _st, _cfg: scores.magnitude(w)),
    "wanda": Method(ChannelSums, score=lambda w, st, _cfg: scores.wanda(w, st.norm())),
    "ria": Method(ChannelSums, score=lambda w, st, cfg: scores.ria(w, st.norm(), cfg.ria_a), options=("ria_a",)),
    # one mask for the whole model would need a solve of every layer at once; global budgets
    # (prune.allocation=global) give each layer its count instead. Its sparsity is allocated by
    # Wanda's scores of the dense model (its Hessian's diagonal holds the same channel norms).
    "sparsegpt": Method(lambda layers, comm: Hessians(layers, comm, sparsegpt.solve_cost),
                        solve=lambda w, h, cfg, k: sparsegpt.solve(w, h, k, cfg.scope, cfg.m, cfg.blocksize,
                                                                   cfg.percdamp),
                        options=("percdamp", "blocksize"), scopes=("layer", "row", "nm"), allocation="wanda"),
}
OPTIONS = tuple(dict.fromkeys(o for method in METHODS.values() for o in method.options))  # method-specific keys


def of(cfg: PruneConfig) -> Method:
    """The method as ``cfg`` runs it (``PruneConfig.spec``)."""
    return METHODS[cfg.method]


def allocating(method: Method) -> Method:
    """The method whose statistics and scores decide a non-uniform allocation for
    ``method``: itself, or for a solve method the one it names."""
    return METHODS[method.allocation] if method.allocation else method

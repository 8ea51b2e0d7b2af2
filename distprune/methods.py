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

from distprune import alps, scores, sparsegpt
from distprune.config import METHOD_OPTIONS, REFIT_OPTIONS, SCOPES, SOLVE_SCOPES
from distprune.select import scope_mask
from distprune.stats import ChannelSums, Hessians, LayerStats

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
    rowwise: bool = False  # score(w[a:b]) == score(w)[a:b]: a row's scores need only that row (and the stats)

    @property
    def calibrated(self) -> bool:
        return self.statistic is not None


METHODS: dict[str, Method] = {
    "magnitude": Method(None, score=lambda w, _st, _cfg: scores.magnitude(w), rowwise=True),
    "wanda": Method(ChannelSums, score=lambda w, st, _cfg: scores.wanda(w, st.norm()), rowwise=True),
    "ria": Method(ChannelSums, score=lambda w, st, cfg: scores.ria(w, st.norm(), cfg.ria_a),
                  options=METHOD_OPTIONS["ria"]),
    # one mask for the whole model would need a solve of every layer at once; global budgets
    # (prune.allocation=global) give each layer its count instead. Its sparsity is allocated by
    # Wanda's scores of the dense model (its Hessian's diagonal holds the same channel norms).
    "sparsegpt": Method(lambda layers, comm: Hessians(layers, comm, sparsegpt.solve_cost),
                        solve=lambda w, h, cfg, k: sparsegpt.solve(w, h, k, cfg.scope, cfg.m, cfg.blocksize,
                                                                   cfg.percdamp),
                        options=METHOD_OPTIONS["sparsegpt"], scopes=SOLVE_SCOPES, allocation="wanda"),
    # ALPS (alps.py): ADMM over the support, then the refit; distributed like sparsegpt
    "alps": Method(lambda layers, comm: Hessians(layers, comm, alps.solve_cost),
                   solve=lambda w, h, cfg, k: alps.solve(w, h, k, cfg.scope, cfg.m, cfg.alps_rho, cfg.alps_max_iter,
                                                         cfg.alps_update_iter, refit_iters=cfg.refit_iters,
                                                         percdamp=cfg.percdamp),
                   options=METHOD_OPTIONS["alps"], scopes=SOLVE_SCOPES, allocation="wanda"),
}


def of(cfg: PruneConfig) -> Method:
    """The method as ``cfg`` runs it: with ``prune.refit`` a solve
    method whose solve is the method's own mask (its scores' selection, or its solve)
    followed by the refit of the kept weights on the layer's Hessian (alps.refit); it
    collects Hessians, is distributed like sparsegpt, and allocates by its own scores."""
    method = METHODS[cfg.method]
    if not cfg.refit:
        return method
    return Method(lambda layers, comm: Hessians(layers, comm, alps.refit_cost),
                  solve=lambda w, h, c, k: _refit(method, w, h, c, k),
                  options=tuple(dict.fromkeys((*method.options, *REFIT_OPTIONS))), scopes=SOLVE_SCOPES,
                  allocation=method.allocation or cfg.method)


def _refit(method: Method, w: torch.Tensor, h: torch.Tensor, cfg: PruneConfig, k: int) -> sparsegpt.Solved:
    """``method``'s mask of k weights of w, its kept weights refit on the Hessian h. A score
    method's statistics come from h: its diagonal is 2 * mean(x_j^2), Wanda's squared norms
    times 2."""
    if method.solve is not None:
        first = method.solve(w, h, cfg, k)
        return alps.refit(w, first.mask, h, cfg.refit_iters, cfg.percdamp, start=first.weight)
    st = LayerStats.from_norms((h.diagonal().clamp(min=0) / 2).sqrt()) if method.calibrated else None
    mask = scope_mask(method.score(w.float(), st, cfg).float(), k, cfg.scope, cfg.m)
    return alps.refit(w, mask, h, cfg.refit_iters, cfg.percdamp)


def allocating(method: Method) -> Method:
    """The method whose statistics and scores decide a non-uniform allocation for
    ``method``: itself, or for a solve method the one it names."""
    return METHODS[method.allocation] if method.allocation else method

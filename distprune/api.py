"""Python API: prune an already-loaded model in place."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from distprune.config import ConfigError, PruneConfig
from distprune.dist import SINGLE, Comm
from distprune.masks import GroupsResult, prune_groups
from distprune.models import PrunableLayer, prunable_layers
from distprune.scores import SCORERS


@dataclass
class PruneResult:
    config: PruneConfig
    groups: GroupsResult

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.groups.layers)

    @property
    def pruned(self) -> int:
        return sum(r.pruned for r in self.groups.layers)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.groups.layers)

    def summary(self) -> dict:
        """The pruning part of distprune_report.json."""
        sel = self.groups.selection
        return {
            "method": self.config.method,
            "scope": self.config.scope,
            "selector": self.config.selector if self.config.scope != "row" else "row-kthvalue",
            "target_sparsity": self.config.sparsity,
            "achieved_sparsity": self.zeros / self.numel,
            "pruned_fraction": self.pruned / self.numel,
            "prunable_weights": self.numel,
            "pruned_weights": self.pruned,
            "threshold": float(sel.threshold) if sel is not None and sel.threshold is not None else None,
            "selector_passes": self.groups.passes,
            "layers": [asdict(r) for r in self.groups.layers],
        }


@torch.no_grad()
def prune(model: nn.Module, config: PruneConfig | dict | None = None,
          norms: dict[str, torch.Tensor] | None = None, comm: Comm = SINGLE,
          layers: list[PrunableLayer] | None = None, show_progress: bool = True) -> PruneResult:
    """Prune the decoder-block linear weights of ``model`` in place.

    ``norms`` maps layer names to per-input-channel activation L2 norms (wanda).
    ``layers`` restricts pruning to a subset (default: every prunable layer that the
    config's include/exclude patterns admit).
    """
    cfg = config if isinstance(config, PruneConfig) else PruneConfig(**(config or {}))
    cfg.check()
    scorer = SCORERS[cfg.method]
    layers = layers if layers is not None else prunable_layers(model, cfg.include, cfg.exclude)
    if scorer.needs_stats:
        missing = [layer.name for layer in layers if norms is None or layer.name not in norms]
        if missing:
            raise ConfigError(f"prune.method={cfg.method} needs activation norms; none for {missing[0]}")

    def score(layer: PrunableLayer) -> torch.Tensor:
        # contiguous: stream order (ties) is the flat index of the (out, in) scores
        return scorer.fn(layer.weight, norms[layer.name] if norms else None).contiguous()

    groups = prune_groups(layers, score, cfg.scope, cfg.sparsity, cfg.selector, comm, show_progress,
                          search_tol=cfg.search_tol, search_max_iter=cfg.search_max_iter)
    return PruneResult(cfg, groups)

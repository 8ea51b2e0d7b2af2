"""Sparsity per layer: how many weights each layer loses (its target).

``uniform`` gives every comparison group prune.sparsity: a layer loses round(sparsity *
numel) weights (layer scope), every row round(sparsity * in) (row scope), every group of
m exactly sparsity * m (N:M). The global scope needs no targets: one threshold decides.

Targets cover every layer of the model on every rank: each rank passes its own layers
and the layer list is gathered (rank order is layer order), so targets never depend on
the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from distprune.dist import SINGLE, Comm
from distprune.models import PrunableLayer
from distprune.select import target_count


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


def entries(own: list[PrunableLayer], comm: Comm = SINGLE) -> list[Entry]:
    """Every rank's layers, in layer order (rank order is layer order)."""
    mine = [Entry(layer.name, *layer.weight.shape, layer.block) for layer in own]
    return [e for part in comm.all_gather_objects(mine) for e in part]


def uniform(layers: list[Entry], sparsity: float, scope: str) -> dict[str, int]:
    """Every comparison group at ``sparsity``: a layer's target is its groups' counts."""
    if scope == "row":
        return {e.name: e.rows * target_count(sparsity, e.cols) for e in layers}
    return {e.name: target_count(sparsity, e.numel) for e in layers}

"""Who owns what over the ranks: each rank's layers (contiguous, balanced by parameters), the
state-dict names each rank reads and writes, and the broadcasts of fused tensors that several
ranks' views cut from."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from distprune.errors import ConfigError
from distprune.layers import PrunableLayer, blocks_prefix, broadcast_weight, prunable_layers

if TYPE_CHECKING:
    pass

def partition(layers: list[PrunableLayer], world_size: int, lead: int = 0) -> list[list[PrunableLayer]]:
    """Contiguous groups of layers balanced by parameter count, one per rank: a layer goes
    to the rank whose equal share of the running total holds the layer's midpoint, moved
    by at most one rank per layer so that no rank is left without a layer. ``lead``:
    parameters rank 0 holds besides its layers, counted before the first layer.
    Deterministic; rank order is layer order."""
    count = len(layers)
    if world_size > count:
        raise ConfigError(f"{world_size} ranks but only {count} prunable layers: use fewer ranks")
    total = lead + sum(layer.numel for layer in layers)
    parts: list[list[PrunableLayer]] = [[] for _ in range(world_size)]
    seen, prev = lead, -1
    for i, layer in enumerate(layers):
        want = int((seen + layer.numel / 2) * world_size / total)
        rank = min(max(want, prev, world_size - (count - i)), prev + 1)
        parts[rank].append(layer)
        seen, prev = seen + layer.numel, rank
    return parts


def rank_parts(model: nn.Module, layers: list[PrunableLayer], world_size: int,
               outside: bool) -> list[list[PrunableLayer]]:
    """Each rank's layers (``partition``). ``outside``: rank 0 reads the parameters outside
    the decoder blocks (embeddings, final norm, head) at load and sends them to the others
    (a job with forward passes, cli.load_model), so it is credited with them and gets that
    many fewer layer weights: every rank then reads about 1/N of the checkpoint."""
    prefix = blocks_prefix(model)
    lead = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(f"{prefix}.")) if outside else 0
    return partition(layers, world_size, lead if world_size > 1 else 0)


def shard_keys(model: nn.Module, include, exclude, world_size: int, outside: bool) -> list[set[str]]:
    """State-dict names of the weights of each rank's layers, in rank order (``rank_parts``)."""
    layers = prunable_layers(model, include, exclude)
    return [{layer.key for layer in part} for part in rank_parts(model, layers, world_size, outside)]


def writer_parts(parts: list[list[PrunableLayer]]) -> list[list[str]]:
    """The state-dict names each rank writes: its layers' tensors, a fused experts tensor
    that several ranks' views cut from by the first of them (``share_split``)."""
    first: dict[str, int] = {}
    for rank, part in enumerate(parts):
        for layer in part:
            first.setdefault(layer.key, rank)
    return [list(dict.fromkeys(layer.key for layer in part if first[layer.key] == rank))
            for rank, part in enumerate(parts)]


def share_split(parts: list[list[PrunableLayer]], comm) -> None:
    """Send the views of a fused tensor that several ranks own to the rank that writes it
    (``writer_parts``); every rank takes part in each broadcast (a rank that does not hold
    the tensor receives into scratch memory)."""
    writer = {key: rank for rank, keys in enumerate(writer_parts(parts)) for key in keys}
    for rank, part in enumerate(parts):
        for layer in part:
            if writer[layer.key] != rank:
                broadcast_weight(comm, layer, rank)

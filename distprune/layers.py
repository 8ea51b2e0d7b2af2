"""The prunable weights of a model: every nn.Linear / Conv1D inside its decoder blocks and every
matrix of every expert of a fused experts module (moe.py), as (out, in) views; what the others
are (routers, norms, embeddings: never pruned), counted so that the report covers the whole
model; prune.include / prune.exclude."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from distprune import moe
from distprune.errors import ConfigError

if TYPE_CHECKING:
    pass

@dataclass
class PrunableLayer:
    """An (out, in) view of a weight tensor: an nn.Linear's or Conv1D's weight, or one
    matrix of one expert inside a fused experts tensor (moe.py). Writes go to the model."""

    name: str  # e.g. model.layers.3.mlp.up_proj, or model.layers.3.mlp.experts.5.down_proj
    module: nn.Module  # the module that holds the tensor
    block: int  # index of its decoder block
    transposed: bool  # Conv1D stores (in, out), and GPT-OSS's experts (E, in, out)
    key: str = ""  # state-dict name of the tensor (default: name + ".weight")
    param: str = "weight"  # the module's attribute that holds it
    expert: int | None = None  # index into a fused (E, ...) tensor
    rows: slice | None = None  # the view's rows, when not all (a fused gate_up tensor holds gate and up)

    def __post_init__(self) -> None:
        self.key = self.key or f"{self.name}.weight"

    @property
    def tensor(self) -> nn.Parameter:
        """The whole parameter the view cuts from."""
        return getattr(self.module, self.param)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as (out_features, in_features): a view, writes go to the module."""
        w = self.tensor.data
        w = w[self.expert] if self.expert is not None else w
        w = w.t() if self.transposed else w
        return w if self.rows is None else w[self.rows]

    @property
    def numel(self) -> int:
        return self.weight.numel()


def weights_to(layers: list[PrunableLayer], device) -> None:
    """Move these layers' weights, and nothing else, to device: pruning needs only them, and
    the rest of the model may not fit there (or may be on the meta device: a shard load).
    A fused experts tensor moves whole."""
    for layer in layers:
        p = layer.tensor
        p.data = p.data.to(device)


def broadcast_weight(comm, layer: PrunableLayer, src: int) -> None:
    """The layer's weight, from rank src to every rank (a strided expert view goes through
    a contiguous copy; a rank that holds the tensor on the meta device, streamed, takes part
    and receives into scratch memory)."""
    w = layer.weight
    if w.is_meta:
        comm.broadcast_(torch.empty(w.shape, dtype=w.dtype, device="cpu"), src=src)
    elif w.is_contiguous():
        comm.broadcast_(w, src=src)
    else:
        w.copy_(comm.broadcast_(w.contiguous(), src=src))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList that holds the model's num_hidden_layers decoder blocks."""
    count = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"no list of {count} decoder blocks found in {type(model).__name__}")


def blocks_prefix(model: nn.Module) -> str:
    """The module name of the decoder blocks' list (model.layers, transformer.h, ...)."""
    blocks = decoder_blocks(model)
    return next(n for n, m in model.named_modules() if m is blocks)


def outside_keys(model: nn.Module) -> set[str]:
    """State-dict names outside the decoder blocks (embeddings, final norm, head): what a
    forward pass needs besides the block it runs."""
    prefix = blocks_prefix(model)
    return {k for k in model.state_dict() if not k.startswith(f"{prefix}.")}


def describe(model: nn.Module, layers: list[PrunableLayer]) -> str:
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(layer.numel for layer in layers)
    return (f"{type(model).__name__}, {total / 1e6:.1f}M parameters, {len(decoder_blocks(model))} blocks, "
            f"{len(layers)} prunable layers ({prunable / 1e6:.1f}M weights), {next(model.parameters()).dtype}")


class Patterns:
    """prune.include / prune.exclude (fnmatch patterns on layer and tensor names), and which
    of them matched a weight: a pattern that matches none is a typo (``check_used``)."""

    def __init__(self, include, exclude) -> None:
        self.include, self.exclude = list(include), list(exclude)
        self.used: set[tuple[str, str]] = set()

    def admitted(self, names: list[str]) -> bool:
        """Whether the patterns admit a weight known by any of ``names`` (its module name,
        its tensor's name)."""
        hit = {(key, p) for key, patterns in (("include", self.include), ("exclude", self.exclude))
               for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)}
        self.used |= hit
        if self.include and not any(key == "include" for key, _ in hit):
            return False
        return not any(key == "exclude" for key, _ in hit)

    def check_used(self, example: str) -> None:
        for key, patterns in (("include", self.include), ("exclude", self.exclude)):
            unused = [p for p in patterns if (key, p) not in self.used]
            if unused:
                raise ConfigError(f"prune.{key} pattern(s) {', '.join(map(repr, unused))} match no weight of the "
                                  f"model's decoder blocks (names look like {example})")


@dataclass
class Coverage:
    """Every parameter of the model, counted by what distprune does with it: the report's
    totals cover the whole model."""

    expert: int = 0  # weights in expert matrices that are pruned
    dense: int = 0  # weights in other pruned matrices (attention, dense and shared-expert MLPs)
    excluded: int = 0  # matrices that prune.include / prune.exclude leave out
    router: int = 0  # routers and shared-expert gates (never pruned)
    embedding: int = 0  # embedding tables inside the blocks (never pruned)
    vector: int = 0  # norms, biases and other 1-D parameters (never pruned)
    outside: int = 0  # embeddings, final norm, head: outside the decoder blocks (never pruned)

    def as_dict(self) -> dict:
        return {**self.__dict__, "model": sum(self.__dict__.values())}


def prunable_layers(model: nn.Module, include: list[str] = (), exclude: list[str] = (),
                    coverage: Coverage | None = None) -> list[PrunableLayer]:
    """The (out, in) weight views inside the decoder blocks, in block then module order:
    every nn.Linear and Conv1D, and the gate, up and down matrix of every expert of a fused
    experts module (moe.py).

    Never pruned: embeddings (inside the blocks too), lm_head and everything else outside
    the blocks, 1-D tensors (norms, biases), expert biases, routers and shared-expert gates.
    include/exclude are fnmatch patterns on layer names (and tensor names). Any other tensor of 2+ dimensions
    in a block is one distprune does not know how to prune: ConfigError naming it, never a
    silent skip. ``coverage`` receives the counts of every parameter.
    """
    from transformers.pytorch_utils import Conv1D

    cov = coverage if coverage is not None else Coverage()
    patterns = Patterns(include, exclude)
    unprunable: list[tuple[str, tuple[int, ...]]] = []  # 2-D tensors no rule covers
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    inside: set[int] = set()
    layers = []
    for i, block in enumerate(blocks):
        routers = {id(m) for _, parent in block.named_modules() for child, m in parent.named_children()
                   if moe.is_router(parent, child)}
        handled: set[int] = set()  # parameters that are pruned, excluded or never pruned
        for _, module in block.named_modules():
            name = names[id(module)]
            if id(module) in routers or isinstance(module, nn.Embedding):
                kind = "embedding" if isinstance(module, nn.Embedding) else "router"
                for p in module.parameters():
                    if id(p) not in handled:
                        handled.add(id(p))
                        setattr(cov, kind, getattr(cov, kind) + p.numel())
            elif isinstance(module, (nn.Linear, Conv1D)):
                handled.add(id(module.weight))
                layer = PrunableLayer(name, module, i, isinstance(module, Conv1D))
                if patterns.admitted([name, layer.key]):
                    layers.append(layer)
                    cov.dense += layer.numel
                else:
                    cov.excluded += layer.numel
            elif moe.is_experts(module):
                for param in ("gate_up_proj", "down_proj"):
                    handled.add(id(getattr(module, param)))
                for e in range(moe.num_experts(module)):
                    for matrix in moe.MATRICES:
                        param, transposed, rows = moe.view_spec(module, matrix)
                        layer = PrunableLayer(f"{name}.{e}.{matrix}", module, i, transposed, f"{name}.{param}", param,
                                              e, rows)
                        if patterns.admitted([layer.name, layer.key]):
                            layers.append(layer)
                            cov.expert += layer.numel
                        else:
                            cov.excluded += layer.numel
        for pname, p in block.named_parameters(prefix=names[id(block)]):
            inside.add(id(p))
            if id(p) in handled:
                continue
            if p.dim() < 2 or pname.endswith("bias"):
                cov.vector += p.numel()
            elif patterns.admitted([pname, pname.rsplit(".", 1)[0]]):
                unprunable.append((pname, tuple(p.shape)))
            else:
                cov.excluded += p.numel()
    cov.outside += sum(p.numel() for p in model.parameters() if id(p) not in inside)
    if unprunable:  # every one in one message, by pattern over the blocks
        kinds = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n, count=1) for n, _ in unprunable))
        first = ", ".join(f"{n} (shape {shape})" for n, shape in unprunable[:3])
        raise ConfigError(f"{len(unprunable)} weight(s) distprune cannot prune and that are on no never-prune list "
                          f"({first}{' and more' if len(unprunable) > 3 else ''}); leave them out with "
                          f"prune.exclude=[{', '.join(f'{chr(34)}{k}{chr(34)}' for k in kinds)}]")
    patterns.check_used(layers[0].name if layers else names[id(blocks)] + ".0")
    if not layers:
        raise ConfigError("no prunable layers match prune.include / prune.exclude")
    return layers

"""Hugging Face safetensors checkpoints: tied tensors, the shard plan, and every rank
writing its own files. Below models.py and checkpoint.py, importing neither (the built-in
preset's conversion writes with it too)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from distprune.dist import SINGLE, Comm

UMASK = os.umask(0o022)  # read it (umask can only be read by setting it)...
os.umask(UMASK)  # ...and put it back


def tie_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they name (tied weights share one group),
    in module order."""
    groups: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    keys = set(model.state_dict())
    return [[n for n in names if n in keys] for names in groups.values() if any(n in keys for n in names)]


def _size_bytes(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (lm_head tied to the embeddings): the first
    name of each tensor stays, as Hugging Face does; loading re-ties the rest. Tensors
    this rank did not load stay on the meta device: only their size is used."""
    first = {group[0] for group in tie_groups(model)}
    return {k: t for k, t in model.state_dict().items() if k in first}


def shard_plan(state: dict[str, torch.Tensor], parts: list[list[str]], max_shard_size: str
               ) -> list[tuple[int, list[str]]]:
    """[(rank, tensor names)] per output file, the same on every rank: rank r writes the
    tensors of the prunable weights it owns (parts[r], state-dict names, each in one part);
    rank 0 also writes every other tensor. Files never exceed max_shard_size unless one
    tensor does."""
    limit = _size_bytes(max_shard_size)
    owned = {key for part in parts for key in part}
    plan = []
    for rank, part in enumerate(parts):
        keys = list(part)
        if rank == 0:
            keys = [k for k in state if k not in owned] + keys
        chunk, size = [], 0
        for k in keys:
            nbytes = state[k].numel() * state[k].element_size()
            if chunk and size + nbytes > limit:
                plan.append((rank, chunk))
                chunk, size = [], 0
            chunk.append(k)
            size += nbytes
        if chunk:
            plan.append((rank, chunk))
    return plan


def on_disk(model: nn.Module, key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors that hold the model's tensor ``key`` in the layout its checkpoint came in:
    transformers' own reverse conversion (``revert_weight_conversion``, what save_pretrained
    does). A fused experts tensor of a model loaded from per-expert files goes back to
    per-expert tensors (Mixtral: ``block_sparse_moe.experts.{e}.w1.weight``); a model whose
    checkpoint held its own names (``_weight_conversions`` empty) keeps them; a model built
    from a config gets transformers' default (original) layout."""
    from transformers.core_model_loading import revert_weight_conversion

    if getattr(model, "_weight_conversions", None) == []:  # loaded from its own names: nothing to revert
        return {key: t}
    return revert_weight_conversion(model, {key: t})


@dataclass(frozen=True)
class Piece:
    """One tensor on disk that holds a block of a model tensor: ``key`` goes to rows
    [start, start + rows) of expert ``expert`` (a fused experts tensor (E, A, B) stored per
    expert, and for gate_up per matrix: gate rows then up rows)."""

    key: str
    expert: int
    start: int
    rows: int


def disk_sources(model: nn.Module, name: str, shape: tuple[int, ...], on_file: dict[str, tuple[int, ...]]
                 ) -> str | list[Piece] | None:
    """Where the checkpoint (``on_file``: tensor name -> shape) holds the model's tensor
    ``name``: its own name, a renamed one (``on_disk``: Mixtral's block_sparse_moe -> mlp), or
    for a fused experts tensor the per-expert pieces it was merged from (MergeModulelist over
    experts, Concatenate along rows: every MoE conversion transformers has). The layout is
    read off the reverse conversion of a small stand-in (E, a, 1) whose entries code their
    own position, scaled to the real rows and checked: the pieces must exist with the shapes
    predicted and tile the tensor exactly. None when that does not hold (load in full)."""
    if name in on_file:
        return name
    names = on_disk(model, name, torch.empty(shape, device="meta"))
    if len(names) == 1:
        key = next(iter(names))
        return key if on_file.get(key) == tuple(shape) else None
    if len(shape) != 3:
        return None
    experts, rows, cols = shape
    small = math.gcd(rows, 720720)  # divisible by any number of concatenated matrices up to 16
    scale = rows // small
    coded = torch.arange(experts * small, dtype=torch.float64, device="cpu").reshape(experts, small, 1)
    pieces, covered = [], 0
    for key, t in on_disk(model, name, coded).items():
        codes = t.reshape(-1)
        first = int(codes[0])
        e, start = divmod(first, small)
        expected = torch.arange(first, first + len(codes), dtype=torch.float64, device="cpu")
        if t.dim() != 2 or t.shape[1] != 1 or not torch.equal(codes, expected):
            return None
        piece = Piece(key, e, start * scale, len(codes) * scale)
        if on_file.get(key) != (piece.rows, cols):
            return None
        pieces.append(piece)
        covered += piece.rows
    return pieces if covered == experts * rows else None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with an error of the file system raised as the OSError it is
    (safetensors reports "No space left on device (os error 28)" in an error of its own)."""
    try:
        save_file(tensors, path, metadata=metadata or {"format": "pt"})
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None or isinstance(e, OSError):
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def write_checkpoint(directory: Path, model: nn.Module, tokenizer, max_shard_size: str,
                     parts: list[list[str]] | None = None, comm: Comm = SINGLE,
                     read: Callable[[str], torch.Tensor] | None = None) -> None:
    """A Hugging Face checkpoint written by all ranks at once: each rank writes the
    safetensors files of the tensors of its own layers (``parts``: state-dict names per
    rank); rank 0 writes the other tensors, the index, config, generation config and
    tokenizer. Names and layout are the input checkpoint's (``on_disk``). A tensor this rank
    holds on the meta device (a streamed model, never pruned) is ``read(name)`` from the
    input checkpoint, one output file at a time."""
    parts = parts if parts is not None else [[]]
    state = unique_state_dict(model)
    plan = shard_plan(state, parts, max_shard_size)
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    for (rank, keys), name in zip(plan, names, strict=True):
        if rank == comm.rank:
            tensors = {}
            for k in keys:
                tensors.update(on_disk(model, k, read(k) if state[k].is_meta else state[k].detach()))
            save_tensors({k: t.contiguous().cpu() for k, t in tensors.items()}, directory / name)
            os.chmod(directory / name, 0o666 & ~UMASK)  # safetensors creates 0600; the JSON files get the umask
    if not comm.is_main:
        return
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for (_, keys), name in zip(plan, names, strict=True) for key in keys
                                for k in on_disk(model, key, torch.empty_like(state[key], device="meta"))}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)



"""The block runner: calibration runs the decoder one block at a time.

Only the current block is on the compute device, with its inputs for all samples; forward
hooks on its prunable layers hand each layer's input to the method's accumulator (stats.py).
Its outputs become the next block's inputs. ``oneshot``: every statistic comes from the dense
model. ``sequential`` (the Wanda paper): after block i's statistics are complete,
``on_block`` prunes block i, and block i's outputs are recomputed with its pruned weights
before they feed block i+1. A streamed model's blocks are read when they run (stream.py); its
fused experts one expert at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from distprune import moe
from distprune.layers import PrunableLayer, decoder_blocks
from distprune.progress import progress
from distprune.stream import IN_MEMORY, InMemory, Streamed, move


class _Stop(Exception):
    """Raised by the last block's stand-in once every block's inputs are captured."""


def _to(obj: Any, device, memo: dict[int, torch.Tensor]) -> Any:
    """Move the tensors inside (nested) tuples, lists and dicts to device; a tensor seen
    before (one mask handed to many blocks) is moved once."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


class StandIn(nn.Module):
    """Takes a decoder block's place in the model's list for one forward of the model;
    other attributes the model reads of it (attention_type) are the block's."""

    def __init__(self, block: nn.Module, **state) -> None:
        super().__init__()
        self.__dict__.update(_block=block, **state)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


class _Record(StandIn):
    """Keeps the keyword arguments the model gives the block and passes its input through
    (the last block's stops the forward)."""

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "layer_past")}
        self._seen.append((hidden, kwargs))
        if self._last:
            raise _Stop
        return hidden


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device) -> list[tuple]:
    """Run the model's forward with every decoder block replaced by a stand-in, for each
    batch of windows, and keep what the blocks receive: [(hidden_states of block 0, [kwargs
    of block j for each j])] on device. The kwargs (attention mask, rotary position
    embeddings, position ids) may differ by block: sliding-window and full-attention
    blocks get different masks (GPT-OSS, Gemma)."""
    blocks = decoder_blocks(model)
    originals = list(blocks)
    captured = []
    model_device = next(p.device for p in model.parameters() if not p.is_meta)
    try:
        for start in range(0, windows.shape[0], batch_size):
            seen: list = []
            for j, block in enumerate(originals):
                blocks[j] = _Record(block, _last=j == len(originals) - 1, _seen=seen)
            try:
                model(input_ids=windows[start:start + batch_size].to(model_device), use_cache=False)
            except _Stop:
                pass
            memo: dict[int, torch.Tensor] = {}
            captured.append((_to(seen[0][0], device, memo), [_to(kw, device, memo) for _, kw in seen]))
    finally:
        for j, block in enumerate(originals):
            blocks[j] = block
    return captured


def run_block(block: nn.Module, inputs: list[tuple], i: int) -> tuple[list[tuple], bool]:
    """Block i's outputs [(hidden_states, kwargs of every block)] for each batch of inputs,
    and whether the block returns a tuple (the model's forward expects that format back)."""
    outputs, as_tuple = [], False
    for hidden, kwargs in inputs:
        out = block(hidden, **kwargs[i])
        as_tuple = isinstance(out, (tuple, list))
        outputs.append((out[0] if as_tuple else out, kwargs))
    return outputs, as_tuple


@torch.no_grad()
def collect(model: nn.Module, layers: list[PrunableLayer], windows: torch.Tensor, device, accumulator,
            mode: str = "oneshot", on_block: Callable[[int, list[PrunableLayer], dict], None] | None = None,
            batch_size: int = 8, show: bool = True, blocks_from: InMemory | Streamed = IN_MEMORY,
            moe_policy: str = "routed") -> None:
    """Feed the inputs of ``layers`` over ``windows`` (samples, seqlen) to ``accumulator``,
    one decoder block on ``device`` at a time; ``on_block(i, block_layers, statistics)``
    receives each block's reduced statistics as soon as they are complete. In sequential
    mode it prunes block i, and block i's outputs are recomputed before they feed block
    i+1. With several ranks, each passes its share of the windows in whole batches
    (``dist.batch_share``); the accumulator reduces over ranks. ``blocks_from`` reads each
    block before it runs and drops it after (a streamed model, stream.py); a pass that only
    collects statistics (no ``on_block``) reads the experts of a block this rank does not
    hold one expert at a time (``_streamed_experts``). ``moe_policy``: which tokens an
    expert's statistics come from (moe.py). Experts modules run moe.forward, one expert after another, whether in memory
    or on disk: the numbers are the same either way, so on any number of ranks."""
    if mode not in ("oneshot", "sequential"):
        raise ValueError(f"unknown calibration mode {mode!r}")
    blocks = decoder_blocks(model)
    by_block: dict[int, list[PrunableLayer]] = {}
    for layer in layers:
        by_block.setdefault(layer.block, []).append(layer)
    inputs = capture_block_inputs(model, windows, batch_size, device)
    last = max(by_block, default=-1)  # blocks after the last one with layers need no forward
    for i, block in enumerate(progress(blocks, "calibrate", "block", show)):
        if i > last:
            break
        # a pass that prunes or solves as it goes (on_block) needs the whole block in memory
        blocks_from.load_block(i, experts=on_block is not None)
        if on_block is None and i < last:  # nothing changes block i + 1 before it runs: move it meanwhile
            blocks_from.prefetch(i + 1)
        home = next(p.device for p in block.parameters() if not p.is_meta)
        move(block, device)
        mine = by_block.get(i, [])
        accumulator.start_block(mine)
        taps = _expert_taps(mine, accumulator, moe_policy)
        experts = [m for m in block.modules() if moe.is_experts(m)]
        on_disk = [m for m in experts if m.gate_up_proj.is_meta]
        if on_disk:
            outputs = _streamed_experts(block, inputs, i, experts, blocks_from, mine, accumulator, taps, moe_policy)
        else:
            with _hooks(mine, accumulator), _experts_forward(experts, taps, moe_policy):
                outputs, _ = run_block(block, inputs, i)
        block_stats = accumulator.finish_block()
        if mine and on_block is not None:
            on_block(i, mine, block_stats)
            if mode == "sequential":
                with _experts_forward(experts, {}, moe_policy):
                    outputs, _ = run_block(block, inputs, i)  # block i's outputs with its pruned weights
        del block_stats  # Hessians: never two blocks' at once
        move(block, home)
        blocks_from.release_block(i)
        inputs = outputs


def _streamed_experts(block: nn.Module, inputs: list[tuple], i: int, experts: list[nn.Module], blocks_from: Streamed,
                      layers: list[PrunableLayer], accumulator, taps: dict, moe_policy: str) -> list[tuple]:
    """Block i's outputs over all batches, its experts read from disk one expert at a time
    (each once), for a block with one experts module: (1) the block runs up to its experts
    for every batch, which keeps their arguments; (2) each expert, read once, adds its share
    of every batch's output (moe.expert_step, in expert order: moe.forward's numbers) and
    hands its inputs to the accumulator; (3) the block runs again, its experts module
    returning those outputs, while the other layers' inputs go to the accumulator. Every
    layer still receives its batches in batch order."""
    if len(experts) != 1:
        raise NotImplementedError(f"block {i} has {len(experts)} experts modules; streaming one expert at a time "
                                  "handles one")
    module = experts[0]
    calls: list[tuple] = []

    def keep(*args, **kwargs):
        calls.append(moe.flatten(*args, *kwargs.values()))
        raise _Stop

    module.forward = keep
    try:
        for hidden, kwargs in inputs:
            try:
                block(hidden, **kwargs[i])
            except _Stop:
                pass
    finally:
        del module.forward
    outs = [torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) for hidden, _, _ in calls]
    tap = taps.get(module)
    for e in range(moe.num_experts(module)):
        gate_up_bias, down_bias = moe.weights_of(module, e)[1::2]  # biases are in memory
        w = (blocks_from.read_expert(module, "gate_up_proj", e).to(outs[0].device), gate_up_bias,
             blocks_from.read_expert(module, "down_proj", e).to(outs[0].device), down_bias)
        for (hidden, index, weights), out in zip(calls, outs, strict=True):
            moe.expert_step(module, e, w, hidden, index, weights, out, tap, moe_policy)
        del w
    done = iter(outs)

    def give(hidden, *args, **kwargs):
        return next(done).to(hidden.dtype).reshape(hidden.shape)

    module.forward = give
    try:
        with _hooks(layers, accumulator):
            outputs, _ = run_block(block, inputs, i)
    finally:
        del module.forward
    return outputs


@contextmanager
def _experts_forward(modules: list[nn.Module], taps: dict, moe_policy: str):
    """Run each experts module with moe.forward while inside, handing its experts' inputs
    to its tap (``taps``; none for a module whose views are not being calibrated)."""
    for m in modules:
        m.forward = functools.partial(_forward_call, m, tap=taps.get(m), policy=moe_policy)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def _forward_call(module: nn.Module, *args, tap, policy: str, **kwargs) -> torch.Tensor:
    hidden, index, weights = (*args, *kwargs.values())[:3]
    return moe.forward(module, hidden, index, weights, tap=tap, policy=policy)


@contextmanager
def _hooks(layers: list[PrunableLayer], accumulator):
    """While inside, each nn.Linear of ``layers`` hands its input to the accumulator, every
    batch (experts: ``_expert_taps``)."""
    handles = [layer.module.register_forward_hook(lambda _m, args, _out, lay=layer: accumulator.add(lay, args[0]))
               for layer in layers if layer.expert is None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _expert_taps(layers: list[PrunableLayer], accumulator, moe_policy: str) -> dict:
    """For each experts module with views in ``layers``: tap(e, x, h), which gives expert e's
    gate and up views x and its down view h (gate and up get one tensor, which Hessians
    share)."""
    views: dict[nn.Module, dict] = {}
    for layer in layers:
        if layer.expert is not None:
            views.setdefault(layer.module, {})[(layer.expert, layer.name.rsplit(".", 1)[1])] = layer

    def tap(e: int, x: torch.Tensor, h: torch.Tensor, *, mine: dict) -> None:
        for matrix, inputs in zip(moe.MATRICES, (x, x, h), strict=True):
            if (e, matrix) in mine:
                accumulator.add(mine[(e, matrix)], inputs)

    return {module: functools.partial(tap, mine=mine) for module, mine in views.items()}

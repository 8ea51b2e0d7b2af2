"""Calibration statistics by block-wise onloading, and their on-disk cache.

The calibration batch runs through the decoder one block at a time: only the current
block is on the compute device, with its inputs for all samples; forward hooks on its
prunable layers hand each layer's input to the method's accumulator (``ChannelSums``:
per input channel, the float64 sum of squares and sum of the layer's inputs, and the
token count). Its outputs become the next block's inputs.

An accumulator says how its statistics reduce over ranks (``finish_block``) and whether
they may be cached (``cacheable``). ``oneshot``: every statistic comes from the dense model.
``sequential`` (the Wanda paper): after block i's statistics are complete, ``on_block``
prunes block i, and block i's outputs are recomputed with its pruned weights before they
feed block i+1.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distprune import cache, moe
from distprune.dist import SINGLE, Comm
from distprune.layers import PrunableLayer, decoder_blocks
from distprune.progress import progress
from distprune.select import NonFiniteScoreError
from distprune.stream import IN_MEMORY, InMemory, Streamed, move

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # bump when the statistics change meaning (2: experts run by moe.forward; 3: checksummed files)


@dataclass
class LayerStats:
    sumsq: torch.Tensor  # (in,) float64: sum over tokens of x_j^2
    sum: torch.Tensor  # (in,) float64: sum over tokens of x_j
    count: int  # tokens seen

    @classmethod
    def from_norms(cls, norms: torch.Tensor) -> LayerStats:
        """Statistics whose ``norm()`` is ``norms`` (in,): for pruning with norms from elsewhere."""
        norms = norms.double()
        return cls(norms * norms, torch.zeros_like(norms), 1)

    def norm(self) -> torch.Tensor:
        """Wanda's per-input-channel activation norm, sqrt(sumsq / count), float64. A layer
        that saw no tokens (an expert no calibration token was routed to) gets ones: its
        scores are its magnitudes."""
        if self.count == 0:
            return torch.ones_like(self.sumsq)
        return (self.sumsq / self.count).sqrt()


def batch_stats(x: torch.Tensor) -> torch.Tensor:
    """One batch's statistics of a layer's input x (..., in): [sum of x^2, sum of x, token
    count], float64, shape (2 * in + 1,)."""
    x = x.detach().reshape(-1, x.shape[-1]).double()  # (tokens, in)
    count = torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)
    return torch.cat([(x * x).sum(0), x.sum(0), count])


def merge(stats: list[LayerStats], partials: list[list[torch.Tensor]], comm: Comm = SINGLE) -> None:
    """Add per-batch statistics (``partials[l][b]``: layer l, this rank's batch b) into
    ``stats``, in place, one batch at a time in global batch order: the ranks' batches are
    gathered in rank order, which is batch order, so every rank adds exactly what one
    process adds, in the same order, and the sums do not depend on the number of ranks."""
    if not stats:
        return
    widths = [2 * st.sumsq.numel() + 1 for st in stats]
    rows = [torch.cat([p[b].cpu() for p in partials]) for b in range(len(partials[0]))]
    local = torch.stack(rows) if rows else torch.zeros(0, sum(widths), dtype=torch.float64, device="cpu")
    for row in comm.all_gather_cat(local.reshape(-1)).reshape(-1, sum(widths)):
        for st, part in zip(stats, row.split(widths), strict=True):
            c = st.sumsq.numel()
            st.sumsq += part[:c]
            st.sum += part[c:2 * c]
            st.count += int(part[2 * c])


class ChannelSums:
    """Per-input-channel sums (Wanda's and RIA's statistics). Every rank ends with every
    layer's sums: per-batch sums are gathered and added in batch order, bit for bit those
    of one process. Small ((2 * in + 1) floats a layer), so they are kept for the whole
    model and cached."""

    cacheable = True

    def __init__(self, layers: list[PrunableLayer], comm: Comm = SINGLE) -> None:
        self.comm = comm
        self.stats = {layer.name: LayerStats(torch.zeros(layer.weight.shape[1], dtype=torch.float64, device="cpu"),
                                             torch.zeros(layer.weight.shape[1], dtype=torch.float64, device="cpu"), 0)
                      for layer in layers}
        self._partials: dict[str, list[torch.Tensor]] = {}

    def start_block(self, layers: list[PrunableLayer]) -> None:
        self._partials = {layer.name: [] for layer in layers}

    def add(self, layer: PrunableLayer, x: torch.Tensor) -> None:
        """One batch of the layer's input, x (..., in)."""
        self._partials[layer.name].append(batch_stats(x))

    def finish_block(self) -> dict[str, LayerStats]:
        """The block's statistics, complete on every rank."""
        names = list(self._partials)
        merge([self.stats[name] for name in names], list(self._partials.values()), self.comm)
        for name in names:  # never prune with, or cache, non-finite statistics
            st = self.stats[name]
            if not (torch.isfinite(st.sumsq).all() and torch.isfinite(st.sum).all()):
                raise NonFiniteScoreError(f"non-finite (NaN or Inf) calibration statistics at the input of layer "
                                          f"{name}: the activations reaching it overflow")
        return {name: self.stats[name] for name in names}


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


def cache_key(fields: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save(path: Path, stats: dict[str, LayerStats], fields: dict) -> None:
    """Write statistics to the cache (cache.py: key fields and a checksum in the file,
    fsynced, renamed into place; a cache that cannot be written is a warning). Two jobs
    that compute the same statistics at once (two sweeps on one machine) both write whole
    files; the last rename wins."""
    tensors = {}
    for name, st in stats.items():
        tensors[f"{name}.sumsq"] = st.sumsq
        tensors[f"{name}.sum"] = st.sum
        tensors[f"{name}.count"] = torch.tensor([st.count], dtype=torch.int64, device="cpu")
    cache.write(path, tensors, fields)


def load(path: Path, inputs: dict[str, int], fields: dict) -> dict[str, LayerStats] | None:
    """Statistics of the layers ``inputs`` names (layer -> its input channels) from a cache
    file made for ``fields``, or None: a miss, also for a file that is damaged or holds
    anything else (cache.read)."""
    expect = {}
    for name, width in inputs.items():
        expect.update({f"{name}.sumsq": ((width,), torch.float64), f"{name}.sum": ((width,), torch.float64),
                       f"{name}.count": ((1,), torch.int64)})
    t = cache.read(path, fields, expect)
    if t is None:
        return None
    return {n: LayerStats(t[f"{n}.sumsq"], t[f"{n}.sum"], int(t[f"{n}.count"])) for n in inputs}


def balance(layers: list[PrunableLayer], cost: Callable[[int, int], float], world_size: int) -> dict[str, int]:
    """Owner rank of each layer: longest work first, each to the least loaded rank (ties:
    lowest rank), by ``cost(out, in)``. The same on every rank."""
    load = [0.0] * world_size
    owner = {}
    for layer in sorted(layers, key=lambda lay: -cost(*lay.weight.shape)):  # stable: ties keep layer order
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[layer.name] = rank
        load[rank] += cost(*layer.weight.shape)
    return owner


class Hessians:
    """SparseGPT's statistics: per layer, H = 2/n * sum over its n calibration tokens of
    x x^T, (in, in). Layers that read the same input tensor (q/k/v; gate/up) share one sum.

    Precision: each batch's x^T x is one float32 matmul (its own rounding: about 1e-7 x
    sqrt(batch tokens) relative), added into a float64 sum, so that the sum over many
    batches does not drift however long the calibration is. The float64 sum of float32
    terms is moreover exact unless an entry's terms span more than about 2^29 in size,
    and then independent of the order of addition: the ranks' partial sums give the sum
    of one process. The guarantee (tests/test_sparsegpt.py): on a CPU, one process and
    1, 2 or 3 ranks write identical weights, whatever the threads per process (torchrun
    gives each rank OMP_NUM_THREADS=1): the forward passes here are thread-invariant, and
    the solves, whose float32 kernels are not, run in float64 (sparsegpt.work_dtype;
    measured on a 132M-parameter bfloat16 Llama, sequential: identical, where float32
    solves agreed on 97.2% of the mask).

    Distributed: each rank sums its share of the batches; each block's sums are reduced
    (not all-reduced) onto the rank that owns the layer (``owner``, balanced by
    ``cost``), which alone holds H, and only for the current block. Not cached: in^2
    floats per layer (GBs for a 7B model)."""

    cacheable = False

    def __init__(self, layers: list[PrunableLayer], comm: Comm = SINGLE,
                 cost: Callable[[int, int], float] = lambda rows, cols: rows * cols) -> None:
        self.comm, self.cost = comm, cost
        self.owner: dict[str, int] = {}  # this block's layers -> the rank that solves them
        self._sums: dict[str, torch.Tensor] = {}  # leader layer -> float64 (in, in) sum
        self._leader: dict[str, str] = {}  # layer -> the layer whose sum it shares
        self._last: tuple[torch.Tensor, str] | None = None
        self._tokens: dict[str, int] = {}  # leader layer -> tokens of its input on this rank
        self.tokens: dict[str, int] = {}  # layer -> tokens of its input over all ranks (last finished block)

    def start_block(self, layers: list[PrunableLayer]) -> None:
        self.owner = balance(layers, self.cost, self.comm.world_size)
        self._sums, self._leader, self._last, self._tokens = {}, {}, None, {}
        self._layers = layers
        self._order = [layer.name for layer in layers]

    def add(self, layer: PrunableLayer, x: torch.Tensor) -> None:
        """One batch of the layer's input, x (..., in)."""
        shared = self._last is not None and self._last[0] is x  # q, k, v called on one tensor
        leader = self._leader.setdefault(layer.name, self._last[1] if shared else layer.name)
        if (leader != layer.name) != shared:
            raise RuntimeError(f"layer {layer.name} shared its input with {leader} in one batch but not another")
        self._last = (x, leader)
        if shared:
            return
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self._tokens[layer.name] = self._tokens.get(layer.name, 0) + x.shape[0]
        part = (x.t() @ x).double()
        if layer.name in self._sums:
            self._sums[layer.name] += part
        else:
            self._sums[layer.name] = part

    def finish_block(self) -> dict[str, torch.Tensor]:
        """H of each layer of the block that this rank owns (float64, on the device the
        inputs were on); the other ranks' sums are reduced onto it."""
        comm = self.comm
        # rank 0's sharing, on every rank: a rank without calibration batches saw no inputs
        leaders = comm.all_gather_objects(self._leader)[0] if comm.world_size > 1 else self._leader
        heads = [layer for layer in self._layers if leaders.get(layer.name) == layer.name]
        counts = comm.all_reduce_sum(torch.tensor([self._tokens.get(h.name, 0) for h in heads], dtype=torch.int64,
                                                  device="cpu"))
        out, self.tokens = {}, {}
        for layer, tokens in zip(heads, counts.tolist(), strict=True):
            leader = layer.name
            members = [n for n in self._order if leaders.get(n) == leader]
            self.tokens.update({n: tokens for n in members})
            dsts = sorted({self.owner[n] for n in members})
            cols = layer.weight.shape[1]
            total = self._sums.pop(leader, None)
            if total is None:  # no batches on this rank: it adds nothing to the sum
                total = torch.zeros(cols, cols, dtype=torch.float64, device=layer.weight.device)
            for j, dst in enumerate(dsts):  # a reduce leaves the sender's buffer undefined: keep a copy
                buf = total if j == len(dsts) - 1 else total.clone()
                comm.reduce_sum_(buf, dst)
                if dst == comm.rank:
                    h = buf.mul_(2.0 / tokens) if tokens else buf.fill_diagonal_(1.0)  # no tokens: magnitude
                    if not bool(torch.isfinite(h).all()):
                        raise NonFiniteScoreError(f"non-finite (NaN or Inf) Hessian at the input of layer {leader}: "
                                                  "the activations reaching it overflow")
                    out.update({n: h for n in members if self.owner[n] == dst})
        self._last = None
        return out

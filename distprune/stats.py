"""Calibration statistics, their reduction over ranks, and their on-disk cache.

An accumulator (``ChannelSums``: per input channel, the float64 sum of squares and sum of a
layer's inputs and the token count; ``Hessians``) takes each layer's inputs from the block
runner (runner.py), says how its statistics reduce over ranks (``finish_block``) and whether
they may be cached (``cacheable``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distprune import cache
from distprune.dist import SINGLE, Comm
from distprune.layers import PrunableLayer
from distprune.select import NonFiniteScoreError

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

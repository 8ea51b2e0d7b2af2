"""Threshold selection over a stream of non-negative score tensors.

A comparison group is a ``ScoreStream``: layers whose scores are recomputed on demand,
in a fixed order. Selectors reduce each layer's scores to something small (a histogram,
a count) with ``stream.map``, one layer at a time by default; they never hold more than
the layers in flight at a time (except ``sort``, the reference, which
concatenates).

The selected set is defined exactly: the ``k`` smallest scores, ties at the k-th value
broken by stream order (layer order, then flat index of the score tensor). A
``Selection`` says ``threshold`` (the k-th smallest score) and ``tie_quota`` (how many
scores equal to the threshold are pruned, in that order); ``masks.py`` turns it into
per-layer masks. Every reduction goes through ``comm`` so the same code runs on one
process or many.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import NormalDist
from typing import TypeVar

import torch

from distprune import kernels
from distprune.config import SELECTORS
from distprune.dist import SINGLE, Comm

T = TypeVar("T")


class ScoreStream:
    """The scores of a comparison group, layer by layer, in stream order.

    ``score(i)`` computes layer i's (non-negative) scores. ``workers`` > 1 computes up to
    that many layers at once in threads (torch ops release the GIL); results still come
    back in order, so every reduction is the same as with one worker.

    A layer whose scores go row by row (``rows(i, a, b)``: the scores of rows [a, b) of
    layer i, whose (rows, cols) is ``shapes[i]``) is streamed in pieces of whole rows of
    about ``piece`` scores (default ``PIECE``): the radix passes and the mask (``map_pieces``,
    ``TieBudget.prune_layer_``) then hold one piece's temporaries, which stay in the cache,
    instead of a layer's float32 scores. The pieces depend on the layer's shape only, never
    on the rank count or the threads, so every count and mask is the same.
    """

    def __init__(self, names: list[str], score: Callable[[int], torch.Tensor], workers: int = 1,
                 progress: Callable[[Iterable, str], Iterable] = lambda it, _desc: it,
                 rows: Callable[[int, int, int], torch.Tensor] | None = None,
                 shapes: Sequence[tuple[int, int]] | None = None, piece: int | None = None):
        self.names, self.score, self.workers, self.progress = names, score, workers, progress
        self.rows, self.shapes, self.piece_size = rows, shapes, piece or PIECE

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], workers: int = 1) -> ScoreStream:
        """A stream over precomputed score tensors (tests, one-layer groups)."""
        return cls([f"layer{i}" for i in range(len(tensors))], tensors.__getitem__, workers)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i in self.progress(range(len(self.names)), "scores"):
            yield self.names[i], self.score(i)

    def map(self, fn: Callable[[str, torch.Tensor], T], desc: str = "pass") -> Iterator[T]:
        """fn(name, scores) for every layer, in order; a few layers in flight at a time."""
        task = lambda i: fn(self.names[i], self.score(i))
        indices = self.progress(range(len(self.names)), desc)
        if self.workers <= 1:
            yield from map(task, indices)
            return
        with ThreadPoolExecutor(self.workers) as pool:
            pending: deque = deque()
            for i in indices:
                pending.append(pool.submit(task, i))
                if len(pending) > 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def pieces(self, i: int) -> list[tuple[int, int] | None]:
        """Layer i's pieces as row ranges [a, b), in order; [None] (the whole layer, from
        ``score``) when the layer does not score row by row."""
        if self.rows is None:
            return [None]
        rows, cols = self.shapes[i]
        step = max(1, self.piece_size // max(cols, 1))
        return [(a, min(a + step, rows)) for a in range(0, rows, step)]

    def piece(self, i: int, bounds: tuple[int, int] | None) -> torch.Tensor:
        """The scores of one piece of layer i (``pieces``), contiguous."""
        return self.score(i) if bounds is None else self.rows(i, *bounds)

    def map_pieces(self, fn: Callable[[str, torch.Tensor], T], desc: str = "pass") -> Iterator[list[T]]:
        """fn(name, scores of one piece) for every piece of every layer, one after another:
        a list per layer, in order. Without ``rows``, one piece per layer (``map``)."""
        if self.rows is None:
            yield from ([r] for r in self.map(fn, desc))
            return
        for i in self.progress(range(len(self.names)), desc):
            yield [fn(self.names[i], self.piece(i, bounds)) for bounds in self.pieces(i)]


# scores per piece of a row-wise layer (16 MB of float32 temporaries): against 2M, magnitude
# passes ran 1.1-1.3x faster and wanda passes 1.0-1.05x (bench_select, Llama-2-7B shapes)
PIECE = 1 << 22

HALF_DTYPES = (torch.bfloat16, torch.float16)
_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}  # same width
BINS = 1 << 16
# First bit pattern (as a non-negative integer) that is Inf or NaN, per score dtype.
_NONFINITE_FROM = {torch.float32: 0x7F800000, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


class NonFiniteScoreError(ValueError):
    """A layer produced NaN or Inf importance scores."""


@dataclass
class Selection:
    k: int  # scores to prune in the group
    n: int  # scores in the group
    threshold: torch.Tensor | None  # 0-d tensor of the score dtype; None when k == 0
    tie_quota: int | None  # scores == threshold to prune (in stream order); None: all
    passes: int  # streaming passes over the scores
    selector: str
    local_ties: int = 0  # scores == threshold on this rank (equal to the global count on one process)

    @property
    def exact(self) -> bool:
        return self.tie_quota is not None or self.threshold is None


def target_count(sparsity: float, n: int) -> int:
    """Number of weights pruned in a group of n: round(sparsity * n), halves to even."""
    return round(sparsity * n)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf. Float32 and 16-bit floats by their bit patterns:
    the largest exponent field with the sign cleared (isfinite of bfloat16 is about 30x
    slower on CPU)."""
    if t.dtype not in _NONFINITE_FROM or t.numel() == 0:
        return bool(torch.isfinite(t).all())
    ints = _INT_OF[t.dtype]
    sign_off = torch.iinfo(ints).max  # 0x7FFF, 0x7FFFFFFF
    return int(torch.bitwise_and(t.reshape(-1).view(ints), sign_off).max()) < _NONFINITE_FROM[t.dtype]


def check_finite(name: str, scores: torch.Tensor) -> None:
    if not all_finite(scores):
        raise NonFiniteScoreError(f"non-finite (NaN or Inf) importance scores in layer {name}")


def _raise_nonfinite(stream: ScoreStream) -> None:
    """Name this rank's first layer with NaN, Inf or negative scores (the radix histogram
    counts them all above its finite bins), or say that another rank has one."""
    for name, s in stream:
        _check_sign(name, s)
    raise NonFiniteScoreError("non-finite (or negative) importance scores on another rank")


def _check_sign(name: str, s: torch.Tensor) -> None:
    check_finite(name, s)
    if bool(torch.signbit(s).any()):  # -0.0 too: its bits sort above every positive score's
        raise ValueError(f"negative importance scores in layer {name}")


def _high(s: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of every score as an integer, flat: a half score's whole bit pattern,
    a float32 score's high half (an arithmetic shift: a negative score stays negative). For
    scores >= 0 the pattern is monotone in the value, so a bincount of it orders them."""
    if s.dtype not in _NONFINITE_FROM:
        raise TypeError(f"scores must be float32, bfloat16 or float16, got {s.dtype}")
    v = s.reshape(-1)
    return v.view(torch.int16) if s.dtype in HALF_DTYPES else torch.bitwise_right_shift(v.view(torch.int32), 16)


def _add_high(name: str, s: torch.Tensor, hist: torch.Tensor, lock: threading.Lock) -> None:
    """hist += the 65,536-bin histogram of ``_high(s)``: counted by the C kernels on CPU
    (kernels.py; a negative score counts in the bins from 0x8000 up, which select_radix
    refuses), else by torch.bincount, which refuses a negative score itself. ``lock``: the
    layers of a stream with several workers add from their threads."""
    sub = kernels.count_high(s)
    if sub is None:
        try:
            sub = torch.bincount(_high(s), minlength=BINS).cpu()
        except RuntimeError:  # a negative value: the sign bit of a score is set
            _check_sign(name, s)
            raise
    _add(sub, hist, lock)


def _add_low(s: torch.Tensor, hi: int, hist: torch.Tensor, lock: threading.Lock) -> None:
    """hist += the histogram of the low 16 bits of the float32 scores in high bucket ``hi``."""
    sub = kernels.count_low(s, hi)
    if sub is None:
        bits = s.reshape(-1).view(torch.int32)
        sub = torch.bincount(bits[_high(s) == hi] & 0xFFFF, minlength=BINS).cpu()  # a small set
    _add(sub, hist, lock)


def _add(counts: torch.Tensor, hist: torch.Tensor, lock: threading.Lock) -> None:
    with lock:
        if counts.dtype == torch.int64:
            hist += counts
        else:
            kernels.merge(counts, hist)


def _from_bits(bits: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype in HALF_DTYPES:
        return torch.tensor(bits, dtype=torch.int16, device="cpu").view(dtype)
    return torch.tensor(bits, dtype=torch.int32, device="cpu").view(torch.float32)


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th smallest (1-based) of a histogram, and the count below that bin."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype, device="cpu")).item())
    below = int(cum[b - 1].item()) if b > 0 else 0
    return b, below


def _score_dtype(stream: ScoreStream) -> torch.dtype:
    if not stream.names:
        raise ValueError("empty comparison group")
    first = stream.pieces(0)
    return stream.piece(0, first[0] if first else None).dtype


def select_radix(stream: ScoreStream, k: int, n: int, comm: Comm = SINGLE,
                 dtype: torch.dtype | None = None) -> Selection:
    """Exact k-th smallest score by a two-level radix histogram of the bit patterns.

    Pass 1: a 65,536-bin histogram of the top 16 bits (all 16 bits for half scores),
    all-reduced; its cumulative sum names the bin of the k-th score. Pass 2 (float32
    only): a histogram of the low 16 bits of the scores inside that bin. Memory: the
    histograms plus one layer's scores, or a few pieces of it (``ScoreStream``).
    """
    if k == 0:
        return Selection(k, n, None, 0, 0, "radix")
    dtype = dtype or _score_dtype(stream)
    half = dtype in HALF_DTYPES
    hist, lock = torch.zeros(BINS, dtype=torch.int64, device="cpu"), threading.Lock()
    for _ in stream.map_pieces(lambda name, s: _add_high(name, s, hist, lock), "radix pass 1"):
        pass
    local = hist.clone()  # this rank's share, for the tie offsets
    comm.all_reduce_sum(hist)
    limit = _NONFINITE_FROM[dtype] >> (0 if half else 16)
    if int(hist[limit:].sum()) > 0:
        _raise_nonfinite(stream)
    hi, below = _locate(hist, k)
    if half:
        return Selection(k, n, _from_bits(hi, dtype), k - below, 1, "radix", int(local[hi]))

    hist2 = torch.zeros(BINS, dtype=torch.int64, device="cpu")
    for _ in stream.map_pieces(lambda _name, s: _add_low(s, hi, hist2, lock), "radix pass 2"):
        pass
    local = hist2.clone()
    comm.all_reduce_sum(hist2)
    lo, below2 = _locate(hist2, k - below)
    return Selection(k, n, _from_bits((hi << 16) | lo, dtype), k - below - below2, 2, "radix", int(local[lo]))


def select_sort(stream: ScoreStream, k: int, n: int, comm: Comm = SINGLE) -> Selection:
    """Reference: concatenate every score and take the k smallest with topk (O(n) memory).

    This is what torch.nn.utils.prune.global_unstructured does; ties are then resolved
    by the same stream order as the other selectors.
    """
    if k == 0:
        return Selection(k, n, None, 0, 0, "sort")
    mine = torch.cat(list(stream.map(lambda _n, s: s.reshape(-1), "sort gather")))
    cat = comm.all_gather_cat(mine)
    if not bool(torch.isfinite(cat).all()):
        _raise_nonfinite(stream)
    t = torch.topk(cat, k, largest=False, sorted=False).values.max()
    below = int(torch.count_nonzero(cat < t))
    return Selection(k, n, t.cpu(), k - below, 1, "sort", int(torch.count_nonzero(mine == t)))


def select_search(stream: ScoreStream, k: int, n: int, comm: Comm = SINGLE,
                  tol: float = 1e-4, max_iter: int = 20) -> Selection:
    """The seed report's selector: normal-approximation guess, then bisection on counts.

    Pass 1 streams the sum, the sum of squares and the maximum; the first guess is
    mean + Phi^-1(k/n) * std. Each later pass counts scores <= the guess and halves the
    bracket, stopping when the count is within tol * n of k or after max_iter passes.
    Approximate by design: it prunes every score <= the final threshold.
    """
    if k == 0:
        return Selection(k, n, None, 0, 0, "search")
    dtype = _score_dtype(stream)
    sums = torch.zeros(2, dtype=torch.float64, device="cpu")  # sum, sum of squares
    top = torch.zeros(1, dtype=torch.float64, device="cpu")

    def moments(_name: str, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sq = torch.linalg.vector_norm(s, dtype=torch.float64).square()
        return torch.stack([s.sum(dtype=torch.float64), sq]).cpu(), s.max().double().cpu()

    for part, m in stream.map(moments, "search moments"):
        sums += part
        top = torch.maximum(top, m)
    comm.all_reduce_sum(sums)
    comm.all_reduce_max(top)
    if not bool(torch.isfinite(sums).all() and torch.isfinite(top).all()):
        _raise_nonfinite(stream)
    (total, total_sq), top = sums.tolist(), float(top)
    mean = total / n
    std = math.sqrt(max(total_sq / n - mean * mean, 0.0))
    q = min(max(k / n, 1e-9), 1 - 1e-9)
    lo, hi = 0.0, top
    t = min(max(mean + NormalDist().inv_cdf(q) * std, lo), hi)
    passes = 1
    for _ in range(max_iter):
        tt = torch.tensor(t, dtype=dtype, device="cpu")
        count = torch.zeros(1, dtype=torch.int64, device="cpu")
        for c in stream.map(lambda _n, s, tt=tt: torch.count_nonzero(s <= tt.to(s.device)).cpu(), "search count"):
            count += c
        comm.all_reduce_sum(count)
        passes += 1
        c = int(count)
        if abs(c - k) <= tol * n:
            break
        if c < k:
            lo = t
        else:
            hi = t
        t = (lo + hi) / 2
    return Selection(k, n, torch.tensor(t, dtype=dtype, device="cpu"), None, passes, "search")


def select(selector: str, stream: ScoreStream, k: int, n: int, comm: Comm = SINGLE,
           search_tol: float = 1e-4, search_max_iter: int = 20) -> Selection:
    if selector == "radix":
        return select_radix(stream, k, n, comm)
    if selector == "sort":
        return select_sort(stream, k, n, comm)
    if selector == "search":
        return select_search(stream, k, n, comm, tol=search_tol, max_iter=search_max_iter)
    raise ValueError(f"unknown selector {selector!r}; expected one of {', '.join(SELECTORS)}")


class TieBudget:
    """Hands out the tie quota of a Selection in stream order, layer by layer.

    Across ranks the order is (rank, layer, flat index): rank order is layer order, so
    this rank prunes what is left of the quota after the ties of the ranks before it.
    """

    def __init__(self, selection: Selection, comm: Comm = SINGLE):
        self.selection = selection
        self.remaining = selection.tie_quota
        self._buf: torch.Tensor | None = None  # prune_'s integer and boolean workspaces
        self._eq: torch.Tensor | None = None
        if self.remaining is not None and comm.world_size > 1:
            before = comm.exclusive_prefix(selection.local_ties)
            self.remaining = min(max(self.remaining - before, 0), selection.local_ties)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean mask (True = prune) of one layer's scores, in stream order."""
        t = self.selection.threshold
        if t is None:
            return torch.zeros_like(scores, dtype=torch.bool)
        t = t.to(scores.device)
        if self.remaining is None:
            return scores <= t
        if self.remaining == 0:  # the quota is spent (most layers): one comparison
            return scores < t
        mask = scores <= t
        below = scores < t
        ties = int(torch.count_nonzero(mask)) - int(torch.count_nonzero(below))
        if ties <= self.remaining:
            self.remaining -= ties
            return mask
        flat = below.view(-1)  # the first `remaining` ties in flat order
        flat[(mask.view(-1) & ~flat).nonzero().squeeze(1)[: self.remaining]] = True
        self.remaining = 0
        return below

    def prune_(self, weight: torch.Tensor, scores: torch.Tensor) -> int:
        """Set to +0.0 the weights that ``mask(scores)`` selects, in place; returns how many.

        In C where it applies (kernels.py: one loop, split over the threads), else integer
        arithmetic on bit patterns instead of boolean masks and masked_fill_ (3x faster on
        CPU): for scores >= 0, d = bits(t) - bits(s) is > 0 exactly when s < t and 0 for a
        tie, so (d - 1) >> (width - 1) (quota spent: ties kept) or d >> (width - 1) (every tie
        of the layer within the quota: pruned) is all ones for a kept weight and 0 for a
        pruned one, and AND-ing the weight's bits with it gives +0.0 or the weight. The one
        layer whose ties exceed what is left of the quota goes through ``mask``."""
        t = self.selection.threshold
        if self.remaining is None or t is None or scores.dtype not in _INT_OF or weight.dtype not in _INT_OF \
                or weight.element_size() > scores.element_size():
            return self._fill(weight, self.mask(scores))
        ints = _INT_OF[scores.dtype]
        bits = int(t.to(scores.dtype).view(ints))
        if kernels.fits(weight, scores):
            quota = self.remaining > 0  # while some is left, a tie is pruned
            ties = kernels.count_equal(scores, bits) if quota else 0
            if ties > self.remaining:
                return self._fill(weight, self.mask(scores))
            self.remaining -= ties
            return kernels.prune_(weight, scores, bits, ties=quota)
        n = scores.numel()
        if self._buf is None or self._buf.numel() < n or self._buf.dtype != ints or self._buf.device != scores.device:
            self._buf = torch.empty(n, dtype=ints, device=scores.device)  # reused: no fresh pages per layer
        d = torch.sub(bits, scores.contiguous().view(ints), out=self._buf[:n].view(scores.shape))
        if self.remaining > 0:
            if self._eq is None or self._eq.numel() < n or self._eq.device != scores.device:
                self._eq = torch.empty(n, dtype=torch.bool, device=scores.device)
            ties = int(torch.count_nonzero(torch.eq(d, 0, out=self._eq[:n].view(scores.shape))))
            if ties > self.remaining:
                return self._fill(weight, self.mask(scores))
            self.remaining -= ties
        else:
            d.sub_(1)
        keep = d.bitwise_right_shift_(8 * scores.element_size() - 1)
        if ints is not _INT_OF[weight.dtype]:  # float32 scores of 16-bit weights: either half of each word
            keep = keep.view(_INT_OF[weight.dtype])[..., ::2]
        weight.view(_INT_OF[weight.dtype]).bitwise_and_(keep)
        return n - int(torch.count_nonzero(keep))

    def prune_layer_(self, weight: torch.Tensor, stream: ScoreStream, i: int) -> int:
        """``prune_`` layer i of the stream, whose (out, in) weight this is, piece by piece
        in stream order (``ScoreStream.pieces``); returns how many it pruned."""
        return sum(self.prune_(weight if b is None else weight[b[0]:b[1]], stream.piece(i, b))
                   for b in stream.pieces(i))

    @staticmethod
    def _fill(weight: torch.Tensor, mask: torch.Tensor) -> int:
        weight.masked_fill_(mask, 0.0)  # +0.0, never -0.0
        return int(torch.count_nonzero(mask))


def row_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exact per-row selection (Wanda's comparison group): the k smallest scores of every
    row, ties broken by column index. O(n) with kthvalue."""
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    t = torch.kthvalue(scores, k, dim=1, keepdim=True).values  # (rows, 1)
    mask = scores < t
    eq = scores == t
    need = k - mask.sum(1, keepdim=True)
    mask |= eq & (torch.cumsum(eq, 1) <= need)
    return mask


def extra_rows(scores: torch.Tensor, q: int, r: int) -> torch.Tensor:
    """Which rows lose q + 1 weights when a layer's target is q per row plus r: the r rows
    whose (q + 1)-th smallest score is lowest (the cheapest extra weights; ties: lower row
    index first). Bool (rows,)."""
    more = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    if r:
        nxt = torch.kthvalue(scores, q + 1, dim=1).values
        more[torch.sort(nxt, stable=True).indices[:r]] = True
    return more


def scope_mask(scores: torch.Tensor, k: int, scope: str, m: int = 4) -> torch.Tensor:
    """The k lowest scores of one layer (out, in) under a per-layer scope: ``layer`` (any k,
    ties by index), ``row`` (``rows_mask``) or ``nm`` (k * m / numel of every m consecutive
    weights of a row)."""
    if scope == "layer":
        return row_mask(scores.reshape(1, -1), k).view_as(scores)
    if scope == "row":
        return rows_mask(scores, k)
    return row_mask(scores.reshape(-1, m), k * m // scores.numel()).view_as(scores)


def rows_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row selection of k weights of a layer in all: every row loses k // rows, and the
    k % rows rows that ``extra_rows`` names one more."""
    q, r = divmod(k, scores.shape[0])
    if r == 0:
        return row_mask(scores, q)
    more = extra_rows(scores, q, r)
    mask = torch.empty_like(scores, dtype=torch.bool)
    mask[more] = row_mask(scores[more], q + 1)
    mask[~more] = row_mask(scores[~more], q)
    return mask

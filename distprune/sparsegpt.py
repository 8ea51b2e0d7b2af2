"""SparseGPT (Frantar & Alistarh, 2023): prune one layer and update its remaining weights
to reconstruct its outputs on the calibration inputs. Pure tensor functions: a weight and
its Hessian in, the new weight and mask out; nothing here knows about ranks or models.

The algorithm is the reference implementation's (IST-DASLab/sparsegpt, ``fasterprune``):
dead inputs zeroed, dampening, the upper Cholesky factor of H^-1, columns in blocks with
the mask chosen inside each block from w^2 / [H^-1]_jj^2, the OBS update of the block's
remaining columns and a lazy batch update of the columns after it. Two differences, both
for exactness: the number of weights pruned is exact (a stable sort picks exactly k, ties
by index, where the reference's ``<=`` threshold may take more), and the count per column
block comes from rounding the running total, so a layer (or row) loses exactly the
number of weights it is given (its allocation, allocate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from distprune.select import extra_rows

MAX_DAMP_STEPS = 12  # dampening x10 per failed factorization: 1e-2 -> 1e10 of mean(diag H)


@dataclass
class Solved:
    weight: torch.Tensor  # (out, in) float32, pruned entries +0.0 (masked_fill of each column)
    mask: torch.Tensor  # (out, in) bool, True where pruned
    percdamp: float  # the dampening that factorized (prune.percdamp unless raised)
    error: float  # sum of the OBS losses, (w - q)^2 / [H^-1]_jj^2 / 2: the reconstruction error


def inverse_factor(h: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * I)^-1, in dtype, with damp = percdamp *
    mean(diag H); when a factorization fails the dampening grows x10 until it succeeds
    (returned with the factor). h is (in, in) with no zero diagonal entries."""
    h = h.to(dtype)
    mean = float(h.diagonal().mean())
    for step in range(MAX_DAMP_STEPS + 1):
        pd = percdamp * 10**step if percdamp > 0 else (0.0 if step == 0 else 10.0 ** (step - 3))
        damped = h.clone()
        damped.diagonal().add_(pd * mean)
        low, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inv = torch.cholesky_inverse(low)
            up, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0 and bool(torch.isfinite(up).all()):
                return up, pd
    raise ArithmeticError(f"the Hessian does not factorize even with dampening {pd:g}")


def _counts(k: int, cols: int, blocksize: int) -> list[int]:
    """Weights to prune in each block of columns when k are pruned over ``cols`` columns:
    the differences of round(k * cumulative columns / cols), exact rationals, so they add
    up to k."""
    ends = list(range(blocksize, cols, blocksize)) + [cols]
    cum = [round(Fraction(k * e, cols)) for e in ends]
    return [b - a for a, b in zip([0, *cum], cum, strict=False)]


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries of each row of scores (ties: lowest index first)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, order, True)
    return mask


def work_dtype(device: torch.device) -> torch.dtype:
    """The dtype a solve computes in: float32 as the reference does, but float64 on a CPU.
    A CPU's BLAS and LAPACK kernels (Cholesky, the lazy batch update's matmul) sum in an
    order that depends on the thread count, and SparseGPT's column loop amplifies the
    difference: each weight chosen differently changes the updates of the rest of its row.
    A plain process (every core) and torchrun ranks (one thread each) then disagreed on
    2.7% of the mask of a 132M-parameter bfloat16 Llama (sequential, 8 blocks; issue 22).
    In float64 the kernels' differences sit at 1e-16 and the masks agree (docs/BENCHMARKS.md,
    "Rank invariance of solves"). A GPU solves a layer with the same kernels whatever the
    rank count: float32 there."""
    return torch.float64 if device.type == "cpu" else torch.float32


@torch.no_grad()
def solve(weight: torch.Tensor, hessian: torch.Tensor, k: int, scope: str = "layer", m: int = 4,
          blocksize: int = 128, percdamp: float = 0.01, dtype: torch.dtype | None = None) -> Solved:
    """Prune k weights of ``weight`` (out, in) with the Hessian ``hessian`` (in, in) of its
    inputs, H = 2/n * sum x x^T. scope: ``layer`` (any k of the layer), ``row`` (k spread
    over the rows: k // rows each, one more in the k % rows rows whose next weight has the
    lowest saliency before the solve, ``select.extra_rows``) or
    ``nm`` (k * m / (out * in) of every m consecutive weights of a row, chosen on the
    already-updated weights). Computes in ``dtype`` (default: ``work_dtype``); returns
    float32 weights."""
    dtype = dtype or work_dtype(weight.device)
    w = weight.detach().to(dtype, copy=True)
    rows, cols = w.shape
    h = hessian.detach().to(dtype, copy=True)
    dead = h.diagonal() == 0  # inputs that were always 0: no information, weight removed
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    hinv, used = inverse_factor(h, percdamp, dtype)
    n = k * m // (rows * cols) if scope == "nm" else 0
    if scope == "layer":
        counts = _counts(k, cols, blocksize)
    elif scope == "row":  # every row loses q, the r rows with the cheapest next weight q + 1
        q, r = divmod(k, rows)
        more = extra_rows(w**2 / hinv.diagonal()[None, :] ** 2, q, r)
        plus, base = _counts(q + 1, cols, blocksize), _counts(q, cols, blocksize)
    mask = torch.zeros_like(w, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=torch.float64, device=w.device)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # (out, block)
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        if scope == "layer":
            mask1 = _lowest((w1**2 / d[None, :] ** 2).reshape(1, -1), counts[b]).view_as(w1)
        elif scope == "row":
            saliency = w1**2 / d[None, :] ** 2
            mask1 = torch.empty_like(w1, dtype=torch.bool)
            mask1[more] = _lowest(saliency[more], plus[b])
            mask1[~more] = _lowest(saliency[~more], base[b])
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if scope == "nm" and i % m == 0:  # this group of m, on the weights updated so far
                mask1[:, i:i + m] = _lowest(w1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2, n)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            e = (col - q) / d[i]  # (out,)
            losses += (e.double() ** 2) / 2
            q1[:, i] = q
            w1[:, i:].sub_(e[:, None] * hinv1[i, i:][None, :])
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])  # later columns only: w[:, i1:i2] stays q1
    return Solved(w.float(), mask, used, float(losses.sum()))


def solve_cost(rows: int, cols: int) -> float:
    """Time of one solve in arbitrary units, what owners are balanced by: the column loop
    (per column: an update of the block's rows, plus a fixed launch and Python overhead
    worth about 512 rows) and the inverse factor (~in^3, fast BLAS-3). Fitted to solves
    on a 2-core CPU (576 x 576: 0.21 s, 1536 x 576: 0.38 s, 576 x 1536: 0.61 s); the
    in^2 * out of the lazy updates is a small part at these sizes."""
    return cols * (rows + 512) + cols**3 / 8000

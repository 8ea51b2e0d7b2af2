"""ALPS (Meng, Behdin, Wang and Mazumder, NeurIPS 2024), and the refit of any mask it ends
with. Pure tensor functions like sparsegpt.py: a weight and its Hessian in, the new
weight and mask out; nothing here knows about ranks or models.

The layer problem: min over W' of ||W X - W' X||^2 = tr((W' - W) H (W' - W)^T) / c with
W' in the scope's sparsity set (layer: any k zeros; row: a count per row; N:M: n zeros in
every m). As in the reference implementation (mazumder-lab/ALPS, ``ALPS_admm``):
- H is dampened (``percdamp`` x mean(diag H)) and scaled to a unit diagonal, H_n = D^-1 H
  D^-1 with D = diag(H)^1/2, B = (W D)^T; the scaling is also the Jacobi preconditioner of
  the conjugate gradients below.
- ADMM on B = D (the support): B <- (H_n + rho I)^-1 (H_n B_0 - V + rho D), D <- the
  projection of B + V / rho onto the sparsity set (keep the largest), V <- V + rho (B - D),
  with (H_n + rho I)^-1 from one eigendecomposition of H_n. Every ``update_iter``
  iterations rho grows by how much the support moved (x1.3 above 10% of the kept weights,
  x1.2 above 0.5%, x1.1 otherwise; a rho that leaves the support still from the start is
  divided by 5 and the iterations restart), and the loop ends once the support no longer
  moves (after ``switch_iter`` iterations: moves of under 0.03% count as still).
- The final support is refit by preconditioned conjugate gradients on H_n (``refit_iters``
  iterations; each row of W is one system over its kept weights).

Differences from the reference, all for exactness or for distprune's scopes: exact counts
(the layer loses exactly k weights, ties broken by index), the row scope (its per-row
counts are fixed at the start from the dense weights, like sparsegpt's ``extra_rows``),
the conjugate gradients stop on the residual of the kept weights (the reference measures
the residual of all weights, which never vanishes, so it always runs its 10 iterations),
and dead inputs (H_jj = 0) are removed first as in SparseGPT.
"""

from __future__ import annotations

import torch

from distprune.select import extra_rows, row_mask
from distprune.sparsegpt import Solved

RHO_MAX = 1e6  # the reference's cap


def _normalize(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float):
    """(H_n (in, in) float64, B_0 = (W D)^T (in, out) float64, D (in,), dead inputs (in,) bool)."""
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * float(h.diagonal().mean()))
    d = h.diagonal().sqrt()
    return h / d[:, None] / d[None, :], (w * d[None, :]).t().contiguous(), d, dead


class Projection:
    """The scope's sparsity set, for B (in, out) laid out as W^T: ``__call__(B)`` is the
    mask (in, out) of the weights that go (True), the smallest |B| by the scope's rule."""

    def __init__(self, b0: torch.Tensor, k: int, scope: str, m: int) -> None:
        cols, rows = b0.shape  # W is (rows, cols)
        self.k, self.scope, self.m = k, scope, m
        if scope == "row":  # every row loses q, the r rows with the cheapest next weight q + 1
            q, r = divmod(k, rows)
            self.q, self.more = q, extra_rows((b0 * b0).t(), q, r)
        elif scope == "nm":
            self.n = k * m // (rows * cols)

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        s = (b * b).t()  # (rows, cols): W's layout, so that ties go by W's index
        if self.scope == "layer":
            mask = row_mask(s.reshape(1, -1), self.k).view_as(s)
        elif self.scope == "row" and bool(self.more.any()):
            mask = self._rows(s)
        elif self.scope == "row":
            mask = row_mask(s, self.q)
        else:
            mask = row_mask(s.reshape(-1, self.m), self.n).view_as(s)
        return mask.t()

    def _rows(self, s: torch.Tensor) -> torch.Tensor:
        """row_mask with q + 1 in the rows ``more`` and q elsewhere, from one partial sort:
        the q + 1 smallest scores of each row hold both thresholds."""
        q = self.q
        low = torch.topk(s, q + 1, dim=1, largest=False, sorted=False).values
        t = low.max(1, keepdim=True).values  # the (q + 1)-th smallest
        if q:
            qth = torch.topk(low, 2, dim=1).values[:, 1:]
            t = torch.where(self.more[:, None], t, qth)
        else:
            t = torch.where(self.more[:, None], t, torch.full_like(t, -torch.inf))
        mask = s < t
        eq = s == t
        need = (q + self.more.to(torch.long))[:, None] - mask.sum(1, keepdim=True)
        mask |= eq & (torch.cumsum(eq, 1) <= need)
        return mask


def conjugate_gradients(hn: torch.Tensor, target: torch.Tensor, x: torch.Tensor, keep: torch.Tensor,
                        iters: int, rtol: float = 1e-4) -> torch.Tensor:
    """Minimize tr((X - X*)^T H_n (X - X*)) over X (in, out) zero outside ``keep``, where
    H_n X* = ``target``, from x: conjugate gradients on each column's kept entries (all
    columns at once), at most ``iters`` iterations, until every column's residual is
    within rtol of its target's norm. H_n has a unit diagonal: Jacobi-preconditioned."""
    keep = keep.to(x.dtype)
    x = x * keep
    r = (target - hn @ x) * keep
    p = r.clone()
    rr = (r * r).sum(0)
    stop = rtol * (target * keep).norm(dim=0)
    for _ in range(iters):
        if bool((rr.sqrt() <= stop).all()):
            break
        ap = hn @ p
        pap = (p * ap).sum(0)
        alpha = rr / torch.where(pap == 0, torch.ones_like(pap), pap)
        x += alpha * p
        r -= alpha * ap
        r *= keep
        rr_next = (r * r).sum(0)
        p = r + (rr_next / torch.where(rr == 0, torch.ones_like(rr), rr)) * p
        rr = rr_next
    return x


def _result(x: torch.Tensor, b0: torch.Tensor, hn: torch.Tensor, d: torch.Tensor, mask: torch.Tensor,
            percdamp: float) -> Solved:
    """W' = (X D^-1)^T, and the error 1/2 tr((W' - W) H (W' - W)^T) of the dampened H (the
    scale of sparsegpt's error)."""
    diff = x - b0
    error = 0.5 * float((diff * (hn @ diff)).sum())
    w = (x / d[:, None]).t().float().contiguous()
    return Solved(w.masked_fill(mask.t(), 0.0), mask.t().contiguous(), percdamp, error)


@torch.no_grad()
def refit(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, iters: int = 10,
          percdamp: float = 0.01, start: torch.Tensor | None = None) -> Solved:
    """The kept weights of the dense ``weight`` (out, in; ``mask`` (out, in) True where
    pruned) set to reconstruct the dense layer's outputs, min ||W X - W' X||^2 over W' with
    that support (H dampened by ``percdamp``), by ``iters`` conjugate-gradient iterations
    from ``start`` (a solve's own weights: the error only goes down from them) or the dense
    values."""
    hn, b0, d, _dead = _normalize(weight, hessian, percdamp)
    x0 = (start.double() * d[None, :]).t() if start is not None else b0
    hn32 = hn.float()
    x = conjugate_gradients(hn32, hn32 @ b0.float(), x0.float(), ~mask.t(), iters)
    return _result(x.double(), b0, hn, d, mask.t(), percdamp)


@torch.no_grad()
def solve(weight: torch.Tensor, hessian: torch.Tensor, k: int, scope: str = "layer", m: int = 4,
          rho: float = 0.1, max_iter: int = 300, update_iter: int = 3, switch_iter: int = 30,
          refit_iters: int = 10, percdamp: float = 0.01) -> Solved:
    """Prune k weights of ``weight`` (out, in) with the Hessian (in, in) of its inputs by
    ALPS's ADMM, then refit the kept weights (module docstring). Returns float32 weights."""
    hn, b0, d, _dead = _normalize(weight, hessian, percdamp)
    project = Projection(b0, k, scope, m)
    kept = max(b0.numel() - k, 1)
    eig, vec = torch.linalg.eigh(hn)
    hn32, vec32 = hn.float(), vec.float()

    def inverse(r: float) -> torch.Tensor:  # (H_n + r I)^-1
        return (vec32 * (1.0 / (eig + r)).float()[None, :]) @ vec32.t()

    start = b0.float()
    target = hn32 @ start  # H_n B_0
    mask0 = project(start)
    b, v = start.clone(), torch.zeros_like(start)
    dz = start.masked_fill(mask0, 0.0)
    inv, moved_once, previous = inverse(rho), False, mask0
    for it in range(max_iter):
        b = inv @ (target - v + rho * dz)
        z = b + v / rho
        mask = project(z)
        dz = z.masked_fill(mask, 0.0)
        v += rho * (b - dz)
        if (it + 1) % update_iter:
            continue
        change = int((mask != previous).sum())
        previous = mask
        if change / kept > 0.1:
            moved_once, rho = True, rho * 1.3
        elif change / kept > 0.005:
            moved_once, rho = True, rho * 1.2
        elif change > 0:
            if moved_once:
                rho *= 1.1
            else:  # rho was too large to move the support at all: smaller, and start again
                rho /= 5
                b, v, dz = start.clone(), torch.zeros_like(start), start.masked_fill(mask0, 0.0)
        elif moved_once:
            break
        else:
            rho /= 5
        rho = min(rho, RHO_MAX)
        inv = inverse(rho)
        if it >= switch_iter and change / kept < 0.0003:
            break
    mask = project(b)
    x = conjugate_gradients(hn32, target, b.masked_fill(mask, 0.0), ~mask, refit_iters)
    return _result(x.double(), b0, hn, d, mask, percdamp)


def solve_cost(rows: int, cols: int) -> float:
    """Time of one ALPS solve, in sparsegpt.solve_cost's units (owners are balanced by it):
    tens of (cols x cols) @ (cols x rows) products and the eigendecomposition (~cols^3).
    Fitted to solves of 50% per layer on the 2-core CPU, one thread (2026-12-02; seconds:
    576 x 576 1.01, 1536 x 576 3.05, 576 x 1536 7.28, 1024 x 1024 5.02, 2816 x 1024 12.91,
    1024 x 2816 42.35; the fit is within 16%): 4.84 s per 1e9 cols^2 rows plus 0.16 s per 1e9
    cols^3, at the 3.3e6 units a second that sparsegpt's solves ran at beside them."""
    return 0.016 * cols * cols * rows + 0.00053 * cols**3


def refit_cost(rows: int, cols: int) -> float:
    """Time of one refit (10 conjugate-gradient iterations), in the same units: 0.17-0.30 of
    an ALPS solve of the same layer in the runs above, 0.23 on average."""
    return 0.23 * solve_cost(rows, cols)

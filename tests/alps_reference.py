"""A port of the reference ALPS loop (mazumder-lab/ALPS, ``ALPS_admm`` with its
``cg_batch`` refit), on the CPU: what tests/test_alps.py and scripts/alps_layers.py
compare distprune's ALPS against."""

import torch


def reference(w: torch.Tensor, xtx: torch.Tensor, sp: float, nm_n: int = 0, nm_m: int = 0, rho: float = 0.1,
              max_iter: int = 300, update_iter: int = 3, switch_iter: int = 30) -> torch.Tensor:
    """A port of mazumder-lab/ALPS ``ALPS_admm`` (alps.py of its repository) on the CPU, for
    the layer and N:M scopes (its ``nm_n`` is the weights each group keeps), with its
    conjugate-gradient refit (cg_batch, 10 iterations, rtol 1e-4 of the full residual).
    Returns the pruned weight (out, in)."""
    xtx = xtx.float().clone()
    w = w.float().clone()
    damp = 0.01 * torch.mean(torch.diag(xtx)).item()
    xtx.diagonal().add_(damp)
    xn = torch.diag(xtx).sqrt() + 1e-8
    xtx = xtx / xn
    xtx = (xtx.T / xn).T
    ytx = torch.matmul(w * xn, xtx)
    b = (w * xn).t().clone()
    b_orig = b.clone()
    v = torch.zeros_like(b)
    totp, num_cout = b.shape
    lam, q = torch.linalg.eigh(xtx.double())
    inv = (q @ ((1 / (lam + rho)) * q).T).float()
    k_spar = round((1 - sp) * b.numel())

    def project(z: torch.Tensor) -> torch.Tensor:
        if nm_n == 0:
            d = z.clone().reshape(-1)
            _, idx = torch.topk(-d**2, totp * num_cout - k_spar)
            d[idx] = 0
            return d.reshape(totp, num_cout)
        groups = int(totp * num_cout / nm_m)
        d = z.clone().t().reshape(groups, nm_m)
        _, idx = torch.topk(-d**2, nm_m - nm_n, dim=1)
        d = d.scatter(src=torch.zeros(groups, nm_m - nm_n), dim=1, index=idx)
        return d.reshape(num_cout, totp).t()

    if nm_n:
        k_spar = int(totp * num_cout * nm_n / nm_m)
    d = project(b)
    d_init = d.clone()
    supp_prev = (d == 0).float()
    init_rho = False
    for i in range(max_iter):
        b = inv @ (ytx.T - v + rho * d)
        d = project((v + rho * b) / rho)
        v = v + rho * (b - d)
        if (i + 1) % update_iter == 0:
            supp = (d == 0).float()
            change = torch.sum((supp - supp_prev) ** 2)
            if change / k_spar > 0.1:
                init_rho, rho = True, rho * 1.3
            elif change / k_spar > 0.005:
                init_rho, rho = True, rho * 1.2
            elif change > 0.5:
                if init_rho:
                    rho *= 1.1
                else:
                    rho /= 5
                    b, d, v = b_orig.clone(), d_init.clone(), torch.zeros_like(b)
            elif init_rho:
                break
            else:
                rho /= 5
            supp_prev = supp.clone()
            rho = min(rho, 1e6)
            inv = (q @ ((1 / (lam + rho)) * q).T).float()
            if i >= switch_iter and change / k_spar < 0.0003:
                break
    b = project(b)
    keep = (b != 0).float()
    target = ytx.T
    x, r = b, (target - xtx @ b) * keep  # cg_batch, no preconditioner, X0 = B
    p, rz_old = r, None
    stop = 1e-4 * torch.norm(target, dim=1)
    for _ in range(10):
        z = r
        if rz_old is not None:
            p = z + ((r * z).sum(0) / rz_old) * p
        rz_old = (r * z).sum(0)
        ap = xtx @ p
        den = (p * ap).sum(0)
        den[den == 0] = 1e-8
        alpha = rz_old / den
        x = x + alpha * p
        r = (r - alpha * ap) * keep
        if (torch.norm(xtx @ x - target, dim=1) <= stop).all():
            break
    return (x.t() / xn)

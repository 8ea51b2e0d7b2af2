"""ALPS and the refit of any mask (distprune/alps.py): against a port of the reference
loop, exact counts in every scope, no NaN from singular Hessians, and the refit's error."""

import json
import re

import pytest
import torch
from alps_reference import reference
from conftest import TINY
from ranks import why
from test_distributed import launch, tensors

from distprune import alps, sparsegpt
from distprune.api import calibrate_and_prune
from distprune.config import ConfigError, ModelConfig, PruneConfig
from distprune.models import load
from distprune.select import target_count


def problem(rows=48, cols=64, tokens=600, seed=0):
    """A layer and the Hessian of correlated inputs with a few large channels (as LLM
    activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x[:, :3] *= 8
    w = torch.randn(rows, cols, generator=g)
    return w, (2.0 / tokens) * (x.T @ x).double()


def error(w: torch.Tensor, new: torch.Tensor, h: torch.Tensor) -> float:
    d = (new - w).double()
    return float(torch.trace(d @ h @ d.T))


@pytest.mark.parametrize("scope,kw", [("layer", {}), ("nm", {"nm_n": 2, "nm_m": 4})])
@pytest.mark.parametrize("seed", [0, 1])
def test_alps_is_no_worse_than_the_reference_loop(scope, kw, seed):
    w, h = problem(seed=seed)
    k = w.numel() // 2
    ours = alps.solve(w, h, k, scope, 4)
    ref = reference(w, h, 0.5, **kw)
    assert int((ref == 0).sum()) >= k  # the reference prunes (at least) as many
    assert error(w, ours.weight, h) <= error(w, ref, h) * 1.001


@pytest.mark.parametrize("scope", ["layer", "row", "nm"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_alps_prunes_exact_counts_and_beats_sparsegpt(scope, sparsity):
    w, h = problem(seed=3)
    if scope == "nm":
        sparsity = 0.5
    k = round(sparsity * w.numel())
    got = alps.solve(w, h, k, scope, 4)
    assert int(got.mask.sum()) == k and bool((got.weight[got.mask] == 0).all())
    assert bool((got.weight[~got.mask] != 0).all())
    if scope == "row":  # k // rows per row, k % rows rows one more
        per_row = got.mask.sum(1)
        assert set(per_row.tolist()) <= {k // w.shape[0], k // w.shape[0] + 1}
    if scope == "nm":
        assert bool((got.mask.view(w.shape[0], -1, 4).sum(-1) == 2).all())
    sgpt = sparsegpt.solve(w, h, k, scope, 4, blocksize=16)
    assert error(w, got.weight, h) < error(w, sgpt.weight, h)


def test_refit_keeps_the_mask_and_lowers_the_error():
    w, h = problem(seed=4)
    scores = w.abs() * h.diagonal().sqrt().float()[None, :]  # Wanda's score (H's diagonal holds the norms)
    mask = scores <= scores.flatten().kthvalue(w.numel() // 2).values
    masked = w.masked_fill(mask, 0.0)
    fit = alps.refit(w, mask, h, iters=10)
    assert torch.equal(fit.mask, mask) and bool((fit.weight[mask] == 0).all())
    assert error(w, fit.weight, h) < 0.8 * error(w, masked, h)
    more = alps.refit(w, mask, h, iters=50)
    assert error(w, more.weight, h) <= error(w, fit.weight, h) * (1 + 1e-9)
    sgpt = sparsegpt.solve(w, h, w.numel() // 2, "layer", blocksize=16)  # from a solve's own weights: never worse
    again = alps.refit(w, sgpt.mask, h, iters=10, start=sgpt.weight)
    assert error(w, again.weight, h) <= error(w, sgpt.weight, h) * 1.01  # both minimize the dampened H


def test_dead_inputs_and_a_singular_hessian_give_no_nan():
    w, h = problem(seed=5)
    h[:, 7] = 0.0
    h[7, :] = 0.0  # an input that was always 0
    low = torch.randn(64, 3, dtype=torch.float64)
    for hess in (h, low @ low.T):  # rank 3 of 64
        for got in (alps.solve(w, hess, w.numel() // 2, "row"), alps.refit(w, w.abs() < 0.5, hess)):
            assert bool(torch.isfinite(got.weight).all())
    assert bool((alps.solve(w, h, w.numel() // 2, "row").weight[:, 7] == 0).all())


@pytest.mark.parametrize("scope", ["row", "nm"])
def test_end_to_end_alps_beats_sparsegpt_and_refit_beats_the_plain_mask(scope):
    """Through calibrate_and_prune on a tiny Llama (sequential): exact counts, nothing
    non-finite; the pruned model's outputs on its calibration windows are closer to the
    dense model's with alps than with sparsegpt, and with wanda + refit than with wanda
    (random weights: the loss itself means nothing)."""
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    dense = logits(load(ModelConfig(random=dict(TINY["llama"]))).model)
    loss = {}
    for name, kw in {"alps": {"method": "alps"}, "sparsegpt": {"method": "sparsegpt"}, "wanda": {"method": "wanda"},
                     "wanda+refit": {"method": "wanda", "refit": True},
                     "magnitude+refit": {"method": "magnitude", "refit": True}}.items():
        model = load(ModelConfig(random=dict(TINY["llama"]))).model
        cfg = PruneConfig(scope=scope, sparsity=0.5, mode="sequential", **kw)
        result = calibrate_and_prune(model, cfg, lambda: ids, "cpu", batch_size=4, show_progress=False)
        assert result.pruned == target_count(0.5, result.numel)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if name.endswith("refit"):
            assert result.summary()["selector"] == f"{kw['method']}+refit-{scope}"
        loss[name] = float((logits(model) - dense).norm())
    assert loss["alps"] < loss["sparsegpt"] and loss["wanda+refit"] < loss["wanda"], loss


@pytest.mark.parametrize("override,message", [
    ({"method": "wanda", "alps_rho": 0.5}, "prune.alps_rho=0.5 has no effect with prune.method=wanda"),
    ({"method": "wanda", "refit_iters": 5}, "it tunes prune.method=alps or prune.refit=true"),
    ({"method": "alps", "alps_rho": 0.0}, "prune.alps_rho=0.0 must be > 0"),
    ({"method": "alps", "alps_max_iter": 0}, "prune.alps_max_iter=0 must be at least 1"),
    ({"method": "alps", "alps_update_iter": 0}, "prune.alps_update_iter=0 must be at least 1"),
    ({"method": "wanda", "refit": True, "refit_iters": 0}, "prune.refit_iters=0 must be at least 1"),
    ({"method": "alps", "refit": True}, "prune.refit=true has no effect with prune.method=alps"),
    ({"method": "wanda", "refit": True, "scope": "global"}, "prune.refit=true needs a per-layer scope"),
    ({"method": "alps", "scope": "global"}, "prune.method=alps does not support prune.scope=global"),
])
def test_bad_alps_and_refit_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        PruneConfig(**override).check()


def test_refit_settings_are_accepted_where_they_act():
    PruneConfig(method="wanda", refit=True, refit_iters=5, percdamp=0.05).check()
    PruneConfig(method="alps", alps_rho=0.5, alps_max_iter=50, refit_iters=20).check()
    PruneConfig(method="magnitude", refit=True, scope="nm").check()


def test_alps_and_refit_do_not_depend_on_the_rank_count(tmp_path):
    """One process and 3 torchrun ranks, one thread each: the Hessians are reduced onto each
    layer's owner in float64 (exact), so alps and wanda + refit write identical weights."""
    args = ["-m", "prune=alps,wanda-refit", "model.dtype=float32", "calib.nsamples=6", "calib.seqlen=32",
            "calib.batch_size=2", "calib.cache=false"]
    for ranks in (1, 3):
        p = launch(ranks, tmp_path / f"ws{ranks}", *args, env={"OMP_NUM_THREADS": "1"}, job="${prune.method}")
        assert p.returncode == 0, why(p)
    for job in ("alps", "wanda"):
        ref, got = tensors(tmp_path / "ws1" / job), tensors(tmp_path / "ws3" / job)
        assert ref.keys() == got.keys()
        for name, t in ref.items():
            assert torch.equal(t, got[name]), (job, name)
        report = json.loads((tmp_path / "ws3" / job / "distprune_report.json").read_text())
        assert report["selector"] == ("alps-row" if job == "alps" else "wanda+refit-row")
        assert report["pruned_fraction"] == pytest.approx(0.5, abs=1e-4)

"""Allocation: targets per layer (uniform, OWL, global budgets), normalized scores, the
exact total, and the same targets and masks on 1, 2 and 3 ranks."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import jobs
from test_distributed import launch, tensors

from distprune import PruneConfig, prune, stats
from distprune.allocate import Entry, exact, global_budgets, normalized, owl, uniform
from distprune.api import calibrate_and_prune
from distprune.config import ConfigError, ModelConfig
from distprune.layers import PrunableLayer, prunable_layers
from distprune.models import load
from distprune.select import target_count


def fake_layers(shapes, blocks, seed=0):
    """PrunableLayers of random weights with lognormal magnitudes (uneven scales, as real
    scores have), one shape and block each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, ((rows, cols), block) in enumerate(zip(shapes, blocks, strict=True)):
        lin = torch.nn.Linear(cols, rows, bias=False)
        lin.weight.data = torch.randn(rows, cols, generator=g).exp() * (1 + i)
        out.append(PrunableLayer(f"model.layers.{block}.l{i}", lin, block, False))
    return out


def magnitude(layer):
    return layer.weight.abs().contiguous()


@settings(max_examples=200, deadline=None)
@given(numels=st.lists(st.integers(1, 500), min_size=1, max_size=8), data=st.data())
def test_exact_rounding_adds_up_and_stays_near_the_ideal(numels, data):
    layers = [Entry(f"l{i}", 1, n, i) for i, n in enumerate(numels)]
    fractions = data.draw(st.lists(st.floats(0, 1), min_size=len(numels), max_size=len(numels)))
    ideal = [f * n for f, n in zip(fractions, numels, strict=True)]
    k = data.draw(st.integers(0, sum(numels)))
    got = exact(ideal, layers, k)
    assert sum(got.values()) == k
    assert all(0 <= got[e.name] <= e.numel for e in layers)
    if abs(k - math.fsum(ideal)) < 0.5:  # ideal already adds up to about k: each is rounded
        assert all(abs(got[e.name] - v) < 1.5 for e, v in zip(layers, ideal, strict=True))


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_uniform_total_is_exact_even_when_rows_do_not_divide(scope):
    layers = [Entry("a", 7, 33, 0), Entry("b", 5, 41, 0), Entry("c", 7, 33, 1)]
    got = uniform(layers, 0.7, scope).targets
    n = sum(e.numel for e in layers)
    assert sum(got.values()) == target_count(0.7, n) == 467  # round(0.7 * 667)
    assert all(abs(got[e.name] - 0.7 * e.numel) < 1 for e in layers)
    assert uniform(layers[:1], 0.5, "nm", 4).targets == {"a": 7 * 33 // 4 * 2}


def test_normalized_scores_have_mean_one_per_layer_or_row():
    s = torch.rand(6, 10) * torch.arange(1, 7)[:, None]
    s[2] = 0  # a zero row stays zero
    assert normalized(s, "none") is s
    lay = normalized(s, "layer")
    assert lay.dtype == torch.float32 and math.isclose(float(lay.mean()), 1.0, rel_tol=1e-5)
    row = normalized(s, "row")
    means = row.mean(1)
    assert torch.allclose(means[[0, 1, 3, 4, 5]], torch.ones(5)) and (row[2] == 0).all()
    bf = normalized(s.bfloat16(), "layer")  # 16-bit scores come back float32
    assert bf.dtype == torch.float32


@pytest.mark.parametrize("sparsity, owl_m, lam", [(0.5, 2.0, 0.08), (0.7, 3.0, 0.12), (0.6, 1.5, 0.0)])
def test_owl_is_the_papers_formula(sparsity, owl_m, lam):
    shapes = [(8, 12), (12, 8), (8, 12), (12, 8), (8, 12), (12, 8)]
    layers = fake_layers(shapes, [0, 0, 1, 1, 2, 2])
    entries = [Entry(x.name, *x.weight.shape, x.block) for x in layers]
    got = owl(entries, layers, magnitude, sparsity, owl_m, lam)
    # by hand: per block, the fraction of scores above owl_m x the block's mean score
    d = []
    for b in range(3):
        s = np.concatenate([x.weight.abs().numpy().ravel() for x in layers if x.block == b]).astype(np.float64)
        d.append(np.mean(s > owl_m * s.mean()))
    d = np.array(d)
    r = (d - d.min()) / (d.max() - d.min()) * 2 * lam if d.max() > d.min() else np.zeros(3)
    expect = sparsity + r.mean() - r  # density r - mean(r) + 1 - s
    assert np.allclose([got.block_sparsity[b] for b in range(3)], expect, atol=1e-12)
    assert math.isclose(float(np.mean(expect)), sparsity) and np.ptp(expect) <= 2 * lam + 1e-12
    assert sum(got.targets.values()) == target_count(sparsity, sum(e.numel for e in entries))
    for e in entries:  # each layer at its block's sparsity, up to the rounding
        assert abs(got.targets[e.name] - got.block_sparsity[e.block] * e.numel) <= 1
    more = int(np.argmax(d))  # the block with the most outliers keeps the most weights
    assert lam == 0 or got.block_sparsity[more] == min(got.block_sparsity.values())


@pytest.mark.parametrize("how", ["none", "layer", "row"])
@pytest.mark.parametrize("selector", ["radix", "sort", "search"])
def test_global_budgets_are_counts_below_one_threshold(how, selector):
    """Reference: concatenate every normalized score in stream order and take the k smallest
    (ties by order) with a stable sort; each layer's budget is how many of them it holds."""
    layers = fake_layers([(8, 12), (12, 8), (5, 20)], [0, 0, 1], seed=3)
    for x in layers:  # ties across and within layers
        x.weight[:, :3] = 1.0
    entries = [Entry(x.name, *x.weight.shape, x.block) for x in layers]
    score = lambda x: normalized(magnitude(x), how)
    got = global_budgets(entries, layers, score, 0.6, selector).targets
    k = target_count(0.6, sum(e.numel for e in entries))
    assert sum(got.values()) == k
    if selector == "search":  # approximate threshold, then made exact: near the reference
        return
    flat = torch.cat([score(x).reshape(-1) for x in layers])
    chosen = torch.from_numpy(np.argsort(flat.numpy(), kind="stable")[:k])
    owner = torch.cat([torch.full((e.numel,), i) for i, e in enumerate(entries)])
    expect = torch.bincount(owner[chosen], minlength=len(entries)).tolist()
    assert [got[e.name] for e in entries] == expect


@pytest.fixture(scope="module")
def calibrated_llama():
    model = load(ModelConfig(name="t", random=TINY["llama"], seed=1)).model
    layers = prunable_layers(model)
    g = torch.Generator().manual_seed(0)
    # channel norms that grow with depth, as real activations do: raw global scores are unfair
    st = {x.name: stats.LayerStats.from_norms(torch.rand(x.weight.shape[1], generator=g, dtype=torch.float64)
                                              * (1 + 5 * x.block)) for x in layers}
    return model, st


def pruned_masks(calibrated_llama, **cfg):
    _model, st = calibrated_llama
    m = load(ModelConfig(name="t", random=TINY["llama"], seed=1)).model
    layers = prunable_layers(m)
    result = prune(m, PruneConfig(**cfg), st, layers=layers, show_progress=False)
    return {x.name: x.weight == 0 for x in layers}, result


def test_global_scope_equals_global_budgets_with_the_layer_rule(calibrated_llama):
    """One exact threshold over layer-normalized Wanda scores, and the same threshold's
    budgets pruned layer by layer with the same scores: the same weights (normalizing by
    the layer's mean does not change the order inside a layer)."""
    a, ra = pruned_masks(calibrated_llama, scope="global", normalize="layer", sparsity=0.6)
    b, rb = pruned_masks(calibrated_llama, scope="layer", allocation="global", normalize="layer", sparsity=0.6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.target for r in ra.groups.layers] == [r.target for r in rb.groups.layers]
    raw, _ = pruned_masks(calibrated_llama, scope="global", normalize="none", sparsity=0.6)
    per_block = lambda masks, blk: np.mean([float(v.float().mean()) for k, v in masks.items()
                                            if f".{blk}." in k])
    # raw scores grow with depth: block 0 loses far more than block 1; normalized, far less so
    assert per_block(raw, 0) - per_block(raw, 1) > 2 * abs(per_block(a, 0) - per_block(a, 1))


@pytest.mark.parametrize("cfg", [dict(allocation="global", normalize="row"), dict(allocation="owl", owl_m=2.0),
                                 dict(allocation="uniform")])
def test_row_scope_prunes_each_layers_target_spread_over_rows(calibrated_llama, cfg):
    masks, result = pruned_masks(calibrated_llama, scope="row", sparsity=0.7, **cfg)
    n = sum(r.numel for r in result.groups.layers)
    assert result.pruned == sum(r.target for r in result.groups.layers) == target_count(0.7, n)
    for r in result.groups.layers:
        per_row = masks[r.name].sum(1)
        q, extra = divmod(r.target, per_row.numel())
        assert sorted(per_row.tolist()) == [q] * (per_row.numel() - extra) + [q + 1] * extra
    if cfg["allocation"] != "uniform":
        assert len({r.target / r.numel for r in result.groups.layers}) > 2  # not uniform
    summary = result.summary()
    assert summary["allocation"] == cfg["allocation"] and ("block_sparsity" in summary) == (cfg["allocation"] == "owl")


@pytest.mark.parametrize("allocation", ["owl", "global"])
def test_sparsegpt_prunes_each_layers_target(allocation):
    """SparseGPT under a non-uniform allocation: Wanda's scores of the dense model set the
    targets, the solve prunes exactly them."""
    model = load(ModelConfig(name="t", random=TINY["llama"], seed=2)).model
    windows = lambda: torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    extra = {"owl_m": 2.0} if allocation == "owl" else {"normalize": "row"}
    cfg = PruneConfig(method="sparsegpt", scope="row", sparsity=0.7, allocation=allocation, **extra)
    result = calibrate_and_prune(model, cfg, windows, "cpu", show_progress=False)
    layers = {x.name: x for x in prunable_layers(model)}
    assert result.pruned == target_count(0.7, result.numel)
    for r in result.groups.layers:
        assert int((layers[r.name].weight == 0).sum()) == r.pruned == r.target
    assert len({r.target / r.numel for r in result.groups.layers}) > 2
    with pytest.raises(ConfigError, match="needs targets"):  # the API cannot allocate from Hessians alone
        prune(model, cfg, {name: torch.eye(x.weight.shape[1]) for name, x in layers.items()})


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """The allocations on 1, 2 and 3 ranks (one thread per process, as torchrun gives)."""
    root = tmp_path_factory.mktemp("alloc")
    common = ["model.dtype=float32", "calib.nsamples=6", "calib.seqlen=32", "calib.batch_size=2", "prune.sparsity=0.7"]
    named = {f"global-{m}": [f"prune.method={m}", "prune.scope=row", "prune.allocation=global", "prune.normalize=row"]
             for m in ("magnitude", "wanda", "sparsegpt")}
    named |= {f"owl-{m}": [f"prune.method={m}", "prune.scope=layer", "prune.allocation=owl", "prune.owl_m=2",
                           "prune.owl_lambda=0.1"] for m in ("magnitude", "wanda", "sparsegpt")}
    named |= {f"scope-wanda-{n}": ["prune.method=wanda", "prune.scope=global", f"prune.normalize={n}"]
              for n in ("layer", "row")}
    env = {"OMP_NUM_THREADS": "1", "DISTPRUNE_CACHE": str(root / "cache")}
    for ranks in (1, 2, 3):
        out = root / f"ws{ranks}"
        p = launch(ranks, out, *jobs(out, named), *common, env=env, job=None, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    return root


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("job", ["global/magnitude", "global/wanda", "global/sparsegpt", "owl/magnitude",
                                 "owl/wanda", "owl/sparsegpt", "scope/wanda-layer", "scope/wanda-row"])
def test_same_targets_and_masks_on_1_2_3_ranks(ranked, ranks, job):
    ref, got = ranked / "ws1" / job.replace("/", "-"), ranked / f"ws{ranks}" / job.replace("/", "-")
    a, b = tensors(ref), tensors(got)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "distprune_report.json").read_text()) for d in (ref, got))
    assert rb["world_size"] == ranks and ra["layers"] == rb["layers"]
    assert ra["pruned_weights"] == target_count(0.7, ra["prunable_weights"])
    assert ra.get("block_sparsity") == rb.get("block_sparsity")
    assert (ref / "allocation.png").stat().st_size > 10000  # a picture for every non-uniform job


def test_sweep_summary_shows_allocation_keys_and_plots_against_owl_lambda(tmp_path):
    """An OWL grid and a uniform job in one sweep directory: the table has the allocation
    columns, the picture puts owl_lambda on the x axis and the uniform job as a level."""
    from distprune import summarize

    base = [sys.executable, "-m", "distprune", "-m", "model=tiny-llama", "prune.method=magnitude", "save=false",
            "prune.sparsity=0.6", "hydra.sweep.dir=sweep"]
    owl = ["prune.allocation=owl", "prune.owl_lambda=0.05,0.1", "prune.owl_m=2,3"]
    for args in (owl, ["prune.allocation=uniform"]):
        p = subprocess.run([*base, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    with open(tmp_path / "sweep" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert sorted((r["allocation"], r["owl_m"], r["owl_lambda"]) for r in rows)[0] == ("owl", "2.0", "0.05")
    assert [r["owl_m"] for r in rows if r["allocation"] == "uniform"] == [""]
    table = summarize.rows(tmp_path / "sweep")
    for r in table:  # the plot needs perplexities: give the rows some
        r["perplexity"], r["dense_perplexity"] = 10 + (r["owl_lambda"] or 0), 9.0
    assert summarize.x_axis(table) == "owl_lambda"
    _title, lines = summarize.series(table, "owl_lambda")
    assert sorted(label for label, _, _ in lines) == ["owl, M 2", "owl, M 3", "uniform"]
    assert lines["uniform", "uniform", "tiny-llama"] == [(None, 10)]
    summarize.plot(table, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10000
    assert not (tmp_path / "sweep" / "job0" / "allocation.png").exists()  # the uniform job: nothing swept
    assert (tmp_path / "sweep" / "prune.owl_lambda=0.05,prune.owl_m=2" / "allocation.png").is_file()

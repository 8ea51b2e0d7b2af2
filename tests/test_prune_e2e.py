"""End to end on tiny random models: prune, save, load back, generate, count zeros."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distprune import PruneConfig, prune
from distprune.checkpoint import REPORT
from distprune.cli import run
from distprune.layers import prunable_layers
from distprune.models import load
from distprune.select import target_count
from distprune.stats import LayerStats
from distprune.writer import write_checkpoint


def dense_and_pruned(cfg):
    report = run(cfg)
    dense = load(cfg.model).model
    pruned = AutoModelForCausalLM.from_pretrained(cfg.output_dir).eval()
    return report, dense, pruned


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scope", ["global", "layer", "row"])
def test_magnitude_scopes_exact_counts(tiny, arch, scope):
    raw = {"normalize": "none"} if scope == "global" else {}  # one threshold over the raw |w| of every layer
    cfg = tiny(arch=arch, method="magnitude", scope=scope, sparsity=0.3, **raw)
    report, dense, pruned = dense_and_pruned(cfg)
    names = [layer.name for layer in prunable_layers(dense)]
    dsd, psd = dense.state_dict(), pruned.state_dict()
    weights = {f"{n}.weight" for n in names}

    # every tensor that is not a prunable weight is bit-identical
    for key, value in dsd.items():
        if key not in weights:
            assert torch.equal(value, psd[key]), key

    # pruned weights only lose values, never change them; zeros are +0.0
    total = 0
    for layer in prunable_layers(pruned):
        w = layer.weight
        w_dense = dsd[f"{layer.name}.weight"]
        w_dense = w_dense.t() if layer.transposed else w_dense
        kept = w != 0
        assert torch.equal(w[kept], w_dense[kept])
        assert not torch.signbit(w[~kept]).any()
        zeros = int((~kept).sum())
        total += zeros
        target = next(r["target"] for r in report["layers"] if r["name"] == layer.name)
        assert zeros == target
        if scope != "global":  # uniform: the layer's exact share, rounded
            assert abs(target - 0.3 * w.numel()) < 1
        if scope == "row":  # (out, in): every output row loses its share of the layer's target, q or q + 1
            q = target // w.shape[0]
            assert (((~kept).sum(1) == q) | ((~kept).sum(1) == q + 1)).all()
        # the kept weights are the larger ones of the comparison group
        if scope in ("row", "layer") and kept.any() and (~kept).any():
            a = w_dense.abs()
            if scope == "row":
                dropped_max = a.masked_fill(kept, -1).max(1).values
                kept_min = a.masked_fill(~kept, float("inf")).min(1).values
                assert (dropped_max <= kept_min).all()
            else:
                assert a[~kept].max() <= a[kept].min()
    n = sum(layer.numel for layer in prunable_layers(dense))
    assert total == target_count(0.3, n)  # whatever the scope, the model loses exactly round(s * n)
    if scope == "global":
        # every dropped |w| <= threshold <= every kept |w|
        t = report["threshold"]
        for layer in prunable_layers(pruned):
            w = layer.weight
            w_dense = dsd[f"{layer.name}.weight"]
            w_dense = (w_dense.t() if layer.transposed else w_dense).abs()
            assert (w_dense[w == 0] <= t).all() and (w_dense[w != 0] >= t).all()
    assert report["pruned_weights"] == total
    assert report["prunable_weights"] == n
    assert set(report["seconds"]) >= {"load", "score+select", "mask", "save"}

    ids = torch.tensor([[1, 2, 3, 4]])
    out = pruned.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    on_disk = json.loads((Path(cfg.output_dir) / REPORT).read_text())
    assert on_disk["method"] == "magnitude" and on_disk["world_size"] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_global_selectors_identical_on_bf16(tiny, arch):
    """bf16 weights repeat values: radix and sort must prune exactly k, the same weights."""
    saved = {}
    for selector in ("radix", "sort"):
        cfg = tiny(arch=arch, method="magnitude", scope="global", sparsity=0.5, selector=selector,
                   normalize="none", output=f"out-{selector}")  # raw bf16 scores: one 16-bit radix pass
        cfg.model.dtype = "bfloat16"
        report = run(cfg)
        assert report["pruned_weights"] == target_count(0.5, report["prunable_weights"])
        assert report["dtype"] == "bfloat16"
        assert report["selector_passes"] == 1
        saved[selector] = load_file(Path(cfg.output_dir) / "model.safetensors")
    assert saved["radix"].keys() == saved["sort"].keys()
    assert all(torch.equal(saved["radix"][k], saved["sort"][k]) for k in saved["radix"])


def test_search_selector_is_close(tiny):
    cfg = tiny(method="magnitude", scope="global", sparsity=0.5, selector="search", search_tol=1e-3)
    report = run(cfg)
    assert abs(report["pruned_fraction"] - 0.5) <= 1e-3 + 1e-9
    assert report["selector_passes"] >= 2


def test_wanda_api_matches_brute_force(tiny):
    """Wanda row scope through the API equals a direct per-row sort of |W| * ||X||."""
    cfg = tiny(method="wanda", scope="row", sparsity=0.5)
    model = load(cfg.model).model
    layers = prunable_layers(model)
    g = torch.Generator().manual_seed(1)
    norms = {layer.name: torch.rand(layer.weight.shape[1], generator=g, dtype=torch.float64) for layer in layers}
    expected = {}
    for layer in layers:
        s = layer.weight.abs() * norms[layer.name].float()[None, :]
        order = s.argsort(dim=1, stable=True)[:, : target_count(0.5, s.shape[1])]
        expected[layer.name] = torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, True)
    result = prune(model, PruneConfig(method="wanda", scope="row", sparsity=0.5),
                   {name: LayerStats.from_norms(n) for name, n in norms.items()})
    for layer in layers:
        assert torch.equal(layer.weight == 0, expected[layer.name])
    assert result.pruned == sum(int(m.sum()) for m in expected.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D stores (in, out); groups run along inputs
@pytest.mark.parametrize("method, sparsity, m", [("wanda", 0.5, 4), ("magnitude", 0.75, 4), ("wanda", 0.5, 8)])
def test_nm_matches_brute_force(tiny, arch, method, sparsity, m):
    """N:M: of every m consecutive weights of a row, exactly n = sparsity * m go, the n
    lowest scores (ties by position), as a stable sort of each group finds them."""
    model = load(tiny(arch=arch).model).model
    layers = prunable_layers(model)
    g = torch.Generator().manual_seed(2)
    norms = {layer.name: torch.rand(layer.weight.shape[1], generator=g, dtype=torch.float64) for layer in layers}
    n = round(sparsity * m)
    expected = {}
    for layer in layers:
        w = layer.weight.float()
        s = (w.abs() * norms[layer.name].float()[None, :] if method == "wanda" else w.abs()).reshape(-1, m)
        order = s.argsort(dim=1, stable=True)[:, :n]
        expected[layer.name] = torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, True).view_as(w)
    cfg = PruneConfig(method=method, scope="nm", sparsity=sparsity, m=m)
    result = prune(model, cfg, {name: LayerStats.from_norms(n) for name, n in norms.items()} if method == "wanda"
                   else None)
    for layer in layers:
        zero = layer.weight == 0
        assert torch.equal(zero, expected[layer.name]), layer.name
        assert (zero.reshape(-1, m).sum(1) == n).all()
    assert result.pruned == result.numel * n // m
    assert result.summary()["scope"] == "nm" and result.summary()["m"] == m


def test_wanda_without_statistics_is_an_error(tiny):
    model = load(tiny().model).model
    with pytest.raises(ValueError, match="needs calibration statistics"):
        prune(model, PruneConfig())  # wanda is the default method


def test_include_exclude(tiny):
    cfg = tiny(include=["*mlp*"], exclude=["*down_proj"])
    report = run(cfg)
    names = [r["name"] for r in report["layers"]]
    assert names and all("mlp" in n and "down_proj" not in n for n in names)


def test_sparsity_zero_changes_nothing(tiny):
    cfg = tiny(scope="global", sparsity=0.0)
    report, dense, pruned = dense_and_pruned(cfg)
    assert report["pruned_weights"] == 0
    for key, value in dense.state_dict().items():
        assert torch.equal(value, pruned.state_dict()[key])


def test_sharded_save_loads(tiny):
    cfg = tiny(scope="layer")
    cfg.max_shard_size = "100KB"
    _, _, pruned = dense_and_pruned(cfg)
    assert (Path(cfg.output_dir) / "model.safetensors.index.json").is_file()
    assert sum(int((p == 0).sum()) for p in pruned.parameters()) > 0
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(cfg.output_dir).iterdir():  # readable as the umask says, like the JSON files
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_load_streamed_reads_only_what_is_wanted(tiny_checkpoint):
    """Unread parameters stay on the meta device; tied names get one tensor; a checkpoint
    whose tensor names the model renames on load (gpt_neox's embed_out, its lm_head) streams
    from the name on disk, and is written back under it."""
    from distprune.config import ModelConfig
    from distprune.models import load_streamed

    directory = tiny_checkpoint("gpt2")
    full = load(ModelConfig(path=str(directory))).model.state_dict()
    want = {"transformer.wte.weight", "transformer.h.1.mlp.c_fc.weight"}
    loaded, nbytes = load_streamed(ModelConfig(path=str(directory)), lambda model: want)
    model = loaded.model
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    state = model.state_dict()
    params = {k for k, p in model.named_parameters(remove_duplicate=False) if not p.is_meta}
    assert params == want | {"lm_head.weight"}
    for k in want:
        assert torch.equal(state[k], full[k])
    assert nbytes == sum(full[k].numel() * full[k].element_size() for k in want)
    neox = tiny_checkpoint("gpt_neox")
    renamed, _ = load_streamed(ModelConfig(path=str(neox)), lambda model: set(model.state_dict()))
    assert renamed.stream.stored["lm_head.weight"] == "embed_out.weight" and renamed.stream.converted
    full = load(ModelConfig(path=str(neox))).model.state_dict()
    assert all(torch.equal(t, full[k]) for k, t in renamed.model.state_dict().items())
    out = neox.parent / "neox-out"
    out.mkdir()
    write_checkpoint(out, renamed.model, None, "5GB")
    assert "embed_out.weight" in load_file(out / "model.safetensors")


def test_global_scores_are_normalized_per_row_unless_told(tiny):
    """normalize=auto: row under a global threshold (the setting that measured best), none
    where no global threshold is taken; an explicit value is kept."""
    assert PruneConfig(scope="global").normalization == "row"
    assert PruneConfig(scope="layer", allocation="global").normalization == "row"
    assert PruneConfig().normalization == "none"
    assert PruneConfig(scope="global", normalize="none").normalization == "none"
    raw = run(tiny(method="magnitude", scope="global", sparsity=0.5, normalize="none", output="raw"))
    auto = run(tiny(method="magnitude", scope="global", sparsity=0.5, output="auto"))
    assert (raw["normalize"], auto["normalize"]) == ("none", "row")
    assert raw["layers"] != auto["layers"] and raw["pruned_weights"] == auto["pruned_weights"]


def test_a_layer_pruned_past_95_percent_is_named_in_a_warning(tiny, caplog):
    run(tiny(method="magnitude", sparsity=0.96, output="high"))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "95% zero" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("14 layer(s) are more than 95% zero")
    assert "(the worst: model.layers." in warned[0]
    caplog.clear()
    run(tiny(method="magnitude", sparsity=0.9, output="fine"))
    assert not [r for r in caplog.records if "more than 95% zero" in r.getMessage()]

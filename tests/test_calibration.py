"""Calibration statistics, oneshot vs sequential, the statistics cache, data sources, perplexity."""

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import TINY, word_tokenizer
from safetensors.torch import load_file

from distprune import PruneConfig, prune, runner, stats
from distprune.api import calibrate_and_prune
from distprune.cli import run
from distprune.config import CalibConfig, ConfigError, EvalConfig, ModelConfig
from distprune.data import calibration_windows, random_windows, read_text, self_windows, sequential_windows
from distprune.layers import prunable_layers
from distprune.models import load
from distprune.perplexity import perplexity


def tiny_model(arch: str, seed: int = 0):
    return load(ModelConfig(random=dict(TINY[arch]), seed=seed)).model


def windows(n: int = 6, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def direct_stats(model, layers, ids) -> dict:
    """Reference: one full-model forward with hooks on every layer."""
    acc = {layer.name: [0.0, 0.0, 0] for layer in layers}

    def hook(name):
        def fn(_m, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            a = acc[name]
            a[0], a[1], a[2] = a[0] + (x * x).sum(0), a[1] + x.sum(0), a[2] + x.shape[0]
        return fn

    handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return acc


@pytest.mark.parametrize("arch", sorted(TINY))
def test_blockwise_stats_equal_full_forward(arch):
    model = tiny_model(arch)
    layers = prunable_layers(model)
    ids = windows()
    acc = stats.ChannelSums(layers)
    runner.collect(model, layers, ids, "cpu", acc, batch_size=4, show=False)
    got = acc.stats
    ref = direct_stats(model, layers, ids)
    for layer in layers:
        sumsq, total, count = ref[layer.name]
        assert got[layer.name].count == count == ids.numel()
        torch.testing.assert_close(got[layer.name].sumsq, sumsq, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(got[layer.name].sum, total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[layer.name].norm(), (sumsq / count).sqrt(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequential_differs_from_oneshot_only_after_block0(arch):
    cfg_seq = PruneConfig(method="wanda", scope="row", sparsity=0.5, mode="sequential")
    cfg_one = PruneConfig(method="wanda", scope="row", sparsity=0.5, mode="oneshot")
    seq, one = tiny_model(arch), tiny_model(arch)
    captured = {}
    original = runner.collect

    def spy(model, layers, w, device, acc, mode="oneshot", *args, **kwargs):
        original(model, layers, w, device, acc, mode, *args, **kwargs)
        captured[mode] = acc.stats

    runner.collect = spy
    try:
        calibrate_and_prune(seq, cfg_seq, windows, "cpu", show_progress=False)
        calibrate_and_prune(one, cfg_one, windows, "cpu", show_progress=False)
    finally:
        runner.collect = original
    for layer_s, layer_o in zip(prunable_layers(seq), prunable_layers(one), strict=True):
        same_stats = torch.equal(captured["sequential"][layer_s.name].sumsq, captured["oneshot"][layer_o.name].sumsq)
        same_weights = torch.equal(layer_s.weight, layer_o.weight)
        if layer_s.block == 0:
            assert same_stats and same_weights, layer_s.name
        else:  # block 1 sees the outputs of a pruned block 0
            assert not same_stats, layer_s.name
    assert any(not torch.equal(a.weight, b.weight)
               for a, b in zip(prunable_layers(seq), prunable_layers(one), strict=True) if a.block == 1)


def test_wanda_uses_the_collected_norms():
    """calibrate_and_prune(oneshot) == prune() with norms computed directly."""
    a, b = tiny_model("llama"), tiny_model("llama")
    cfg = PruneConfig(method="wanda", scope="layer", sparsity=0.4, mode="oneshot")
    calibrate_and_prune(a, cfg, windows, "cpu", show_progress=False)
    layers = prunable_layers(b)
    ref = direct_stats(b, layers, windows())
    prune(b, cfg, {n: stats.LayerStats.from_norms((v[0] / v[2]).sqrt()) for n, v in ref.items()},
          show_progress=False)
    for la, lb in zip(prunable_layers(a), layers, strict=True):
        assert torch.equal(la.weight == 0, lb.weight == 0), la.name


def tiny_job(tiny, tmp_path, monkeypatch, **prune):
    monkeypatch.setenv("DISTPRUNE_CACHE", str(tmp_path / "cache"))
    cfg = tiny(**prune)
    cfg.calib = CalibConfig(source="self", nsamples=4, seqlen=16)
    cfg.overwrite = True
    return cfg


def test_stats_cache_hit_and_invalidation(tiny, tmp_path, monkeypatch):
    cfg = tiny_job(tiny, tmp_path, monkeypatch, method="wanda", scope="global", sparsity=0.5)
    first = run(cfg)
    assert first["mode"] == "oneshot" and first["stats_cache"] == "miss"
    cfg.prune.sparsity = 0.3  # another sparsity level reuses the statistics
    second = run(cfg)
    assert second["stats_cache"] == "hit"
    assert len(list((tmp_path / "cache" / "stats").glob("*.safetensors"))) == 1

    cfg.calib.seed = 1  # other calibration windows
    assert run(cfg)["stats_cache"] == "miss"
    cfg.model.seed = 5  # other weights
    assert run(cfg)["stats_cache"] == "miss"
    cfg.calib.batch_size = 1  # other batches: other rounding of the float64 sums
    assert run(cfg)["stats_cache"] == "miss"
    cfg.calib.cache = False
    assert run(cfg)["stats_cache"] == "off"
    assert len(list((tmp_path / "cache" / "stats").glob("*.safetensors"))) == 4


def test_cache_hit_gives_identical_pruning(tiny, tmp_path, monkeypatch):
    cfg = tiny_job(tiny, tmp_path, monkeypatch, method="wanda", scope="global", sparsity=0.5)
    a = run(cfg)
    b = run(cfg)
    assert (a["stats_cache"], b["stats_cache"]) == ("miss", "hit")
    assert a["threshold"] == b["threshold"] and a["layers"] == b["layers"]


def test_sequential_is_default_for_row_and_not_cached(tiny, tmp_path, monkeypatch):
    cfg = tiny_job(tiny, tmp_path, monkeypatch, method="wanda", scope="row")
    report = run(cfg)
    assert report["mode"] == "sequential" and report["stats_cache"] == "off"
    assert report["pruned_weights"] == sum(r["numel"] // 2 for r in report["layers"])
    assert "statistics" in report["seconds"]


def test_sampled_windows_are_cached_and_reused(tiny, tmp_path, monkeypatch):
    """calib=self samples once: a sequential job (no statistics cache) run again, or at another
    sparsity, reads the windows it sampled; other sampling settings sample again."""
    cfg = tiny_job(tiny, tmp_path, monkeypatch, method="wanda", scope="row")
    first = run(cfg)
    files = list((tmp_path / "cache" / "windows").glob("*.safetensors"))
    assert len(files) == 1
    from safetensors.torch import load_file

    sampled = load_file(files[0])["windows"]
    assert sampled.shape == (4, 16)
    from distprune.models import load

    expect = self_windows(load(cfg.model).model, 4, 16, cfg.calib.seed, show=False)
    assert torch.equal(sampled, expect)  # what calib=self samples
    from distprune import data

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    with monkeypatch.context() as m:
        m.setattr(data, "self_windows", no_sampling)
        cfg.prune.sparsity = 0.3
        run(cfg)
        cfg.prune.sparsity = 0.5
        assert run(cfg)["layers"] == first["layers"]  # the same windows, the same pruning
    cfg.calib.seed = 4
    run(cfg)
    assert len(list((tmp_path / "cache" / "windows").glob("*.safetensors"))) == 2
    cfg.calib.cache = False
    run(cfg)
    assert len(list((tmp_path / "cache" / "windows").glob("*.safetensors"))) == 2


def test_global_sequential_is_refused(tiny):
    cfg = tiny(method="wanda", scope="global", mode="sequential")
    with pytest.raises(ConfigError, match="global scope needs oneshot"):
        run(cfg)


# --- data sources ---------------------------------------------------------------------

def test_text_file_folder_and_errors(tmp_path):
    text = "alpha beta gamma delta " * 40
    tok = word_tokenizer(text)
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "1.txt").write_text(text)
    (tmp_path / "folder" / "2.txt").write_text(text)
    (tmp_path / "empty.txt").write_text("  \n")

    w = calibration_windows(str(tmp_path / "a.txt"), None, tok, nsamples=5, seqlen=8, seed=3)
    assert w.shape == (5, 8)
    assert torch.equal(w, calibration_windows(str(tmp_path / "a.txt"), None, tok, 5, 8, seed=3))
    assert not torch.equal(w, calibration_windows(str(tmp_path / "a.txt"), None, tok, 5, 8, seed=4))
    assert read_text(str(tmp_path / "folder"), "k").count("alpha") == 80

    with pytest.raises(ConfigError, match="holds no text"):
        read_text(str(tmp_path / "empty.txt"), "calib.source")
    with pytest.raises(ConfigError, match="too few for 100 windows of 8"):
        calibration_windows(str(tmp_path / "a.txt"), None, tok, nsamples=100, seqlen=8, seed=0)
    with pytest.raises(ConfigError, match=r"missing\.txt.* does not exist"):
        read_text(str(tmp_path / "missing.txt"), "calib.source")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match=r"without \.txt files"):
        read_text(str(tmp_path / "nothing"), "k")


def test_windows_shapes():
    tokens = torch.arange(100)
    assert random_windows(tokens, 3, 10, 0, "k").shape == (3, 10)
    w = sequential_windows(tokens, 30, None, "k")
    assert w.shape == (3, 30) and torch.equal(w[1], torch.arange(30, 60))
    assert sequential_windows(tokens, 30, 2, "k").shape == (2, 30)
    with pytest.raises(ConfigError, match="fewer than one window"):
        sequential_windows(tokens, 101, None, "k")


def test_self_source_is_reproducible():
    model = tiny_model("llama")
    a = self_windows(model, nsamples=3, seqlen=12, seed=7)
    b = self_windows(model, nsamples=3, seqlen=12, seed=7)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert (a[:, 0] == model.config.bos_token_id).all()
    assert not torch.equal(a, self_windows(model, nsamples=3, seqlen=12, seed=8))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt"])
def test_sampler_follows_the_model_like_generate(arch):
    """The KV-cached sampling loop sees the logits a full forward sees: with argmax as the
    pick it reproduces Hugging Face's greedy generate token for token."""
    from distprune.data import sample

    model = tiny_model(arch)
    prompt = torch.tensor([[0], [5], [17]])
    ours = sample(model, prompt, 12, pick=lambda p: p.argmax(-1, keepdim=True), show=False)
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                            min_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_inverse_cdf_draws_from_the_distribution():
    from distprune.data import inverse_cdf

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([inverse_cdf(probs, g) for _ in range(20000)], dim=1)  # (2, 20000)
    freq = torch.stack([torch.bincount(row, minlength=5) for row in draws]).double() / draws.shape[1]
    assert (freq[probs == 0] == 0).all()  # never a token of probability 0
    assert torch.allclose(freq, probs.double(), atol=0.015)


def test_preset_goes_through_datasets(monkeypatch):
    calls = {}

    def load_dataset(name, config=None, split=None, **kw):
        calls["args"] = (name, config, split)
        return {"text": ["first line", "second line"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert read_text("wikitext2", "calib.source") == "first line\n\nsecond line"
    assert calls["args"] == ("wikitext", "wikitext-2-raw-v1", "train")
    read_text("wikitext2", "eval.source", "eval")
    assert calls["args"][2] == "test"


def test_preset_unreachable_is_a_clear_error(monkeypatch):
    def load_dataset(*a, **kw):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ConfigError, match="not reachable"):
        read_text("c4", "calib.source")


def test_text_source_without_tokenizer_is_an_error():
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        calibration_windows("README.md", tiny_model("llama"), None, 1, 4, 0)


# --- perplexity -----------------------------------------------------------------------

def test_perplexity_matches_hf_loss():
    model = tiny_model("llama")
    ids = windows(5, 12)
    with torch.no_grad():
        losses = [model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss for i in range(5)]
    expected = math.exp(sum(float(x) for x in losses) / 5)  # equal token counts per window
    assert perplexity(model, ids, batch_size=2, show=False) == pytest.approx(expected, rel=1e-5)


def hf_perplexity(model_dir, text_file, seqlen: int, max_windows: int) -> float:
    """Reference: exp(mean HF loss) over the first non-overlapping windows of the text
    (every window has seqlen - 1 predicted tokens, so the mean of the losses is the mean
    over all tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(text_file.read_text(), add_special_tokens=False)["input_ids"]
    wins = torch.tensor(ids[: max_windows * seqlen]).view(max_windows, seqlen)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in wins]
    return math.exp(sum(losses) / len(losses))


def test_wanda_end_to_end_with_eval(tiny_checkpoint, tmp_path, corpus):
    """Dense and pruned perplexity in the report are those of the input model and of the
    written checkpoint, each computed independently from Hugging Face's loss."""
    valid, test = corpus / "wikitext-2" / "valid.txt", corpus / "wikitext-2" / "test.txt"
    ckpt = tiny_checkpoint(text=valid.read_text())
    from distprune.config import Config

    cfg = Config(model=ModelConfig(name="ckpt", path=str(ckpt)),
                 prune=PruneConfig(method="wanda", scope="row", sparsity=0.5),
                 calib=CalibConfig(source=str(valid), nsamples=4, seqlen=32),
                 eval=EvalConfig(source=str(test), seqlen=32, max_windows=8),
                 output_dir=str(tmp_path / "out"), device="cpu")
    report = run(cfg)
    assert report["perplexity"]["dense"] == pytest.approx(hf_perplexity(ckpt, test, 32, 8), rel=1e-4)
    assert report["perplexity"]["pruned"] == pytest.approx(hf_perplexity(tmp_path / "out", test, 32, 8), rel=1e-4)
    assert report["perplexity"]["pruned"] != pytest.approx(report["perplexity"]["dense"], rel=1e-3)
    assert report["mode"] == "sequential"
    assert set(report["seconds"]) >= {"load", "eval_dense", "statistics", "score+select", "mask", "eval", "save"}


def test_sweep_computes_oneshot_statistics_once(tmp_path):
    env = dict(os.environ, DISTPRUNE_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "distprune", "-m", "model=tiny-llama", "calib.nsamples=4",
                        "calib.seqlen=32", "prune.scope=global", "prune.sparsity=0.7,0.5,0.3"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("cache miss") == 1 and p.stderr.count("cache hit") == 2
    sweep_dir = tmp_path / "sweeps" / "tiny-llama"
    reports = [json.loads(r.read_text()) for r in sorted(sweep_dir.glob("*/distprune_report.json"))]
    assert [r["target_sparsity"] for r in reports] == [0.3, 0.5, 0.7]
    # the model is loaded once; each later job starts again from the dense weights
    assert [r["model_reused"] for r in reports] == [True, True, False]  # sorted by sparsity; 0.7 ran first
    alone = subprocess.run([sys.executable, "-m", "distprune", "model=tiny-llama", "calib.nsamples=4",
                            "calib.seqlen=32", "prune.scope=global", "prune.sparsity=0.3", "output_dir=alone"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    swept = load_file(next(sweep_dir.glob("*0.3")) / "model.safetensors")  # ran after 0.7
    single = load_file(tmp_path / "alone" / "model.safetensors")
    assert swept.keys() == single.keys() and all(torch.equal(swept[k], single[k]) for k in swept)


def test_eval_entry_on_any_checkpoint(tiny_checkpoint, tmp_path, corpus):
    valid, test = corpus / "wikitext-2" / "valid.txt", corpus / "wikitext-2" / "test.txt"
    ckpt = tiny_checkpoint(text=valid.read_text())
    p = subprocess.run([sys.executable, "-m", "distprune.eval", "model=hf", f"model.path={ckpt}",
                        f"eval.source={test}", "eval.seqlen=32", "eval.max_windows=4"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["perplexity"] == pytest.approx(hf_perplexity(ckpt, test, 32, 4), rel=1e-4)
    assert result["max_windows"] == 4
    bad = subprocess.run([sys.executable, "-m", "distprune.eval", "model=hf", f"model.path={ckpt}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "eval.source is not set" in bad.stderr

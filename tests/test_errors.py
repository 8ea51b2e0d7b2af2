"""Bad input: a one-line error that names the problem, non-zero exit, nothing written."""

import contextlib
import hashlib
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distprune import PruneConfig, prune
from distprune.cli import run
from distprune.config import ConfigError
from distprune.models import load
from distprune.select import NonFiniteScoreError

ROOT = Path(__file__).resolve().parent.parent


def in_process(*args, cwd, monkeypatch, model: str = "tiny-llama") -> tuple[int, str]:
    """``python -m distprune model=MODEL ARGS`` in this process, from ``cwd``: the same
    entry point as the command (Hydra, the checks, exit codes), without a new interpreter
    and its imports (seconds each). Returns (exit code, stderr)."""
    from distprune.cli import entry, main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["distprune", f"model={model}", "calib.nsamples=4", "calib.seqlen=32", *args])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    err, code = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err):
            entry(main)
    except SystemExit as e:
        code = e.code
    finally:  # main sets up logging to the redirected stderr: give the test run its own back
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, err.getvalue()


def cli(*args, cwd):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    small = ["calib.nsamples=4", "calib.seqlen=32"]
    return subprocess.run([sys.executable, "-m", "distprune", "model=tiny-llama", *small, *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["prune.sparsity=1.0"], "prune.sparsity=1.0 is outside [0, 1)"),
    (["device=gpu"], "device='gpu' is not one of auto, cpu, cuda, cuda:N"),  # before loading
    (["model.path=/some/model"], "model.path='/some/model' with model=tiny-llama, a random-weight preset: pass "
                                 "model=hf model.path=... for a checkpoint"),
    (["prune.method=obs"], "prune.method='obs' is not one of"),
    (["model=hf", "model.path=/no/such/model"], "model.path='/no/such/model' does not exist"),
    (["prune.sparsity=half"], "prune.sparsity"),  # Hydra's type check, before any model loads
    (["prune.sparsty=0.5"], "sparsty"),  # a typo in a key
    (["calib.source=/no/text.txt"], "calib.source='/no/text.txt' does not exist; give a text file or folder, "
                                    "or a preset: calib=self, calib=wikitext2-local"),
    (["calib=wikitext2-local"], "calib=wikitext2-local reads $DISTPRUNE_DATA/wikitext-2/valid.txt; set DISTPRUNE_DATA"),
    (["eval.source=/no/test.txt"], "eval.source='/no/test.txt' does not exist"),
    (["prune.sparsity=abc"], "Error merging override prune.sparsity=abc: Value 'abc' of type 'str' could not be "
                             "converted to Float"),
    (["prune=nope"], "Could not find 'prune/nope': options: alps, alps-2of4, magnitude, ria, sparsegpt, "
                     "sparsegpt-2of4, wanda"),
    (["prune=sparsegpt", "prune.scope=global"], "prune.method=sparsegpt does not support prune.scope=global"),
    (["prune=sparsegpt", "prune.percdamp=-0.1"], "prune.percdamp=-0.1 must be >= 0"),
    (["prune=sparsegpt", "prune.blocksize=0"], "prune.blocksize=0 must be at least 1"),
    (["prune=sparsegpt-2of4", "prune.blocksize=66"], "prune.blocksize=66 is not a multiple of prune.m=4"),
    (["prune=wanda", "prune.percdamp=0.1"], "prune.percdamp=0.1 has no effect with prune.method=wanda"),
    (["prune=sparsegpt", "prune.selector=sort"], "prune.selector=sort has no effect with prune.method=sparsegpt"),
    (["prune=ria", "prune.ria_a=-1"], "prune.ria_a=-1.0 must be >= 0"),
    (["prune.selector=search"], "prune.selector=search has no effect with prune.scope=row"),
    (["prune.scope=global", "prune.m=8"], "prune.m=8 has no effect with prune.scope=global"),
    (["prune.scope=global", "prune.search_tol=0.01"], "prune.search_tol=0.01 has no effect with prune.selector=radix"),
    (["calib.seqlen=2048"], "calib.seqlen=2048 is longer than the model's context of 1024 tokens "
                            "(max_position_embeddings)"),  # found after loading
    (["prune.scope=global", "prune.mode=sequential"], "global scope needs oneshot statistics"),
    (["calib.nsamples=0"], "calib.nsamples=0"),
    (["calib.moe=some"], "calib.moe='some' is not one of routed, weighted, all"),
    (["prune.allocation=owl", "prune.owl_lambda=-0.1"], "prune.owl_lambda=-0.1 is outside [0, 0.5]"),
    (["prune.allocation=owl", "prune.sparsity=0.05"], "prune.owl_lambda=0.08 is outside [0, 0.05]"),
    (["prune.allocation=owl", "prune.sparsity=0.95"], "prune.owl_lambda=0.08 is outside [0, 0.05]"),
    (["prune.allocation=owl", "prune.owl_m=0"], "prune.owl_m=0.0 must be > 0"),
    (["prune.normalize=mean"], "prune.normalize='mean' is not one of: auto, none, layer, row"),
    (["prune.allocation=best"], "prune.allocation='best' is not one of: uniform, owl, global"),
    (["prune=wanda-2of4", "prune.allocation=owl"], "prune.allocation=owl needs prune.scope=layer or row: N:M"),
    (["prune.scope=global", "prune.allocation=global"], "prune.allocation=global needs prune.scope=layer or row"),
    (["prune.normalize=layer"], "prune.normalize=layer has no effect with prune.scope=row and "
                                "prune.allocation=uniform"),
    (["prune.owl_m=3"], "prune.owl_m=3.0 has no effect with prune.allocation=uniform"),
    (["prune=sparsegpt", "prune.scope=global"], "use prune.allocation=global"),
    (["prune.scope=nm", "prune.sparsity=0.3"], "prune.sparsity=0.3 of prune.m=4 weights is not a whole number"),
    (["prune.scope=nm", "prune.m=3", "prune.sparsity=0.6666666666666666", "prune.method=magnitude"],
     "prune.m=3 does not divide the 64 inputs of model.layers.0.self_attn.q_proj"),  # found after loading
])
def test_cli_bad_input(tmp_path, monkeypatch, args, message):
    code, stderr = in_process(*args, f"output_dir={tmp_path / 'out'}", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 2, stderr
    last = stderr.strip().splitlines()[-1]  # the error is one line, the last
    assert message in last and ("ERROR" in last or "error:" in last)
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path) == []  # nothing written, not even a Hydra run directory


def test_cli_success_exit_zero(tmp_path):
    p = cli(f"output_dir={tmp_path / 'out'}", "prune.scope=global", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "score+select:" in p.stderr and "save:" in p.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("field, value, message", [
    ("scope", "block", "prune.scope='block' is not one of"),
    ("selector", "topk", "prune.selector='topk' is not one of"),
    ("sparsity", -0.1, "prune.sparsity=-0.1 is outside [0, 1)"),
])
def test_bad_prune_values(tiny, field, value, message):
    cfg = tiny()
    setattr(cfg.prune, field, value)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not Path(cfg.output_dir).exists()


def test_output_dir_is_a_file(tiny, tmp_path):
    cfg = tiny()
    Path(cfg.output_dir).write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run(cfg)
    assert Path(cfg.output_dir).read_text() == "x"


def test_non_empty_output_dir_needs_overwrite(tiny):
    cfg = tiny()
    out = Path(cfg.output_dir)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="overwrite=true"):
        run(cfg)
    assert (out / "keep.txt").read_text() == "x"
    cfg.overwrite = True
    run(cfg)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temporary directories left


def test_bad_model_paths(tiny, tmp_path):
    cfg = tiny()
    cfg.model.random = None
    (tmp_path / "empty").mkdir()
    (tmp_path / "w.bin").write_text("x")
    for path, message in [(tmp_path / "empty", "no config.json"), (tmp_path / "w.bin", "not a .gguf"),
                          ("no_such_dir/../x", "does not exist")]:
        cfg.model.path = str(path)
        with pytest.raises(ConfigError, match=message):
            run(cfg)


@pytest.mark.parametrize("make", ["bert-mlm", "t5", "no-weights"])
def test_not_a_causal_lm(tiny, tmp_path, make):
    from transformers import BertConfig, LlamaConfig, T5Config

    config = {
        "bert-mlm": BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               architectures=["BertForMaskedLM"]),
        "t5": T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64),
        "no-weights": LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    }[make]
    config.save_pretrained(tmp_path / make)
    cfg = tiny()
    cfg.model.random, cfg.model.path = None, str(tmp_path / make)
    message = "cannot be loaded" if make == "no-weights" else "not a causal language model"
    with pytest.raises(ConfigError, match=message) as e:
        run(cfg)
    assert "\n" not in str(e.value)
    assert not Path(cfg.output_dir).exists()


def digest(directory: Path) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.iterdir())}


def test_input_model_never_modified(tiny, tmp_path):
    src = tmp_path / "dense"
    load(tiny().model).model.save_pretrained(src)
    before = digest(src)
    cfg = tiny(scope="global")
    cfg.model.random, cfg.model.path = None, str(src)
    run(cfg)
    assert digest(src) == before
    cfg.output_dir, cfg.overwrite = str(src), True  # never replace the input, even when asked to
    with pytest.raises(ConfigError, match="would replace the input model"):
        run(cfg)
    assert digest(src) == before


@pytest.mark.parametrize("scope", ["global", "layer", "row"])
def test_nan_weight_names_the_layer(tiny, scope):
    model = load(tiny().model).model
    layer = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteScoreError, match=r"model\.layers\.1\.mlp\.up_proj"):
        prune(model, PruneConfig(method="magnitude", scope=scope, sparsity=0.5), show_progress=False)


def test_output_dir_inside_the_input_model(tiny, tmp_path):
    src = tmp_path / "dense"
    load(tiny().model).model.save_pretrained(src)
    before = digest(src)
    cfg = tiny()
    cfg.model.random, cfg.model.path = None, str(src)
    cfg.output_dir = str(src / "pruned")
    with pytest.raises(ConfigError, match="lies inside the input model's directory"):
        run(cfg)
    assert digest(src) == before


def cut(src: Path, dst: Path, size: int) -> None:
    with open(src, "rb") as a, open(dst, "wb") as b:
        b.write(a.read(size))


@pytest.mark.parametrize("keep", [4, 100, "half"])
def test_truncated_safetensors_is_named(tiny, tmp_path, keep):
    src = tmp_path / "dense"
    load(tiny().model).model.save_pretrained(src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    p = cli("model=hf", f"model.path={src}", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].endswith(
        {4: "shorter than a safetensors header", 100: "the file has 100",
         "half": f"the file has {len(data) // 2}"}[keep])
    assert f"model file '{weights}' is corrupt or incomplete" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_cut_gguf_is_named(tmp_path):
    import importlib.util

    from distprune.sources import BUILTIN

    spec = BUILTIN["smollm2-135m"]
    gguf = Path(importlib.util.find_spec(spec["package"]).submodule_search_locations[0]) / spec["file"]
    for size in (1 << 20, 50 << 20):
        cut(gguf, tmp_path / "cut.gguf", size)
        p = cli("model=hf", f"model.path={tmp_path / 'cut.gguf'}", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
        assert p.returncode == 2
        assert f"model file '{tmp_path / 'cut.gguf'}' is corrupt or incomplete" in p.stderr
        assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()


def test_nan_weight_before_calibration_is_named_and_never_cached(tiny, tmp_path, monkeypatch):
    """A NaN in q_proj makes every later statistic NaN: the error names q_proj (not the
    first layer whose statistics show it) and no statistics are cached."""
    monkeypatch.setenv("DISTPRUNE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "dense"
    model = load(tiny().model).model
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[2, 3] = float("nan")
    model.save_pretrained(src)
    for mode in ("oneshot", "sequential"):
        cfg = tiny(method="wanda", mode=mode)
        cfg.model.random, cfg.model.path = None, str(src)
        with pytest.raises(ConfigError, match=r"model tensor model\.layers\.0\.self_attn\.q_proj\.weight holds 1 "
                                              r"non-finite value \(NaN or Inf\)"):
            run(cfg)
    assert not (tmp_path / "cache").exists()


def test_non_finite_statistics_are_named_and_never_cached(tiny, tmp_path):
    """Activations that overflow (finite weights) stop calibration at the first layer
    whose inputs are non-finite, and nothing reaches the cache."""
    from distprune import stats
    from distprune.api import calibrate_and_prune
    from distprune.layers import prunable_layers

    model = load(tiny().model).model
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(3e38)  # norm output overflows float32
    cache = tmp_path / "stats.safetensors"
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteScoreError, match=r"calibration statistics at the input of layer "
                                                  r"model\.layers\.1\.mlp\.gate_proj"):
        calibrate_and_prune(model, PruneConfig(method="wanda", scope="row", mode="oneshot"), lambda: windows, "cpu",
                            prunable_layers(model), cache_file=cache, cache_fields={}, show_progress=False)
    assert not cache.exists()
    assert stats.load(cache, {"x": 64}, {}) is None


@pytest.mark.parametrize("key", ["eval.seqlen", "calib.seqlen"])
def test_windows_longer_than_the_context(tiny_checkpoint, tmp_path, key):
    ckpt = tiny_checkpoint("gpt2")  # n_positions 256
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat . " * 400)
    p = cli("model=hf", f"model.path={ckpt}", f"calib.source={text}", f"eval.source={text}", f"{key}=512",
            f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(
        f"{key}=512 is longer than the model's context of 256 tokens (n_positions); use {key}<=256")
    assert not (tmp_path / "out").exists()


def test_help_names_the_tool(tmp_path):
    p = subprocess.run([sys.executable, "-m", "distprune", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0
    assert p.stdout.startswith("distprune: prune a causal language model")
    assert "powered by Hydra" not in p.stdout
    assert ("prune: alps, alps-2of4, magnitude, ria, sparsegpt, sparsegpt-2of4, wanda, wanda-2of4, wanda-global, "
            "wanda-refit") in p.stdout


@pytest.mark.parametrize("gpus, device, ranks, message", [
    (0, "cuda", 1, "device=cuda: this torch"),
    (0, "cuda:0", 1, "sees no CUDA device; pass device=cpu"),
    (2, "cuda:2", 1, "device=cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
    (2, "cuda", 4, "4 ranks on this node but 2 GPU(s) (device=cuda)"),
    (2, "auto", 3, "3 ranks on this node but 2 GPU(s) (device=auto): launch at most one rank per GPU "
                   "(torchrun --nproc_per_node 2), or pass device=cpu"),
])
def test_device_errors_name_the_device_and_the_counts(monkeypatch, gpus, device, ranks, message):
    from distprune import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    with pytest.raises(ConfigError, match=re.escape(message)):
        dist.check_device(device)


@pytest.mark.parametrize("gpus, device, ranks", [(0, "cpu", 3), (0, "auto", 3), (2, "cuda", 2), (2, "cuda:1", 1),
                                                 (1, "cpu", 4)])
def test_devices_that_exist_pass(monkeypatch, gpus, device, ranks):
    from distprune import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    dist.check_device(device)


def test_a_path_without_model_hf_is_that_model_and_names_the_output():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from distprune.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=["model.path=/models/MyModel"]))
        default = OmegaConf.to_object(compose("config"))
    assert (cfg.model.name, cfg.model.path) == ("MyModel", "/models/MyModel")
    assert cfg.output_dir == "outputs/MyModel-wanda-row-0.5"
    assert default.model.name == "smollm2-135m" and default.output_dir == "outputs/smollm2-135m-wanda-row-0.5"


def test_a_hub_id_offline_is_one_line_without_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what an offline machine amounts to, wherever the test runs
    p = cli("model=hf", "model.path=nobody-here/no-such-model", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "the hub is not reachable from here: download it elsewhere" in p.stderr.strip().splitlines()[-1]
    assert "retry" not in p.stderr.lower() and len(p.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_reference_script_flags_get_one_line_with_their_keys(tmp_path):
    p = cli("--model", "meta-llama/Llama-2-7b-hf", "--sparsity_ratio", "0.5", cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert ("unknown option --model: distprune takes key=value settings (--model -> model=hf model.path=...; "
            "--sparsity_ratio -> prune.sparsity=...)") in p.stderr
    assert os.listdir(tmp_path) == []

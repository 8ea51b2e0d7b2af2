"""Bad input: a one-line error that names the problem, non-zero exit, nothing written."""

import hashlib
import os
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


def cli(*args, cwd):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    small = ["calib.nsamples=4", "calib.seqlen=32"]
    return subprocess.run([sys.executable, "-m", "distprune", "model=tiny-llama", *small, *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["prune.sparsity=1.0"], "prune.sparsity=1.0 is outside [0, 1)"),
    (["prune.method=obs"], "prune.method='obs' is not one of"),
    (["model=hf", "model.path=/no/such/model"], "model.path='/no/such/model' does not exist"),
    (["prune.sparsity=half"], "prune.sparsity"),  # Hydra's type check, before any model loads
    (["prune.sparsty=0.5"], "sparsty"),  # a typo in a key
    (["calib.source=/no/text.txt"], "calib.source='/no/text.txt' is neither a file, a folder nor a preset"),
    (["eval.source=/no/test.txt"], "eval.source='/no/test.txt' is neither"),
    (["prune.scope=global", "prune.mode=sequential"], "global scope needs oneshot statistics"),
    (["calib.nsamples=0"], "calib.nsamples=0"),
    (["prune.scope=nm", "prune.sparsity=0.3"], "prune.sparsity=0.3 of prune.m=4 weights is not a whole number"),
    (["prune.scope=nm", "prune.m=3", "prune.sparsity=0.6666666666666666", "prune.method=magnitude"],
     "prune.m=3 does not divide the 64 inputs of model.layers.0.self_attn.q_proj"),  # found after loading
])
def test_cli_bad_input(tmp_path, args, message):
    p = cli(*args, f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert p.returncode != 0
    assert message in p.stderr
    assert "Traceback" not in p.stderr
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

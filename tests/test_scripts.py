"""Every script under scripts/ runs, on tiny shapes, so that none can rot unseen (one
once called a function with an argument it no longer took, and its table hid the error)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, word_tokenizer

from distprune.config import ModelConfig
from distprune.models import load

ROOT = Path(__file__).resolve().parent.parent
SMOKED = {"bench_select.py", "bench_load.py", "bench_sample.py", "bench_solve.py", "results.py", "gpu_check.sh",
          "make_checkpoint.py", "upcycle_moe.py", "alps_layers.py", "rank_invariance.py", "reshape_check.py"}


def script(tmp_path, *args, env=None, timeout=600):
    cmd = ["bash"] if args[0].endswith(".sh") else [sys.executable]
    p = subprocess.run([*cmd, str(ROOT / "scripts" / args[0]), *args[1:]], cwd=tmp_path, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "| error:" not in p.stdout
    return p


def test_every_script_has_a_smoke_test():
    assert {p.name for p in (ROOT / "scripts").iterdir() if p.suffix in (".py", ".sh")} == SMOKED


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("scripts") / "tiny"
    load(ModelConfig(random=dict(TINY["llama"]))).model.save_pretrained(d)
    word_tokenizer((corpus / "wikitext-2" / "valid.txt").read_text()).save_pretrained(d)
    return d


def test_upcycle_moe_writes_a_mixtral_checkpoint(tmp_path, checkpoint):
    from transformers import AutoModelForCausalLM

    script(tmp_path, "upcycle_moe.py", str(tmp_path / "moe"), "--dense", str(checkpoint), "--experts", "3")
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 3
    assert (tmp_path / "moe" / "tokenizer.json").is_file()


def test_alps_layers(tmp_path, checkpoint, corpus):
    p = script(tmp_path, "alps_layers.py", "--model-path", str(checkpoint), "--blocks", "0,1", "--scope", "layer",
               "--sparsity", "0.5", "--reference", "--calib", str(corpus / "wikitext-2" / "valid.txt"), "--nsamples",
               "4", "--seqlen", "32")
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "proj" in line]
    assert len(rows) == 8 and p.stdout.count("| mean |") == 1  # 4 matrices of 2 blocks


def test_bench_select_every_axis(tmp_path):
    out = tmp_path / "B.md"
    small = ["--shapes", "smollm2-135m", "--blocks", "1", "--repeat", "1", "--write", str(out)]
    script(tmp_path, "bench_select.py", *small, "--scores", "magnitude")  # wanda: the workers axis below
    script(tmp_path, "bench_select.py", *small, "--scores", "magnitude", "--methods", "radix", "--world-sizes", "1,2")
    script(tmp_path, "bench_select.py", *small, "--scores", "wanda", "--methods", "radix", "--workers-axis", "1,2")
    text = out.read_text()
    assert text.count("<!-- end bench_select") == 3
    for method in ("sort", "global_unstructured", "search", "radix"):
        assert f"| magnitude | {method} | " in text
    assert "| magnitude | radix | 2 | " in text and "524,288 |" in text  # one bf16 histogram per pass
    assert "| per pass / copy |" in text and text.count("x |") >= 8  # every method against the copy floor


def test_bench_select_fails_on_a_broken_measurement(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_select.py"), "--shapes", "smollm2-135m",
                        "--blocks", "1", "--repeat", "1", "--scores", "magnitude", "--methods", "nosuch"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "1 measurement(s) failed" in p.stderr


def test_bench_load(tmp_path, checkpoint):
    out = tmp_path / "B.md"
    script(tmp_path, "bench_load.py", "--path", str(checkpoint), "--world-sizes", "2", "--repeat", "1",
           "--write", str(out))
    text = out.read_text()
    assert "| every rank, full | any |" in text and "| 2 ranks, streamed | 1 |" in text


@pytest.mark.parametrize("shape", ["llama-tiny", "mixtral-tiny"])
def test_make_checkpoint(tmp_path, shape):
    """Shard by shard into several files with an index: what from_pretrained loads, and
    what a streamed load reads (Mixtral: per-expert tensors, as released checkpoints)."""
    from distprune.models import load_streamed

    out = tmp_path / "ckpt"
    script(tmp_path, "make_checkpoint.py", str(out), "--shape", shape, "--layers", "3", "--shard-gb", "0.0001")
    assert len(list(out.glob("model-*.safetensors"))) > 3 and (out / "model.safetensors.index.json").is_file()
    full = load(ModelConfig(path=str(out))).model
    assert full.config.num_hidden_layers == 3 and next(full.parameters()).dtype == torch.bfloat16
    if shape.startswith("mixtral"):
        names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert "model.layers.2.block_sparse_moe.experts.3.w2.weight" in names
    streamed, _ = load_streamed(ModelConfig(path=str(out)), lambda m: set(m.state_dict()))
    ref = full.state_dict()
    got = streamed.model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_bench_sample(tmp_path, checkpoint):
    out = tmp_path / "B.md"
    script(tmp_path, "bench_sample.py", "--path", str(checkpoint), "--tokens", "2", "--nsamples", "2", "--busy", "1",
           "--write", str(out))
    text = out.read_text()
    for machine in ("quiet", "1 busy processes"):
        for sampler in ("generate", "distprune"):
            for wait in ("spin", "passive"):
                assert f"| {machine} | {sampler} | {wait} | " in text
    assert "| quiet | distprune | passive | " in text and " | 1.00 |" in text


def test_bench_solve(tmp_path):
    out = tmp_path / "B.md"
    script(tmp_path, "bench_solve.py", "--hidden", "128", "--intermediate", "320", "--blocks", "2", "--ranks", "1,2",
           "--nsamples", "2", "--seqlen", "16", "--nm", "--method", "sparsegpt,alps", "--write", str(out))
    text = out.read_text()
    assert "| sparsegpt | 1 | " in text and "| alps | 2 | " in text and text.count("| 0.5000 |") == 4 and "2:4" in text


def test_results(tmp_path, checkpoint, corpus):
    out = tmp_path / "R.md"
    out.write_text("# Results\n\n## Another section\n\nkept\n")
    script(tmp_path, "results.py", "--model-path", str(checkpoint), "--data", str(corpus), "--nsamples", "4",
           "--seqlen", "32", "--eval-seqlen", "32", "--max-windows", "4", "--write", str(out))
    text = out.read_text()
    assert "| dense | - |" in text and "| wanda, row, sequential, calib=self | 0.5000 |" in text
    assert text.startswith("# Results\n\n## Another section\n\nkept\n")  # other sections stay


def test_rank_invariance(tmp_path, checkpoint, corpus):
    p = script(tmp_path, "rank_invariance.py", str(checkpoint), "--ranks", "2", "model.dtype=bfloat16",
               "calib.nsamples=4", "calib.seqlen=32", env={"DISTPRUNE_DATA": str(corpus)})
    assert ("1 process vs 2 ranks: masks agree on 100.0000% of 86016 weights; largest kept-weight difference 0 "
            in p.stdout)


def test_gpu_check_smoke(tmp_path):
    """SMOKE=1: the GPU check's steps on the CPU at tiny shapes (no test suite inside)."""
    p = script(tmp_path, "gpu_check.sh", env={"SMOKE": "1", "OUT": str(tmp_path / "out")})
    assert "identical: True" in p.stdout and "seconds {" in p.stdout
    assert (tmp_path / "out" / "BENCHMARKS.md").is_file()
    assert (tmp_path / "out" / "e2e" / "distprune_report.json").is_file()
    assert "pruned 0.5 raised percdamp {}" in p.stdout  # sparsegpt 2:4 on the included blocks


def test_reshape_check_hashes_the_same_jobs_the_same(tmp_path):
    """Two runs of one commit give the same hashes (timings and paths left out), for a job
    in one process and one over 2 ranks."""
    jobs = ["magnitude-row", "magnitude-global-2r"]
    runs = [json.loads((script(tmp_path, "reshape_check.py", str(tmp_path / run), "--only", *jobs)
                        and tmp_path / run / "hashes.json").read_text()) for run in ("a", "b")]
    assert sorted(runs[0]) == sorted(jobs) and runs[0] == runs[1]
    assert {"config.json", "report"} <= set(runs[0]["magnitude-row"])

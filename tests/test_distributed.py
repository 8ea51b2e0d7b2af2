"""Several ranks (torchrun, gloo on CPU) give the same pruned model as one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distprune.models import partition

HERE = Path(__file__).resolve().parent
JOBS = ["prune.method=magnitude,wanda", "prune.scope=global,layer,row", "prune.mode=oneshot",
        "prune.selector=radix", "model.dtype=bfloat16", "calib.nsamples=6", "calib.seqlen=32"]


def launch(ranks: int, out: Path, *args: str, script: list[str] | None = None, env: dict | None = None,
           timeout: int = 300) -> subprocess.CompletedProcess:
    entry = script or ["-m", "distprune"]
    cmd = ([sys.executable, *entry] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            *entry])
    return subprocess.run([*cmd, *args, "model=tiny-llama", f"output_dir={out}/${{prune.method}}-${{prune.scope}}"],
                          cwd=out.parent, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One sweep (6 jobs) per world size; the statistics cache is shared, so every world
    size prunes wanda with the same statistics."""
    root = tmp_path_factory.mktemp("dist")
    env = {"DISTPRUNE_CACHE": str(root / "cache")}
    done = {}
    for ranks in (1, 2, 3):
        p = launch(ranks, root / f"ws{ranks}", "-m", *JOBS, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        done[ranks] = (root / f"ws{ranks}", p.stderr)
    return done


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("job", ["magnitude-global", "magnitude-layer", "magnitude-row",
                                 "wanda-global", "wanda-layer", "wanda-row"])
def test_bit_identical_to_one_process(runs, ranks, job):
    ref, got = tensors(runs[1][0] / job), tensors(runs[ranks][0] / job)
    assert ref.keys() == got.keys() and len(ref) > 10
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    a = json.loads((runs[1][0] / job / "distprune_report.json").read_text())
    b = json.loads((runs[ranks][0] / job / "distprune_report.json").read_text())
    assert b["world_size"] == ranks and a["world_size"] == 1
    assert a["layers"] == b["layers"] and a["threshold"] == b["threshold"]
    if job.startswith("wanda"):
        assert b["stats_cache"] == "hit"


@pytest.mark.parametrize("job", ["magnitude-global", "wanda-global"])
def test_selection_traffic_is_histograms_and_scalars(runs, job):
    """Global radix sends one 65,536-bin int64 histogram per pass (bf16 magnitude: 1 pass;
    float32 wanda: 2) and a few scalars: never the scores, whatever the model size."""
    report = json.loads((runs[2][0] / job / "distprune_report.json").read_text())
    histograms = report["selector_passes"] * 65536 * 8
    sent = report["selection_bytes_per_rank"]
    if job.startswith("wanda"):  # plus the statistics all-reduce of a cache miss: none here (hit)
        assert report["stats_cache"] == "hit"
    assert histograms <= sent < histograms + 1024


def test_only_rank0_logs(runs):
    stderr = runs[2][1]
    assert "rank 0 INFO: load:" in stderr and "rank 1 INFO" not in stderr


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_failing_rank_ends_all_ranks(tmp_path, mode):
    out = tmp_path / "run"
    out.mkdir()
    pidfile = tmp_path / "rank1.pid"
    env = {"DISTPRUNE_TEST_FAIL": mode, "DISTPRUNE_TEST_PIDFILE": str(pidfile)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "helpers" / "failing_rank.py"), "model=tiny-llama", "prune.method=magnitude",
           "prune.scope=layer", f"output_dir={out}/pruned"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if mode == "hang":  # a rank that stops answering is killed from outside
        while not pidfile.exists():
            assert proc.poll() is None and time.monotonic() - t0 < 120
            time.sleep(0.2)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120
    if mode == "raise":
        assert "rank 1 of 2 failed: RuntimeError: injected failure" in stderr
    assert "rank: 1" in stderr or "local_rank: 1" in stderr  # torchrun's summary names it too
    assert list(out.iterdir()) == []  # no output, not even a temporary directory


def test_partition_contiguous_and_balanced():
    from types import SimpleNamespace as L

    layers = [L(numel=n) for n in [16, 4, 4, 16, 48] * 6]
    for ranks in (1, 2, 3, 4, 7):
        parts = partition(layers, ranks)
        assert [x for p in parts for x in p] == layers and all(parts)
        sizes = [sum(x.numel for x in p) for p in parts]
        assert max(sizes) - min(sizes) <= 48 + 16  # within about one layer of equal


def test_bad_input_on_one_rank_ends_all(tmp_path):
    """A NaN weight in the last layer (rank 1's shard): the global histogram shows it on
    every rank, rank 1 names the layer, every rank exits non-zero, nothing is written."""
    from conftest import TINY

    from distprune.config import ModelConfig
    from distprune.models import load

    model = load(ModelConfig(random=dict(TINY["llama"]))).model
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    out = tmp_path / "run"
    out.mkdir()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "distprune", "model=hf", f"model.path={tmp_path / 'nan-model'}",
                        "prune.method=magnitude", "prune.scope=global", f"output_dir={out}/pruned"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode != 0
    assert "non-finite (NaN or Inf) importance scores in layer model.layers.1.mlp.down_proj" in p.stderr
    assert list(out.iterdir()) == []

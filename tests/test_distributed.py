"""Several ranks (torchrun, gloo on CPU) give the same pruned model as one process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ranks import jobs, why
from ranks import run as ranks_run
from safetensors.torch import load_file

from distprune.plan import partition

HERE = Path(__file__).resolve().parent
JOBS = ["prune.method=magnitude,wanda", "prune.scope=global,layer,row,nm", "prune.mode=oneshot",
        "prune.selector=radix", "model.dtype=bfloat16", "calib.nsamples=6", "calib.seqlen=32"]


def launch(ranks: int, out: Path, *args: str, script: list[str] | None = None, env: dict | None = None,
           timeout: int = 300, job: str | None = "${prune.method}-${prune.scope}") -> subprocess.CompletedProcess:
    """tiny-llama on ``ranks`` processes, its output in out/JOB (job=None: the arguments name
    it, ranks.jobs)."""
    entry = script or ["-m", "distprune"]
    cmd = ([sys.executable, *entry] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            *entry])
    named = [f"output_dir={out}/{job}"] if job is not None else []
    return ranks_run([*cmd, *args, "model=tiny-llama", *named], fresh=[out],
                     cwd=out.parent, timeout=timeout, env={**os.environ, **(env or {})})


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One sweep (8 jobs) per world size; the statistics cache is shared, so every world
    size prunes wanda with the same statistics."""
    root = tmp_path_factory.mktemp("dist")
    env = {"DISTPRUNE_CACHE": str(root / "cache")}
    done = {}
    for ranks in (1, 2, 3):
        p = launch(ranks, root / f"ws{ranks}", "-m", *JOBS, env=env)
        assert p.returncode == 0, why(p)
        done[ranks] = (root / f"ws{ranks}", p.stderr)
    return done


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("job", ["magnitude-global", "magnitude-layer", "magnitude-row", "magnitude-nm",
                                 "wanda-global", "wanda-layer", "wanda-row", "wanda-nm"])
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
    # the survivor names the rank that failed in one line, without the transport's traceback
    survivor = [line for line in stderr.splitlines() if "distprune rank 0 ERROR" in line]
    assert survivor == [survivor[0]] and survivor[0].endswith(
        "rank 0 of 2 stops: rank 1 failed: RuntimeError: injected failure while masking" if mode == "raise" else
        f"rank 0 of 2 stops: rank 1 died (its process {pidfile.read_text()} is gone: killed, or out of memory)"), stderr
    if mode == "hang":  # no frame of ours in any traceback, and no noise from the launcher's SIGTERM
        assert f'File "{HERE.parent / "distprune"}' not in stderr and "Exception ignored" not in stderr, stderr
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
        if ranks not in (2, 3, 4):
            continue
        # rank 0 credited with what it holds besides its layers (the embeddings and head it reads)
        lead = 150
        parts = partition(layers, ranks, lead)
        assert [x for p in parts for x in p] == layers and all(parts)
        sizes = [sum(x.numel for x in p) + lead * (r == 0) for r, p in enumerate(parts)]
        assert max(sizes) - min(sizes) <= 48 + 16


def test_bad_input_on_one_rank_ends_all(tmp_path):
    """A NaN weight in the last layer (rank 1's shard, the only rank that loads it): rank 1
    names the tensor before any work, every rank exits non-zero, nothing is written. (The
    selection's own check, NaN scores named through the global histogram, is tested in
    tests/test_errors.py: it guards the Python API, which loads nothing.)"""
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
    assert ("rank 1 ERROR: model tensor model.layers.1.mlp.down_proj.weight holds 1 non-finite value (NaN or Inf)"
            in p.stderr)
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def shard_runs(tmp_path_factory):
    """Magnitude, global scope, from a saved checkpoint: one process loads it in full,
    3 ranks each read only their own layers (rank 0 reads the never-pruned tensors when it
    saves them)."""
    from conftest import TINY

    from distprune.config import ModelConfig
    from distprune.models import load

    root = tmp_path_factory.mktemp("shard")
    archs = ("llama", "gpt2")  # gpt2: tied lm_head, Conv1D, biases
    ckpts = {arch: root / f"ckpt-{arch}" for arch in archs}
    for arch, ckpt in ckpts.items():
        load(ModelConfig(random=dict(TINY[arch]), dtype="bfloat16")).model.save_pretrained(ckpt)
    before = {arch: {f.name: f.read_bytes() for f in ckpt.iterdir()} for arch, ckpt in ckpts.items()}
    done = dict(ckpts)
    # one launch per rank count; the jobs alternate models, so that each loads its own (a
    # sweep reuses the last job's model when the next has the same)
    for ranks, saves in ((1, ("true",)), (3, ("true", "false"))):
        out = root / f"ws{ranks}"
        named = {f"{arch}-save{save}": [f"model.path={ckpts[arch]}", f"save={save}"]
                 for save in saves for arch in archs}
        cmd = ([sys.executable] if ranks == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)])
        p = ranks_run([*cmd, "-m", "distprune", *jobs(out, named), "model=hf", "prune.method=magnitude",
                       "prune.scope=global", f"model.stream={str(ranks > 1).lower()}"], fresh=[out], cwd=root,
                      timeout=300)
        assert p.returncode == 0, why(p)
        done |= {(arch, ranks, save): out / f"{arch}-save{save}" for save in saves for arch in archs}
    for arch, ckpt in ckpts.items():
        assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == before[arch]  # the input is never modified
    return done


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shard_load_reads_own_layers_and_saves_the_same_model(shard_runs, arch):
    one, three = shard_runs[arch, 1, "true"], shard_runs[arch, 3, "true"]
    ref, got = tensors(one), tensors(three)
    assert ref.keys() == got.keys() and len(ref) > 10
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    for name in ("config.json", "generation_config.json"):
        assert (one / name).read_text() == (three / name).read_text()
    a, b = (json.loads((d / "distprune_report.json").read_text()) for d in (one, three))
    assert a["load"] == {"mode": "full"} and b["load"]["mode"] == "streamed"
    assert a["layers"] == b["layers"] and a["dtype"] == b["dtype"] == "bfloat16"
    # no forward pass: each rank reads only the layers it prunes (bf16), each layer once
    for save in ("true", "false"):
        c = json.loads((shard_runs[arch, 3, save] / "distprune_report.json").read_text())
        assert sum(c["load"]["bytes_per_rank"]) == 2 * c["prunable_weights"]
        assert max(c["load"]["bytes_per_rank"]) < c["prunable_weights"]


def test_accelerate_launch(runs, tmp_path):
    """`accelerate launch --multi_gpu` starts torchrun underneath: on a CPU machine the ranks
    join with gloo and save what one process saves."""
    out = tmp_path / "acc"
    with socket.socket() as sock:  # a free port: port 0 makes torchrun's ranks wait forever
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                        "-m", "distprune", "model=tiny-llama", "model.dtype=bfloat16", "prune.method=magnitude",
                        "prune.scope=global", f"output_dir={out}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "distprune_report.json").read_text())["world_size"] == 2
    ref, got = tensors(runs[1][0] / "magnitude-global"), tensors(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """Wanda with statistics computed by every world size itself (its own cache): 7
    calibration windows in batches of 2, so the ranks hold 4+3 or 2+2+3 of them."""
    root = tmp_path_factory.mktemp("calib")
    done = {}
    for ranks in (1, 2, 3):
        out = root / f"ws{ranks}"
        p = launch(ranks, out, "-m", "prune.method=wanda", "prune.scope=row", "prune.mode=oneshot,sequential",
                   "model.dtype=float32", "calib.nsamples=7", "calib.seqlen=32", "calib.batch_size=2",
                   env={"DISTPRUNE_CACHE": str(root / f"cache{ranks}")}, job="${prune.mode}")
        assert p.returncode == 0, p.stderr[-3000:]
        done[ranks] = out, sorted((root / f"cache{ranks}" / "stats").glob("*.safetensors"))
    return done


@pytest.mark.parametrize("ranks", [2, 3])
def test_statistics_and_masks_do_not_depend_on_the_rank_count(calibrated, ranks):
    """Data-parallel statistics are bit-identical to one process (whole batches per rank,
    gathered and added in batch order), so wanda's pruned model is too, oneshot and
    sequential, without sharing a statistics cache."""
    (one, [ref_file]), (got, [got_file]) = calibrated[1], calibrated[ranks]
    assert ref_file.name == got_file.name  # the same cache key: the same settings
    ref_stats, got_stats = load_file(ref_file), load_file(got_file)
    assert ref_stats.keys() == got_stats.keys() and len(ref_stats) > 10
    for key in ref_stats:
        assert torch.equal(ref_stats[key], got_stats[key]), key
    for mode in ("oneshot", "sequential"):
        ref, pruned = tensors(one / mode), tensors(got / mode)
        assert ref.keys() == pruned.keys()
        for key in ref:
            assert torch.equal(ref[key], pruned[key]), (mode, key)
        report = json.loads((got / mode / "distprune_report.json").read_text())
        assert report["world_size"] == ranks and report["mode"] == mode


def test_batch_share_is_whole_batches_in_order():
    from types import SimpleNamespace

    from distprune.dist import batch_share

    for count, batch, ranks in [(7, 2, 3), (4, 4, 2), (10, 3, 4), (1, 8, 3), (16, 4, 4)]:
        shares = [batch_share(count, batch, SimpleNamespace(rank=r, world_size=ranks)) for r in range(ranks)]
        items = [i for s in shares for i in range(count)[s]]
        assert items == list(range(count))  # every item once, in rank order
        assert all(s.start % batch == 0 for s in shares if s.stop > s.start)  # cut at batch boundaries


def test_failing_rank_ends_a_sweep(tmp_path):
    """Hydra would go on to the next job after a failure; a rank must not (it would run the
    next job's collectives against the others' current ones): the first failure ends it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "helpers" / "failing_rank.py"), "-m", "model=tiny-llama", "prune.method=magnitude",
           "prune.scope=layer", "prune.sparsity=0.3,0.5,0.7"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "DISTPRUNE_TEST_FAIL": "raise"})
    assert p.returncode != 0
    assert p.stderr.count("rank 1 of 2 failed: RuntimeError: injected failure") == 1
    assert "#1 :" not in p.stderr  # no rank started a second job
    sweep_dir = tmp_path / "sweeps" / "tiny-llama"
    assert [f.name for f in sweep_dir.iterdir()] == ["multirun.yaml"]  # no job directory left behind


def test_launch_again_only_on_gloo_transport_failure(tmp_path):
    """tests/ranks.py: a launch that fails on gloo's transport runs once more (its output
    removed first); any other failure is returned as it is."""
    count = tmp_path / "count"
    script = ("import sys, pathlib; p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) if p.exists() else 0; "
              "p.write_text(str(n + 1)); (pathlib.Path(sys.argv[2]) / 'job').mkdir(parents=True); "
              "sys.exit(0 if n >= 1 else (print(sys.argv[3], file=sys.stderr) or 1))")
    out = tmp_path / "out"
    gloo = "RuntimeError: [third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"
    with pytest.warns(UserWarning, match="gloo transport failure, launching again once"):
        p = ranks_run([sys.executable, "-c", script, count, out, gloo, "torch.distributed.run"], fresh=[out])
    assert p.returncode == 0 and count.read_text() == "2"
    count.unlink()
    shutil.rmtree(out)
    p = ranks_run([sys.executable, "-c", script, count, out, "RuntimeError: injected", "torch.distributed.run"],
                  fresh=[out])
    assert p.returncode == 1 and count.read_text() == "1" and "injected" in why(p)

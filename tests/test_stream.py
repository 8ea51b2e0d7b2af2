"""Streamed models (stream.py): decoder blocks read from the checkpoint when a pass needs
them, block-wise evaluation, and the same results as a model loaded in full, on one process,
on several ranks, and over two torchrun agents (a two-node launch on one machine)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_text, word_tokenizer
from ranks import jobs
from ranks import run as ranks_run

from distprune.config import ModelConfig
from distprune.layers import decoder_blocks, outside_keys, prunable_layers
from distprune.models import load, load_streamed
from distprune.perplexity import blockwise_perplexity, perplexity

ARCHS = ["llama", "gpt2"]  # gpt2: Conv1D, biases, tied lm_head, learned positions


def checkpoint(root: Path, arch: str) -> Path:
    directory = root / f"ckpt-{arch}"
    if not directory.is_dir():
        load(ModelConfig(random=dict(TINY[arch]))).model.save_pretrained(directory)
        word_tokenizer(make_text(3, 3000)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt_neox", "gpt_neo", "opt", "gpt2"])
def test_blockwise_perplexity_equals_the_whole_model(arch):
    """The same batches through the same operations, only in another order: the same
    number to the last bit, for every architecture (the tail after the last block is the
    model's own forward)."""
    model = load(ModelConfig(random=dict(TINY[arch]))).model
    windows = torch.randint(0, 256, (7, 24), generator=torch.Generator().manual_seed(0))
    whole = perplexity(model, windows, 2, show=False)
    assert blockwise_perplexity(model, windows, 2, "cpu", show=False) == whole
    assert 1 < whole < 1e6


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_model_holds_only_what_it_keeps(tmp_path, arch):
    """Only the wanted tensors are read at load; a pass reads each block and drops it
    again; the perplexity is the in-memory model's."""
    directory = checkpoint(tmp_path, arch)
    full = load(ModelConfig(path=str(directory))).model
    name = prunable_layers(full)[-1].name + ".weight"
    loaded, nbytes = load_streamed(ModelConfig(path=str(directory)), lambda m: outside_keys(m) | {name})
    model = loaded.model

    def in_memory() -> set[str]:
        return {k for k, p in model.named_parameters(remove_duplicate=False) if not p.is_meta}

    kept = in_memory()
    assert name in kept and not any(k.startswith(f"{prefix}.") for k in kept - {name}
                                    for prefix in ("model.layers", "transformer.h"))
    state = full.state_dict()
    assert nbytes == sum(state[k].numel() * state[k].element_size() for k in outside_keys(model) | {name}
                         if not (arch == "gpt2" and k == "lm_head.weight"))  # tied: read once
    windows = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(1))
    assert (blockwise_perplexity(model, windows, 2, "cpu", loaded.stream, show=False)
            == perplexity(full, windows, 2, show=False))
    assert in_memory() == kept  # every block released again
    for b in decoder_blocks(model):
        assert any(p.is_meta for p in b.parameters())


def test_a_damaged_block_is_refused_when_a_pass_reads_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from distprune.errors import ConfigError

    directory = checkpoint(tmp_path, "llama")
    f = directory / "model.safetensors"
    t = load_file(f)
    t["model.layers.1.post_attention_layernorm.weight"][3] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    loaded, _ = load_streamed(ModelConfig(path=str(directory)), outside_keys)
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.post_attention_layernorm\.weight holds 1 non-finite"):
        blockwise_perplexity(loaded.model, torch.zeros(2, 8, dtype=torch.long), 2, "cpu", loaded.stream, show=False)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


JOBS = {f"{m}-row-{mode}": [f"prune.method={m}", "prune.scope=row", f"prune.mode={mode}"]
        for m in ("magnitude", "wanda", "sparsegpt") for mode in ("oneshot", "sequential")}
JOBS |= {f"{m}-global-oneshot": [f"prune.method={m}", "prune.scope=global", "prune.mode=oneshot"]
         for m in ("magnitude", "wanda")}
WAYS = {"full": (1, ["model.stream=false"]), "ws1": (1, []), "ws2": (2, [])}


def run(ranks: int, out: Path, text: Path, *args: str, nodes: int = 1) -> subprocess.CompletedProcess:
    """One sweep: one thread per process, as torchrun gives each rank, so that SparseGPT's
    float32 Hessian products sum in one order (tests/test_sparsegpt.py)."""
    if nodes > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=distprune-test"]
    elif ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    else:
        launcher = [sys.executable]
    cmd = [*launcher, "-m", "distprune", *args, "model=hf", "calib.source=random",
           "calib.nsamples=6", "calib.seqlen=16", "calib.batch_size=2", f"eval.source={text}", "eval.seqlen=16",
           "eval.max_windows=5", "eval.batch_size=2", "calib.cache=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nodes == 1:
        return ranks_run(cmd, fresh=[out], cwd=out.parent, timeout=600, env=env)
    agents = [subprocess.Popen(cmd, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env) for _ in range(nodes)]
    done = [a.communicate(timeout=600) for a in agents]
    bad = next((i for i, a in enumerate(agents) if a.returncode), None)
    return subprocess.CompletedProcess(cmd, agents[bad if bad is not None else 0].returncode,
                                       done[0][0], "\n".join(d[1] for d in done))


@pytest.fixture(scope="module")
def streamed_runs(tmp_path_factory):
    """Every job of every arch and way: one launch per rank count (the ways of one process,
    in memory and streamed, share a launch)."""
    root = tmp_path_factory.mktemp("stream")
    text = root / "eval.txt"
    text.write_text(make_text(4, 2000))
    ckpts = {arch: checkpoint(root, arch) for arch in ARCHS}
    before = {arch: {f.name: f.read_bytes() for f in ckpt.iterdir()} for arch, ckpt in ckpts.items()}
    for ranks in (1, 2):
        out = root / f"ranks{ranks}"
        named = {f"{arch}-{way}-{job}": [f"model.path={ckpts[arch]}", *extra, *settings]
                 for arch in ARCHS for way, (r, extra) in WAYS.items() if r == ranks
                 for job, settings in JOBS.items()}
        p = run(ranks, out, text, *jobs(out, named))
        assert p.returncode == 0, p.stderr[-3000:]
    for arch, ckpt in ckpts.items():
        assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == before[arch]  # the input is never modified
    done = {(arch, way): (lambda job, arch=arch, way=way, r=r: root / f"ranks{r}" / f"{arch}-{way}-{job}")
            for arch in ARCHS for way, (r, _) in WAYS.items()}
    return done, root, text


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("way", ["ws1", "ws2"])
def test_streamed_equals_the_model_in_memory(streamed_runs, arch, way):
    """Every method and mode: streamed on 1 and 2 ranks, the same checkpoint and the same
    dense and pruned perplexity as one process with the whole model in memory."""
    done, _, _ = streamed_runs
    for job in JOBS:
        ref, got = done[arch, "full"](job), done[arch, way](job)
        a, b = tensors(ref), tensors(got)
        assert a.keys() == b.keys() and len(a) > 10, job
        for k in a:
            assert torch.equal(a[k], b[k]), (job, k)
        ra, rb = (json.loads((d / "distprune_report.json").read_text()) for d in (ref, got))
        assert ra["perplexity"] == rb["perplexity"] and ra["perplexity"]["pruned"] != ra["perplexity"]["dense"], job
        assert ra["layers"] == rb["layers"], job
        assert ra["load"]["mode"] in ("full", "reused") and rb["load"]["mode"] in ("streamed", "reused"), job
    first = json.loads((done[arch, way](next(iter(JOBS))) / "distprune_report.json").read_text())
    assert first["load"]["mode"] == "streamed" and first["world_size"] == WAYS[way][0]
    if way == "ws2":  # each rank read its own layers and the tensors outside the blocks, not the model
        total = sum(t.numel() * t.element_size() for t in tensors(done[arch, "full"](next(iter(JOBS)))).values())
        assert max(first["load"]["bytes_per_rank"]) < 0.8 * total
        # and every tensor at most once over the ranks: rank 0 reads the embeddings and head, sends them
        assert sum(first["load"]["bytes_per_rank"]) <= total
        # in its passes (two evaluations) a rank received the others' blocks and read only the few
        # tensors no rank keeps (norms, biases): every rank reading every block was 2x the blocks
        passes = first["blocks"]
        assert min(passes["received_bytes_per_rank"]) > 0.2 * total
        assert sum(passes["read_bytes_per_rank"]) < 0.05 * total
    else:
        assert first["blocks"]["received_bytes_per_rank"] == [0]


def test_two_torchrun_agents_with_c10d_rendezvous(streamed_runs):
    """A two-node launch (two torchrun agents, --nnodes=2, c10d rendezvous) on one machine:
    the same checkpoints as one process."""
    done, root, text = streamed_runs
    out = root / "llama-nodes2"
    p = run(2, out, text, "-m", f"model.path={checkpoint(root, 'llama')}", "prune.method=wanda,sparsegpt",
            "prune.scope=row", "prune.mode=sequential", f"output_dir={out}/${{prune.method}}-row-sequential",
            nodes=2)
    assert p.returncode == 0, p.stderr[-3000:]
    for job in ("wanda-row-sequential", "sparsegpt-row-sequential"):
        a, b = tensors(done["llama", "full"](job)), tensors(out / job)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), job
        report = json.loads((out / job / "distprune_report.json").read_text())
        assert report["world_size"] == 2

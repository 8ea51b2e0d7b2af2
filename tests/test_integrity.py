"""No exit 0 with a wrong model (issue 28): a checkpoint that does not hold its config's model,
a damaged cache, an output location that cannot take the result, or a pattern with a typo
stops the job with one line and exit code 2 before any work, writes nothing and leaves the
input as it was; a damaged cache entry is a miss, recomputed to the same model."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, word_tokenizer
from safetensors.torch import load_file, save_file
from test_errors import in_process
from test_moe import family

from distprune.config import ModelConfig
from distprune.models import load


def tree_digest(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny bfloat16 Llama checkpoint with a word tokenizer."""
    d = tmp_path_factory.mktemp("base") / "llama"
    load(ModelConfig(random=dict(TINY["llama"]), dtype="bfloat16")).model.save_pretrained(d)
    word_tokenizer("the cat sat on the mat . " * 50).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mixtral") / "mixtral"
    load(family("mixtral")).model.save_pretrained(d)  # per-expert layout: experts.{e}.w1/w2/w3
    return d


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt_oss") / "gpt_oss"
    load(family("gpt_oss")).model.save_pretrained(d)
    return d


def variant(src: Path, dst: Path, tensors=None, config=None) -> Path:
    """A copy of the checkpoint src with its tensors (a dict, edited in place) and config
    edited."""
    shutil.copytree(src, dst)
    if tensors is not None:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def refused(ckpt: Path, tmp_path, monkeypatch, *args, message: str, stream: bool = True) -> str:
    """Run a magnitude job on ckpt: exit 2, the last line (the only error) names the
    problem, no traceback, no output, the checkpoint unchanged."""
    before = tree_digest(ckpt)
    out = tmp_path / "out"
    code, stderr = in_process("prune=magnitude", f"model.path={ckpt}", f"output_dir={out}",
                              f"model.stream={str(stream).lower()}", *args, cwd=tmp_path, monkeypatch=monkeypatch,
                              model="hf")
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if "ERROR" in line or "error:" in line]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in stderr and "MISSING" not in stderr  # nor transformers' loading table
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert tree_digest(ckpt) == before
    return errors[0]


def drop(key):
    return lambda t: t.pop(key)


def add(key, like):
    return lambda t: t.__setitem__(key, t[like].clone())


def nan_in(key):
    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[3] = float("nan")
    return edit


def layers(n):
    return lambda c: c.__setitem__("num_hidden_layers", n)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("name, tensors, config, message", [
    ("missing", drop("model.layers.1.mlp.down_proj.weight"), None,
     "1 model tensor(s) missing from it (model.layers.1.mlp.down_proj.weight)"),
    ("extra", add("model.layers.0.mlp.extra_proj.weight", "model.layers.0.mlp.up_proj.weight"), None,
     "1 checkpoint tensor(s) the model does not use (model.layers.0.mlp.extra_proj.weight)"),
    ("more-blocks-in-config", None, layers(3), "9 model tensor(s) missing from it (model.layers.2."),
    ("fewer-blocks-in-config", None, layers(1), "9 checkpoint tensor(s) the model does not use (model.layers.1."),
    ("shape", lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:10].clone()), None,
     "1 of another shape or dtype (model.norm.weight"),
    ("nan-in-a-norm", nan_in("model.layers.1.input_layernorm.weight"), None,
     "model tensor model.layers.1.input_layernorm.weight holds 1 non-finite value (NaN or Inf): the checkpoint "
     "is damaged"),
    ("nan-in-the-embedding", nan_in("model.embed_tokens.weight"), None,
     "model tensor model.embed_tokens.weight holds 1 non-finite value"),
])
def test_a_checkpoint_that_is_not_its_configs_model_is_refused(base, tmp_path, monkeypatch, stream, name, tensors,
                                                               config, message):
    """Streamed (checked from the headers before any weight is read) and loaded in full
    (from_pretrained's loading report): never a random-initialised or a dropped weight."""
    ckpt = variant(base, tmp_path / name, tensors, config)
    line = refused(ckpt, tmp_path, monkeypatch, message=message, stream=stream)
    if stream and name == "more-blocks-in-config":
        assert "config.json says 3 decoder blocks, the checkpoint holds 2" in line
    if stream and name == "fewer-blocks-in-config":
        assert "config.json says 1 decoder blocks, the checkpoint holds 2" in line


def test_a_float16_cast_that_overflows_is_named_as_the_cast(base, tmp_path, monkeypatch):
    def big(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].clone()
        t["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6  # fine in bfloat16, beyond float16's 65504
    ckpt = variant(base, tmp_path / "big", big)
    for stream in (True, False):
        refused(ckpt, tmp_path, monkeypatch, "model.dtype=float16", stream=stream,
                message="model tensor model.layers.0.mlp.up_proj.weight overflows float16: casting the checkpoint's "
                        "bfloat16 gives 1 non-finite value (NaN or Inf); the checkpoint is fine, the cast is not: "
                        "pass model.dtype=bfloat16")


def rename(old: str, new: str):
    def edit(t):
        for k in [k for k in t if old in k]:
            t[k.replace(old, new)] = t.pop(k)
    return edit


def stack_experts(t):
    for i in range(2):
        head = f"model.layers.{i}.block_sparse_moe.experts"
        w1 = [t.pop(f"{head}.{e}.w1.weight") for e in range(4)]
        w3 = [t.pop(f"{head}.{e}.w3.weight") for e in range(4)]
        t[f"{head}.w13"] = torch.stack([torch.cat([a, b]) for a, b in zip(w1, w3, strict=True)])
        t[f"{head}.w2"] = torch.stack([t.pop(f"{head}.{e}.w2.weight") for e in range(4)])


@pytest.mark.parametrize("name, tensors, message", [
    ("other-names", rename(".w1.", ".gate_proj."), "does not match its config: transformers' conversion fails: "
                                                   "1 model tensor(s) it cannot make from the checkpoint's (model."),
    ("stacked", stack_experts, "4 checkpoint tensor(s) the model does not use (model.layers.0.mlp.experts.w13"),
])
def test_experts_stored_in_a_layout_transformers_does_not_convert_are_refused(mixtral, tmp_path, monkeypatch, name,
                                                                            tensors, message):
    ckpt = variant(mixtral, tmp_path / name, tensors)
    refused(ckpt, tmp_path, monkeypatch, message=message)


def test_mxfp4_experts_without_a_quantization_config_are_refused(gpt_oss, tmp_path, monkeypatch):
    def quantized(t):
        for i in range(2):
            key = f"model.layers.{i}.mlp.experts.gate_up_proj"
            w = t.pop(key)
            t[f"{key}_blocks"] = torch.zeros(w.shape[0], w.shape[2], 2, 16, dtype=torch.uint8)
            t[f"{key}_scales"] = torch.zeros(w.shape[0], w.shape[2], 2, dtype=torch.uint8)
    ckpt = variant(gpt_oss, tmp_path / "mxfp4", quantized)
    line = refused(ckpt, tmp_path, monkeypatch, message="model.layers.0.mlp.experts.gate_up_proj")
    assert "MXFP4-quantized: config.json lacks its quantization_config" in line


def test_damaged_files_and_folders_are_named(base, tmp_path, monkeypatch):
    ckpt = variant(base, tmp_path / "config", config=None)
    (ckpt / "config.json").write_text('{"model_type": "llama", ')
    refused(ckpt, tmp_path, monkeypatch, message=f"model file '{ckpt / 'config.json'}' is corrupt: ")
    both = variant(base, tmp_path / "both")
    (both / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model.safetensors"}}))
    refused(both, tmp_path, monkeypatch, message=f"model.path='{both}' holds both model.safetensors and "
                                                 "model.safetensors.index.json: which is the model is ambiguous")
    sharded = tmp_path / "sharded"
    load(ModelConfig(random=dict(TINY["llama"]), dtype="bfloat16")).model.save_pretrained(sharded,
                                                                                         max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    refused(sharded, tmp_path, monkeypatch, message=f"model file '{shards[-1]}', named by "
                                                    "model.safetensors.index.json, is missing")


def test_a_pattern_that_matches_nothing_is_refused(base, tmp_path, monkeypatch):
    refused(base, tmp_path, monkeypatch, "prune.exclude=[*down_projj]",
            message="prune.exclude pattern(s) '*down_projj' match no weight of the model's decoder blocks (names look "
                    "like model.layers.0.self_attn.q_proj)")
    refused(base, tmp_path, monkeypatch, "prune.include=[*mlp*,*attn.x*]",
            message="prune.include pattern(s) '*attn.x*' match no weight")


def test_output_locations_that_cannot_take_the_result_are_refused_before_loading(tmp_path, monkeypatch):
    """/proc is a mount point and read-only; a checkpoint larger than the free space (a
    random model counted on the meta device: nothing is allocated) is refused up front."""
    for out, message in [("/proc", "output_dir='/proc' is a mount point"),
                         ("/proc/distprune-out", "output_dir='/proc/distprune-out': cannot write in '/proc'")]:
        code, stderr = in_process("prune=magnitude", f"output_dir={out}", cwd=tmp_path, monkeypatch=monkeypatch)
        assert code == 2 and message in stderr.strip().splitlines()[-1], stderr
        assert "load:" not in stderr  # before loading
    free = shutil.disk_usage(tmp_path).free
    vocab = free // (2 * 64 * 4) + 1  # embeddings and head alone, in float32, exceed it
    code, stderr = in_process("prune=magnitude", f"output_dir={tmp_path / 'out'}", f"model.random.vocab_size={vocab}",
                              cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 2 and "load:" not in stderr, stderr
    assert f"output_dir='{tmp_path / 'out'}': the checkpoint needs about " in stderr.strip().splitlines()[-1]
    assert f"GB and '{tmp_path}' has" in stderr
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_writing_is_one_line(tmp_path, monkeypatch):
    """The file system fills up between the check and the write (safetensors reports it in
    an error of its own): one line naming the file, exit 2, nothing left."""
    import distprune.writer as writer

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"x")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(writer, "save_file", full)
    out = tmp_path / "out"
    code, stderr = in_process("prune=magnitude", f"output_dir={out}", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert "cannot write " in stderr.strip().splitlines()[-1] and "model.safetensors: No space left on device (" \
        in stderr.strip().splitlines()[-1]
    assert os.listdir(tmp_path) == []


def test_out_of_memory_is_one_line_with_what_helps(tmp_path):
    """A real allocation failure: an 8 GiB embedding table under a 6 GiB address-space
    limit."""
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
            "sys.argv = ['distprune', *sys.argv[1:]]; runpy.run_module('distprune', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code, "model=tiny-llama", "model.random.vocab_size=33554432",
                        "prune=magnitude", "save=false", f"output_dir={tmp_path / 'out'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "out of memory while loading the model (" in last and "torchrun --nproc_per_node N" in last, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()


def test_an_interrupted_publish_is_repaired_never_deleted(tmp_path, monkeypatch):
    """A crash between the two renames of an overwrite: output_dir is missing and the
    previous result sits in .out.old-HOST-PID. The next run renames it back."""
    from distprune import checkpoint

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = out.with_name(f".out.old-{checkpoint.owner_token().rsplit('-', 1)[0]}-{dead.pid}")
    old.mkdir()
    (old / "model.safetensors").write_text("the previous result")
    code, stderr = in_process("prune=magnitude", f"output_dir={out}", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 2 and "is not empty; pass overwrite=true" in stderr, stderr  # it is a result again
    assert (out / "model.safetensors").read_text() == "the previous result" and not old.exists()
    assert "restored" in stderr


def cache_job(tiny, tmp_path, monkeypatch, output: str, **prune):
    """A wanda oneshot job on text sampled from the model (calib=self): both of its caches,
    the sampled windows and the statistics, are used."""
    from distprune.config import CalibConfig

    monkeypatch.setenv("DISTPRUNE_CACHE", str(tmp_path / "cache"))
    cfg = tiny(**{"method": "wanda", "scope": "global", "output": output, **prune})
    cfg.calib = CalibConfig(source="self", nsamples=4, seqlen=16)
    return cfg


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped bits":
        data[-9] ^= 0x5A  # inside the last tensor's bytes: the header still reads
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.parametrize("how", ["flipped bits", "truncated"])
def test_a_damaged_statistics_cache_is_recomputed_to_the_same_model(tiny, tmp_path, monkeypatch, caplog, how):
    from distprune.cli import run

    clean = run(cache_job(tiny, tmp_path, monkeypatch, "clean"))
    assert clean["stats_cache"] == "miss"
    [cached] = (tmp_path / "cache" / "stats").glob("*.safetensors")
    damage(cached, how)
    again = run(cache_job(tiny, tmp_path, monkeypatch, "again"))
    assert again["stats_cache"] == "miss"  # not a hit on damaged statistics
    assert f"cache: {cached} cannot be used (" in caplog.text and "computing it again" in caplog.text
    reason = "damaged: its checksum fails" if how == "flipped bits" else "unreadable"
    assert reason in caplog.text
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors"
                                                                       ).read_bytes()
    assert run(cache_job(tiny, tmp_path, monkeypatch, "third"))["stats_cache"] == "hit"  # replaced by a good one


def test_a_windows_cache_of_the_wrong_shape_is_resampled_to_the_same_model(tiny, tmp_path, monkeypatch, caplog):
    from distprune import cache
    from distprune.cli import run

    run(cache_job(tiny, tmp_path, monkeypatch, "clean", mode="sequential", allocation="global", scope="row"))
    [windows] = (tmp_path / "cache" / "windows").glob("*.safetensors")
    from safetensors import safe_open

    with safe_open(str(windows), "pt") as f:
        fields = json.loads(f.metadata()["distprune"])
    cache.write(windows, {"windows": torch.zeros(1, 16, dtype=torch.int64)}, fields)  # its key, another shape
    shutil.rmtree(tmp_path / "cache" / "stats")  # the statistics come from the windows again
    again = run(cache_job(tiny, tmp_path, monkeypatch, "again", mode="sequential", allocation="global", scope="row"))
    assert f"cache: {windows} cannot be used (it holds windows as (1, 16) torch.int64, not (4, 16)" in caplog.text
    assert again["stats_cache"] == "miss"
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors"
                                                                       ).read_bytes()


@pytest.mark.parametrize("problem", ["read-only", "full"])
def test_a_cache_that_cannot_be_written_is_a_warning(tiny, tmp_path, monkeypatch, caplog, problem):
    import distprune.writer as writer
    from distprune.cli import run

    cfg = cache_job(tiny, tmp_path, monkeypatch, "out")
    if problem == "read-only":
        monkeypatch.setenv("DISTPRUNE_CACHE", "/proc/distprune-cache")  # nothing can be made there
    else:  # the disk fills up while the statistics are written (safetensors says so in an error of its own)
        save = writer.save_file

        def full(tensors, path, metadata=None):
            if str(tmp_path / "cache") in str(path):
                raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
            save(tensors, path, metadata=metadata)

        monkeypatch.setattr(writer, "save_file", full)
    report = run(cfg)
    assert report["stats_cache"] == "miss" and (tmp_path / "out" / "model.safetensors").is_file()
    where = "/proc/distprune-cache/" if problem == "read-only" else str(tmp_path / "cache" / "stats")
    assert f"cache: cannot write {where}" in caplog.text
    assert problem == "read-only" or "(No space left on device); the job goes on without it" in caplog.text


def test_checks_that_need_no_weights_come_before_the_weights(base, tmp_path, monkeypatch):
    """A text source without a tokenizer, a text too short for the windows asked, windows
    longer than the context: one line before anything loads."""
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    text = tmp_path / "short.txt"
    text.write_text("the cat sat on the mat . " * 4)  # 28 words
    for ckpt, args, message in [
        (bare, ["prune=wanda", f"calib.source={text}"], "calib.source is text, which needs a tokenizer; this model "
                                                        "has none (use calib.source=self)"),
        (bare, [f"eval.source={text}", "eval.seqlen=16"], "eval.source is text, which needs a tokenizer; this model "
                                                           "has none"),
        (base, ["prune=wanda", f"calib.source={text}"], f"calib.source='{text}' has 28 tokens, too few for 4 windows "
                                                        "of 32"),
        (base, [f"eval.source={text}", "eval.seqlen=64"], f"eval.source='{text}' has 28 tokens, fewer than one "
                                                           "window of 64"),
        (base, ["prune=wanda", "calib.seqlen=300"], "calib.seqlen=300 is longer than the model's context of 256"),
    ]:
        code, stderr = in_process(f"model.path={ckpt}", f"output_dir={tmp_path / 'out'}", *args, cwd=tmp_path,
                                  monkeypatch=monkeypatch, model="hf")
        assert code == 2 and message in stderr.strip().splitlines()[-1], stderr
        assert "load:" not in stderr and "Traceback" not in stderr

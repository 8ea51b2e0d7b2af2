"""Mixtures of experts: fused expert tensors pruned as per-expert views, with the inputs
each expert sees, written back in the checkpoint's own layout, on every family."""

import json
import os
import subprocess
import sys

import pytest
import torch
from ranks import jobs
from ranks import run as ranks_run
from torch.overrides import TorchFunctionMode

from distprune import moe, runner, stats
from distprune.api import calibrate_and_prune
from distprune.api import prune as api_prune
from distprune.config import ConfigError, ModelConfig, PruneConfig
from distprune.layers import Coverage, prunable_layers
from distprune.models import load
from distprune.select import rows_mask
from distprune.writer import write_checkpoint

BASE = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=256)
FAMILIES = {
    "mixtral": dict(model_type="mixtral", intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, shared_expert_intermediate_size=48),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2),
    "olmoe": dict(model_type="olmoe", intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                  eos_token_id=1, pad_token_id=0),
    "gpt_oss": dict(model_type="gpt_oss", intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["full_attention", "sliding_attention"], sliding_window=16),
    "deepseek_v3": dict(model_type="deepseek_v3", intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1,
                        num_key_value_heads=4),
}


def family(name: str, dtype: str = "float32") -> ModelConfig:
    return ModelConfig(name=f"tiny-{name}", random={**BASE, **FAMILIES[name]}, seed=0, dtype=dtype)


def windows(n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", FAMILIES)
def test_expert_views_tile_every_fused_tensor_and_routers_stay_out(name):
    model = load(family(name)).model
    cov = Coverage()
    layers = prunable_layers(model, coverage=cov)
    assert cov.as_dict()["model"] == sum(p.numel() for p in model.parameters())  # every parameter counted
    experts = [layer for layer in layers if layer.expert is not None]
    assert experts and cov.expert == sum(layer.numel for layer in experts)
    fused = {id(layer.tensor): layer.tensor for layer in experts}
    with torch.no_grad():
        for t in fused.values():
            t.zero_()
        for i, layer in enumerate(experts):  # each view gets its own value; together they cover each tensor once
            layer.weight.add_(i + 1)
    for layer in experts:
        assert bool((layer.weight == experts.index(layer) + 1).all())
        out, inp = layer.weight.shape
        module = layer.module
        hidden = model.config.hidden_size
        assert (out, inp) == ((hidden, module.down_proj.shape[1 if module.is_transposed else 2])
                              if layer.name.endswith("down_proj") else (layer.weight.shape[0], hidden))
    assert all(bool((t != 0).all()) for t in fused.values())
    names = {layer.name for layer in layers}
    assert not any(n.endswith((".gate", ".router", "shared_expert_gate")) for n in names)
    assert cov.router > 0


class ExpertInputs(TorchFunctionMode):
    """The inputs transformers' own eager experts forward gives each expert's matrices:
    every linear / matmul whose weight is a slice of a fused experts tensor."""

    def __init__(self, fused: dict[int, str]) -> None:
        super().__init__()
        self.fused, self.seen, self.weights, self.routing = fused, {}, {}, None

    def route(self, _module, args) -> None:
        """Forward pre-hook of an experts module: the routing of the call that follows."""
        self.routing = (args[1], args[2])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("linear", "matmul", "__matmul__"):
            w = args[1]
            base = w._base if w._base is not None else w
            if id(base) in self.fused:
                e = w.storage_offset() // base[0].numel()
                self.seen.setdefault((self.fused[id(base)], e), []).append(args[0].detach().double())
                index, weights = self.routing  # eager order: torch.where over (top_k position, token)
                pos, tok = torch.where((index == e).T)
                self.weights.setdefault((self.fused[id(base)], e), []).append(weights[tok, pos, None].double())
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "qwen2_moe"])
@pytest.mark.parametrize("policy", ["routed", "weighted", "all"])
def test_expert_statistics_are_the_inputs_each_expert_sees(name, policy):
    """Routed: an expert's gate/up statistics are those of the tokens transformers routes to
    it, its down's those of act(gate) * up of them (GPT-OSS: clamped, interleaved, biased).
    All: every token, through every expert."""
    model = load(family(name)).model.eval()
    model.config._experts_implementation = "eager"
    layers = prunable_layers(model)
    acc = stats.ChannelSums(layers)
    runner.collect(model, layers, windows(), "cpu", acc, batch_size=4, show=False, moe_policy=policy)
    experts = [layer for layer in layers if layer.expert is not None]
    params = {id(layer.tensor): layer.key for layer in experts}
    mode = ExpertInputs(params)
    for module in {layer.module for layer in experts}:
        module.register_forward_pre_hook(mode.route)
    with mode, torch.no_grad():
        for batch in windows().split(4):  # the batches collect runs: routing near a tie is the same
            model(batch)
    tokens = windows().numel()
    for layer in experts:
        st = acc.stats[layer.name]
        if policy == "all":
            assert st.count == tokens
            continue
        seen = mode.seen.get((layer.key, layer.expert), [])
        x = torch.cat(seen) if seen else torch.zeros(0, layer.weight.shape[1], dtype=torch.float64)
        if policy == "weighted":  # each token scaled by the routing weight transformers gives it
            r = torch.cat(mode.weights.get((layer.key, layer.expert), [])) if seen else torch.zeros(0, 1)
            x = x * r
        assert st.count == x.shape[0]
        torch.testing.assert_close(st.sumsq, (x * x).sum(0), rtol=1e-5, atol=1e-6)
    routed = sum(acc.stats[layer.name].count for layer in experts if layer.name.endswith("down_proj"))
    if policy == "routed":  # every token reaches top_k experts of each MoE block
        blocks = len({layer.block for layer in experts})
        assert routed == tokens * model.config.num_experts_per_tok * blocks


def _run(name: str, prune: dict, policy: str = "routed", dtype: str = "float32"):
    loaded = load(family(name, dtype))
    cfg = PruneConfig(**prune)
    if cfg.method == "magnitude":
        return loaded, api_prune(loaded.model, cfg, show_progress=False)
    result = calibrate_and_prune(loaded.model, cfg, windows, "cpu", batch_size=4, show_progress=False,
                                 moe_policy=policy)
    return loaded, result


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_prunes_every_expert_saves_in_its_layout_and_reloads(tmp_path, name):
    from transformers import AutoModelForCausalLM

    loaded, result = _run(name, dict(method="wanda", scope="row", sparsity=0.5))
    model = loaded.model
    routers = {n: p.clone() for n, p in model.named_parameters() if n.endswith((".gate.weight", "router.weight"))}
    experts = [layer for layer in prunable_layers(model) if layer.expert is not None]
    for layer in experts:  # each row of every expert matrix at 50%
        rows = (layer.weight == 0).sum(1)
        assert bool((rows == layer.weight.shape[1] // 2).all()), layer.name
    kinds = result.weight_kinds()
    assert kinds["expert_weights"]["sparsity"] == 0.5 and kinds["other_weights"]["sparsity"] == 0.5
    write_checkpoint(tmp_path, model, None, "5GB")
    saved = set(json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:8], "little")]).keys()) - {"__metadata__"}
    if name == "mixtral":  # the original per-expert layout that from_pretrained converts
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in saved
    elif name != "gpt_oss":
        assert any(".experts.3.gate_proj.weight" in k for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, model.get_parameter(n)), n
    for n, p in routers.items():
        assert torch.equal(reloaded.get_parameter(n), p)  # routers dense and untouched
    with torch.no_grad():
        assert torch.equal(reloaded(windows(2)).logits, model(windows(2)).logits)


@pytest.mark.parametrize("name", FAMILIES)
def test_sparsegpt_2of4_inside_every_expert(name):
    loaded, _ = _run(name, dict(method="sparsegpt", scope="nm", sparsity=0.5, m=4))
    for layer in prunable_layers(loaded.model):
        groups = (layer.weight.reshape(-1, 4) == 0).sum(1)
        assert bool((groups == 2).all()), layer.name
        assert bool(torch.isfinite(layer.weight).all())


def _starve(model):
    """Route every token to experts 0 and 1: experts 2 and 3 see none."""
    for block in model.model.layers:
        gate = block.mlp.gate

        def fixed(h, gate=gate):
            logits, scores, index = type(gate).forward(gate, h)
            return logits, torch.full_like(scores, 0.5), torch.tensor([0, 1]).expand_as(index)

        gate.forward = fixed
    return model


@pytest.mark.parametrize("prune", [
    dict(method="wanda", scope="layer"),
    dict(method="wanda", scope="global", normalize="row"),
    dict(method="magnitude", scope="global"),
    dict(method="wanda", scope="row", allocation="owl", sparsity=0.6, owl_lambda=0.1),
    dict(method="wanda", scope="row", allocation="global", normalize="row"),
    dict(method="sparsegpt", scope="row", allocation="owl", sparsity=0.6, owl_lambda=0.1),
    dict(method="ria", scope="nm", m=8),
], ids=lambda p: "-".join(str(v) for v in p.values()))
def test_every_scope_and_allocation_counts_experts_as_layers(prune):
    """Experts are layers to every scope and allocation: the model loses exactly
    round(s * n) weights (N:M: its share of every group), the experts among them."""
    loaded, result = _run("mixtral", {"sparsity": 0.5, **prune})
    layers = prunable_layers(loaded.model)
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    n = sum(layer.numel for layer in layers)
    assert zeros == round(prune.get("sparsity", 0.5) * n)
    kinds = result.weight_kinds()
    assert kinds["expert_weights"]["zeros"] > 0 and kinds["expert_weights"]["matrices"] == 24
    if prune.get("allocation") == "owl":  # OWL's block sparsities differ; every expert of a block gets its own
        assert len({round(r.target / r.numel, 3) for r in result.groups.layers}) > 1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_an_expert_without_tokens_is_pruned_by_magnitude(method):
    """calib.moe=routed: an expert no token reaches is pruned by magnitude (its kept weights
    unchanged), reported, and never NaN."""
    model = _starve(load(family("mixtral")).model)
    dense = {layer.name: layer.weight.clone() for layer in prunable_layers(model)}
    cfg = PruneConfig(method=method, scope="row", sparsity=0.5)
    result = calibrate_and_prune(model, cfg, windows, "cpu", batch_size=4, show_progress=False)
    empty = sorted(n for n, c in result.tokens.items() if c == 0)
    assert empty == sorted(f"model.layers.{b}.mlp.experts.{e}.{m}" for b in (0, 1) for e in (2, 3)
                           for m in moe.MATRICES)
    assert sorted(result.weight_kinds()["expert_weights"]["without_tokens"]) == empty
    for layer in prunable_layers(model):
        assert bool(torch.isfinite(layer.weight).all())
        if layer.name in empty:
            w = dense[layer.name]
            expect = rows_mask(w.abs().float().contiguous(), w.numel() // 2)
            assert torch.equal(layer.weight == 0, expect)
            assert torch.equal(layer.weight[~expect], w[~expect])


def test_calib_moe_all_sends_every_token_to_every_expert():
    model = _starve(load(family("mixtral")).model)
    result = calibrate_and_prune(model, PruneConfig(method="wanda"), windows, "cpu", batch_size=4,
                                 show_progress=False, moe_policy="all")
    assert set(result.tokens.values()) == {windows().numel()}
    assert result.weight_kinds()["expert_weights"]["without_tokens"] == []


def test_a_weight_distprune_cannot_prune_is_an_error_naming_it():
    model = load(family("mixtral")).model
    model.model.layers[1].mlp.extra = torch.nn.Parameter(torch.ones(2, 3, 4))
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.extra \(shape \(2, 3, 4\)\).*prune\.exclude="
                                          r"\[\"model\.layers\.\*\.mlp\.extra\"\]"):
        prunable_layers(model)
    cov = Coverage()
    layers = prunable_layers(model, exclude=["model.layers.*.mlp.extra"], coverage=cov)
    assert cov.excluded == 24 and sum(layer.expert is not None for layer in layers) == 24
    model.model.layers[0].table = torch.nn.Embedding(10, 4)  # an embedding inside a block: never pruned
    cov = Coverage()
    prunable_layers(model, exclude=["model.layers.*.mlp.extra"], coverage=cov)
    assert cov.embedding == 40 and cov.as_dict()["model"] == sum(p.numel() for p in model.parameters())


def test_an_experts_layout_distprune_does_not_know_exits_2_with_one_line(tmp_path):
    """NemotronH's experts have no gate (up_proj and down_proj only): never a silent skip."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("nemotron_h", vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                  layers_block_type=["moe", "attention"], num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, n_group=1,
                                  topk_group=1, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "nemotron")
    proc = subprocess.run([sys.executable, "-m", "distprune", "model=hf", f"model.path={tmp_path / 'nemotron'}",
                           "prune=magnitude", f"output_dir={tmp_path / 'out'}", "device=cpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "model.layers.0.mixer.experts.up_proj (shape (4, 16, 32))" in lines[0], proc.stderr
    # every weight it cannot prune, in the one message (JetMoE once needed four runs to collect them)
    assert ('prune.exclude=["model.layers.*.mixer.experts.up_proj", "model.layers.*.mixer.experts.down_proj"]'
            in lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_an_mxfp4_checkpoint_is_refused_with_how_to_dequantize_it(tmp_path):
    """GPT-OSS's released checkpoints hold MXFP4 experts: one line, exit 2, nothing written."""
    ckpt = tmp_path / "gpt-oss"
    load(family("gpt_oss")).model.save_pretrained(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (ckpt / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "distprune", "model=hf", f"model.path={ckpt}", "prune=magnitude",
                           f"output_dir={tmp_path / 'out'}", "device=cpu"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "quant_method mxfp4" in lines[0] and "Mxfp4Config(dequantize=True)" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", FAMILIES)
def test_a_streamed_checkpoint_in_per_expert_layout_reads_what_from_pretrained_loads(tmp_path, name):
    """Streaming reads each fused experts tensor from its per-expert pieces (and renamed
    tensors under their names on disk): block by block, the tensors from_pretrained builds."""
    from transformers import AutoModelForCausalLM

    from distprune.models import load_streamed
    from distprune.plan import shard_keys

    load(family(name)).model.save_pretrained(tmp_path)
    full = AutoModelForCausalLM.from_pretrained(tmp_path)
    cfg = ModelConfig(name="x", path=str(tmp_path))
    loaded, nbytes = load_streamed(cfg, lambda model: shard_keys(model, (), (), 2, False)[0])
    assert loaded.stream.streamed and loaded.stream.converted == (name != "gpt_oss")
    assert nbytes < sum(p.numel() * p.element_size() for p in full.parameters())  # rank 0 of 2: its share
    model = loaded.model
    for i in range(model.config.num_hidden_layers):
        loaded.stream.load_block(i)
        for n, p in model.model.layers[i].named_parameters():
            assert torch.equal(p, full.model.layers[i].get_parameter(n)), (i, n)
        loaded.stream.release_block(i)


def test_each_calibration_policy_has_its_own_cached_statistics(tmp_path):
    """Oneshot statistics are cached per calib.moe: a policy never reads another's."""
    from distprune import cli
    from distprune.config import CalibConfig, Config

    def job(policy: str, out: str) -> dict:
        cfg = Config(model=family("mixtral"), prune=PruneConfig(method="wanda", mode="oneshot"),
                     calib=CalibConfig(source="random", nsamples=4, seqlen=16, moe=policy),
                     output_dir=str(tmp_path / out), device="cpu", save=False)
        return cli.run(cfg)

    first, again, other = job("routed", "a"), job("routed", "b"), job("all", "c")
    assert (first["stats_cache"], again["stats_cache"], other["stats_cache"]) == ("miss", "hit", "miss")
    assert first["layers"] == again["layers"] and first["layers"] != other["layers"]


def test_blockwise_perplexity_gives_sliding_window_blocks_their_own_mask():
    """GPT-OSS alternates full and sliding-window attention (window 16 < 32 tokens): a
    block-wise pass gives every block the mask the model gives it, so it equals the whole
    model's perplexity."""
    from distprune.perplexity import blockwise_perplexity, perplexity

    model = load(family("gpt_oss")).model.eval()
    ids = windows(4, 32)
    whole = perplexity(model, ids, batch_size=2, show=False)
    assert blockwise_perplexity(model, ids, 2, "cpu", show=False) == pytest.approx(whole, rel=1e-6)


def test_router_and_view_names():
    model = load(family("qwen2_moe")).model
    block = model.model.layers[0].mlp
    assert moe.is_router(block, "gate") and moe.is_router(block, "shared_expert_gate")
    assert moe.is_experts(block.experts) and not moe.is_experts(block.shared_expert)
    names = [layer.name for layer in prunable_layers(model)]
    assert "model.layers.0.mlp.shared_expert.down_proj" in names  # shared experts: ordinary MLPs
    assert "model.layers.0.mlp.experts.3.down_proj" in names


@pytest.fixture(scope="module")
def rank_runs(tmp_path_factory):
    """A Mixtral checkpoint in its original per-expert layout, pruned by one process and by
    2 and 3 torchrun ranks (wanda and sparsegpt, row and 2:4, sequential; one sweep each).
    With 3 ranks a fused experts tensor is cut between two ranks (one writes it)."""
    from conftest import make_text, word_tokenizer

    root = tmp_path_factory.mktemp("moe-ranks")
    text = root / "eval.txt"
    text.write_text(make_text(4, 2000))
    ckpt = root / "mixtral"
    load(family("mixtral")).model.save_pretrained(ckpt)
    word_tokenizer(text.read_text(), BASE["vocab_size"]).save_pretrained(ckpt)
    evaluated = [f"eval.source={text}", "eval.seqlen=16", "eval.max_windows=5", "eval.batch_size=2"]
    named = {f"{m}-{s}-sequential": [f"prune.method={m}", f"prune.scope={s}", "prune.mode=sequential", *evaluated]
             for m in ("wanda", "sparsegpt") for s in ("row", "nm")}
    # oneshot and no evaluation: no pass sends the pruned views to every rank, so a fused
    # tensor cut between ranks reaches its writer only through plan.share_split
    named["wanda-row-oneshot"] = ["prune.method=wanda", "prune.scope=row", "prune.mode=oneshot"]
    done = {}
    for ranks in (1, 2, 3):
        done[ranks] = root / f"r{ranks}"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
        p = ranks_run([sys.executable, *launcher, "-m", "distprune", *jobs(done[ranks], named), "model=hf",
                       f"model.path={ckpt}", "calib.source=random", "calib.nsamples=6", "calib.seqlen=16",
                       "calib.batch_size=2", "calib.cache=false"], fresh=[done[ranks]], cwd=root, timeout=600,
                      env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
    return done, ckpt


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """Every family saved by save_pretrained (its original layout), pruned with wanda row 50%
    and sparsegpt 2:4 by one process and by 2 torchrun ranks: one sweep over all families
    per launch."""
    from conftest import make_text, word_tokenizer

    root = tmp_path_factory.mktemp("moe-families")
    text = root / "eval.txt"
    text.write_text(make_text(5, 2000))
    paths = []
    for name in FAMILIES:
        load(family(name)).model.save_pretrained(root / name)
        word_tokenizer(text.read_text(), BASE["vocab_size"]).save_pretrained(root / name)
        paths.append(str(root / name))
    done = {}
    for ranks in (1, 2):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
        out = root / f"r{ranks}"
        p = ranks_run([sys.executable, *launcher, "-m", "distprune", "-m", "model=hf",
                       f"model.path={','.join(paths)}", "prune=wanda,sparsegpt-2of4",
                       "calib.source=random", "calib.nsamples=6", "calib.seqlen=16", "calib.batch_size=2",
                       "calib.cache=false", f"eval.source={text}", "eval.seqlen=16", "eval.max_windows=4",
                       "eval.batch_size=2", f"output_dir={out}/${{model.name}}-${{prune.method}}",
                       f"hydra.sweep.dir={out / 'sweep'}"], fresh=[out], timeout=900,
                      env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
        done[ranks] = out
    return done, root


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_one_process_and_two_ranks_write_identical_checkpoints(family_runs, name):
    """wanda row 50% (every row of every expert matrix at 50%) and sparsegpt 2:4 (2 of every
    4): routers as they were, 1 process and 2 ranks bit-identical, in the input's layout."""
    from test_stream import tensors

    done, root = family_runs
    dense = tensors(root / name)
    for method in ("wanda", "sparsegpt"):
        a, b = tensors(done[1] / f"{name}-{method}"), tensors(done[2] / f"{name}-{method}")
        assert a.keys() == b.keys() == dense.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (method, k)
            if k.endswith(("gate.weight", "router.weight", "shared_expert_gate.weight", "bias")):
                assert torch.equal(a[k], dense[k]), k  # routers and biases never pruned
        report = json.loads((done[2] / f"{name}-{method}" / "distprune_report.json").read_text())
        assert report["expert_weights"]["sparsity"] == 0.5 and report["world_size"] == 2
        assert report["load"]["mode"] in ("streamed", "reused")  # per-expert files read as fused tensors
        experts = [layer for layer in report["layers"] if layer["expert"] is not None]
        assert experts and all(layer["zeros"] * 2 == layer["numel"] for layer in experts)
        for k, t in a.items():
            if ".experts." in k and t.dim() == 2 and not k.endswith("bias"):  # per expert (GPT-OSS: fused)
                groups = (t == 0).reshape(t.shape[0], -1, 4 if method == "sparsegpt" else t.shape[1]).sum(-1)
                assert bool((groups == (2 if method == "sparsegpt" else t.shape[1] // 2)).all()), (method, k)


@pytest.mark.parametrize("job", [f"{m}-{s}-sequential" for m in ("wanda", "sparsegpt") for s in ("row", "nm")]
                         + ["wanda-row-oneshot"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_one_process_and_several_ranks_write_identical_moe_checkpoints(rank_runs, job, ranks):
    from test_stream import tensors

    done, ckpt = rank_runs
    a, b = tensors(done[1] / job), tensors(done[ranks] / job)
    assert a.keys() == b.keys() == tensors(ckpt).keys()  # the input's per-expert names
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), (job, k)
    ra, rb = (json.loads((done[r] / job / "distprune_report.json").read_text()) for r in (1, ranks))
    assert ra["perplexity"] == rb["perplexity"] and ra["layers"] == rb["layers"]
    assert rb["world_size"] == ranks and ra["expert_weights"]["sparsity"] == 0.5
    assert ra["weights"]["model"] == sum(t.numel() for t in tensors(ckpt).values())
    for name, t in a.items():
        if ".experts." in name:  # every expert matrix at 50%: each row (row scope) or each group of 4 (2:4)
            groups = (t == 0).reshape(t.shape[0], -1, 4 if "-nm-" in job else t.shape[1]).sum(-1)
            assert bool((groups == groups.new_full((), 2 if "-nm-" in job else t.shape[1] // 2)).all()), name


def test_upcycled_moe_without_noise_computes_the_dense_model():
    """scripts/upcycle_moe.py: experts that are exact copies of the dense MLP, whatever the
    router picks, give the dense model's logits; with noise, different experts."""
    from pathlib import Path

    from conftest import TINY

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from upcycle_moe import upcycle

    dense = load(ModelConfig(random=dict(TINY["llama"]))).model
    ids = windows(2, 16) % TINY["llama"]["vocab_size"]
    moe_model = upcycle(dense, experts=4, top_k=2, noise=0.0, router_std=0.5, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(moe_model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    noisy = upcycle(dense, experts=4, top_k=2, noise=0.01, router_std=0.5, seed=0)
    gu = noisy.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(gu[0], gu[1])
    assert len(prunable_layers(noisy)) == 2 * (4 + 4 * 3)


@pytest.mark.parametrize("name", FAMILIES)
def test_expert_by_expert_forward_equals_transformers(name):
    """moe.forward (what calibration runs, one expert at a time) gives transformers' output
    of every experts module, on the routing the model itself computes."""
    model = load(family(name)).model.eval()
    calls = []
    for module in model.modules():
        if moe.is_experts(module):
            module.register_forward_hook(lambda m, args, out: calls.append((m, args, out)))
    with torch.no_grad():
        model(windows(2))
        assert calls
        for module, (hidden, index, weights), out in calls:
            torch.testing.assert_close(moe.forward(module, hidden, index, weights), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])  # per-expert files; fused, transposed, biased
@pytest.mark.parametrize("policy", ["routed", "all"])
def test_experts_read_one_at_a_time_give_the_same_statistics(tmp_path, name, policy):
    """A statistics pass over a streamed model whose experts this rank does not hold reads
    them one expert at a time (runner._streamed_experts): the statistics are bit for bit
    those of the model in memory, and no fused experts tensor is ever materialized."""
    from distprune.layers import outside_keys
    from distprune.models import load_streamed

    loaded = load(family(name))
    loaded.model.save_pretrained(tmp_path / name)
    reference = prunable_layers(loaded.model)
    want = stats.ChannelSums(reference)
    runner.collect(loaded.model, reference, windows(), "cpu", want, batch_size=4, show=False, moe_policy=policy)
    streamed, _ = load_streamed(ModelConfig(path=str(tmp_path / name)), outside_keys)  # no layer resident
    layers = prunable_layers(streamed.model)
    fused = [m for m in streamed.model.modules() if moe.is_experts(m)]
    materialized = []
    for m in fused:
        m.register_forward_pre_hook(lambda mod, _args: materialized.append(not mod.gate_up_proj.is_meta))
    got = stats.ChannelSums(layers)
    runner.collect(streamed.model, layers, windows(), "cpu", got, batch_size=4, show=False, blocks_from=streamed.stream,
                  moe_policy=policy)
    assert materialized and not any(materialized)
    assert got.stats.keys() == want.stats.keys()
    for key, st in want.stats.items():
        assert torch.equal(got.stats[key].sumsq, st.sumsq) and got.stats[key].count == st.count, key

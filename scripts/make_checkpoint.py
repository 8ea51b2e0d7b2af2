"""Write a Hugging Face safetensors checkpoint with random weights in a large model's shapes
(Llama-2-7B, 13.5 GB in bf16; Llama-2-70B; Mixtral-8x7B, 93 GB, or 2.9 GB a block), shard by
shard: only one output file's tensors are ever in memory, so a 2-core machine with 24 GiB
writes the 7B one in a few minutes. Tensors are named and laid out as the released
checkpoints are (Mixtral: one tensor per expert and matrix, block_sparse_moe.experts.{e}.w1,
which transformers fuses on load). For memory and time measurements (docs/BENCHMARKS.md) and
the GPU check; the weights mean nothing, so calibrate with calib.source=random.

    python scripts/make_checkpoint.py /tmp/llama-2-7b-random
    python scripts/make_checkpoint.py /tmp/llama-7b-4 --layers 4
    python scripts/make_checkpoint.py /tmp/mixtral-8x7b-4 --shape mixtral-8x7b --layers 4
    python scripts/make_checkpoint.py /tmp/llama-7b-tok --tokenizer ~/.cache/distprune/models/smollm2-135m

Never write it into the repository. With --tokenizer the model gets that tokenizer (and its
vocabulary size), so that text calibration and evaluation run too.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

SHAPES = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-128m": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
                       max_position_embeddings=2048, rms_norm_eps=1e-5),  # 132M with SmolLM2's tokenizer
    "llama-tiny": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, rms_norm_eps=1e-5),  # the smoke test's
    "llama-2-70b": dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=4096, rms_norm_eps=1e-5),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, sliding_window=None),
    "mixtral-tiny": dict(model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-5),  # smoke test
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def tensor_shapes(config) -> dict[str, tuple[torch.Size, bool]]:
    """Checkpoint tensor name -> (shape, is a norm weight) of the model that config
    describes, built on the meta device (no memory), in the layout save_pretrained writes
    (transformers' reverse conversion: per-expert tensors for a MoE)."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    out = {}
    for name, t in state.items():  # one tensor at a time: meta tensors, names and shapes only
        out.update({k: (v.shape, "norm" in k) for k, v in revert_weight_conversion(model, {name: t}).items()})
    return out


def write(out: Path, shape: str, layers: int | None, dtype: torch.dtype, seed: int, shard_gb: float,
          tokenizer: str | None) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    spec = dict(SHAPES[shape])
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    if tok is not None:
        spec["vocab_size"] = len(tok)
    if layers is not None:
        spec["num_hidden_layers"] = layers
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec, tie_word_embeddings=False,
                                  dtype=str(dtype).removeprefix("torch."))
    config.architectures = [ARCHITECTURES[model_type]]
    shapes = tensor_shapes(config)
    limit = int(shard_gb * 1e9)
    plan, chunk, size = [], [], 0
    for name, (s, _) in shapes.items():
        nbytes = math.prod(s) * dtype.itemsize
        if chunk and size + nbytes > limit:
            plan.append(chunk)
            chunk, size = [], 0
        chunk.append(name)
        size += nbytes
    plan.append(chunk)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    total = 0
    for keys, fname in zip(plan, files, strict=True):
        tensors = {}
        for k in keys:
            s, norm = shapes[k]
            t = torch.ones(s, dtype=dtype) if norm else (torch.randn(s, generator=gen) * 0.02).to(dtype)
            tensors[k] = t
            total += t.numel() * t.element_size()
        save_file(tensors, tmp / fname, metadata={"format": "pt"})
        print(f"{fname}: {len(keys)} tensors", file=sys.stderr)
        del tensors
    index = {"metadata": {"total_size": total},
             "weight_map": {k: f for keys, f in zip(plan, files, strict=True) for k in keys}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(tmp)
    if tok is not None:
        tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"{out}: {shape} shapes, {config.num_hidden_layers} blocks, {total / 1e9:.2f} GB", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output directory (outside the repository)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    p.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shape's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest output file, GB")
    p.add_argument("--tokenizer", default=None, help="a directory whose tokenizer the model gets")
    a = p.parse_args()
    if a.layers is not None and a.layers < 1:
        p.error("--layers must be at least 1")
    write(a.out, a.shape, a.layers, DTYPES[a.dtype], a.seed, a.shard_gb, a.tokenizer)


if __name__ == "__main__":
    main()

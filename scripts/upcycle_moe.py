"""Upcycle the built-in SmolLM2-135M into a Mixtral-format mixture of experts, to try and
measure MoE pruning offline (no real MoE fits this machine or downloads here).

Every expert starts as the dense MLP plus a little Gaussian noise (``--noise`` times each
matrix's standard deviation), so that experts differ; the router is random
(N(0, ``--router-std``)), top-``--top-k``. Each token's MoE output is then a convex
combination of near-copies of the dense MLP's output, so the dense perplexity stays close
to SmolLM2's. Attention, norms, embeddings and the head are copied. The checkpoint is
written by save_pretrained, in Mixtral's original per-expert layout
(``block_sparse_moe.experts.{e}.w1/w2/w3``), with the tokenizer.

    python scripts/upcycle_moe.py                 # -> ~/.cache/distprune/models/smollm2-135m-moe4
    python -m distprune model=smollm2-moe calib=wikitext2-local eval=wikitext2-local

(``model=smollm2-moe`` is the preset for the default output directory.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def upcycle(dense, experts: int, top_k: int, noise: float, router_std: float, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None),
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None, router_aux_loss_coef=0.0)
    moe = MixtralForCausalLM(config).to(dense.dtype).eval()
    gen = torch.Generator().manual_seed(seed)

    def jitter(w: torch.Tensor) -> torch.Tensor:
        return w + noise * w.float().std() * torch.randn(w.shape, generator=gen).to(w.dtype)

    with torch.no_grad():
        state = dense.state_dict()
        for name, p in moe.named_parameters():
            if ".mlp." not in name:
                p.copy_(state[name])
        for block, src in zip(moe.model.layers, dense.model.layers, strict=True):
            mlp = src.mlp
            for e in range(experts):
                gate_up = [jitter(mlp.gate_proj.weight), jitter(mlp.up_proj.weight)]
                block.mlp.experts.gate_up_proj[e] = torch.cat(gate_up)
                block.mlp.experts.down_proj[e] = jitter(mlp.down_proj.weight)
            block.mlp.gate.weight.copy_(router_std * torch.randn(block.mlp.gate.weight.shape, generator=gen))
    return moe


def main() -> None:
    from distprune.cache import cache_dir
    from distprune.config import ModelConfig
    from distprune.models import load

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", type=Path, default=None, help="output directory "
                    "(default: the smollm2-moe preset's, ~/.cache/distprune/models/smollm2-135m-moe4)")
    ap.add_argument("--dense", type=Path, default=None, help="a Llama-family HF directory to upcycle "
                    "(default: the built-in SmolLM2-135M)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.01, help="noise std per expert, relative to each matrix's std")
    ap.add_argument("--router-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out or cache_dir() / "models" / f"smollm2-135m-moe{args.experts}"
    loaded = load(ModelConfig(name="smollm2-135m") if args.dense is None else ModelConfig(path=str(args.dense)))
    moe = upcycle(loaded.model, args.experts, args.top_k, args.noise, args.router_std, args.seed)
    moe.save_pretrained(out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in moe.parameters())
    print(f"{out}: Mixtral, {args.experts} experts, top-{args.top_k}, {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()

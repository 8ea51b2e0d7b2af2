"""Mixtures of experts: fused expert tensors cut into per-expert (out, in) views, routers,
and the inputs each expert sees during calibration.

transformers 5 keeps a MoE block's experts in one module with 3D parameters, marked by
``@use_experts_implementation`` (it sets ``is_transposed``, ``is_concatenated``,
``has_bias``, ``has_gate`` and an ``_apply_gate``):
- ``gate_up_proj`` (E, 2I, H): per expert, the gate rows then the up rows; transposed
  (GPT-OSS) it is (E, H, 2I) with gate and up interleaved (columns 0, 2, ... are gate);
- ``down_proj`` (E, H, I), or (E, I, H) transposed.
Each expert contributes three views (gate_proj, up_proj, down_proj) that write through to
the fused tensor; scores, selection, allocation, solves and the owner split see only
views. Biases (GPT-OSS) are never pruned, nor are routers (``mlp.gate``, ``mlp.router``)
and shared-expert gates.

Calibration runs an experts module with ``forward`` (its arguments: hidden_states (T, H),
top_k_index (T, k), top_k_weights (T, k)), one expert after another, so that an expert's
weights may come from memory or be read from disk one at a time (runner.collect) with the
same numbers; each expert's step hands its inputs to the statistics. Expert e's gate and
up see the hidden states of the tokens routed to it, its down sees act(gate) * up of those
tokens (the module's own ``_apply_gate``). Routing weights scale an expert's output, not its
inputs: ``calib.moe=routed`` (the default) takes the inputs as they are; ``weighted``
multiplies each token's inputs by its routing weight, so that a token counts in proportion
to its share of the block's output (the output error of pruning is r_t * dW x_t); ``all``
sends every token through every expert, unweighted (llm-compressor's choice for
quantization): no expert is left without statistics. docs/RESULTS.md compares them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ROUTERS = ("gate", "router", "shared_expert_gate")  # children of a MoE block that route, never pruned
MATRICES = ("gate_proj", "up_proj", "down_proj")


def is_experts(module: nn.Module) -> bool:
    """A fused experts module distprune knows how to cut (gate_up_proj and down_proj)."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (hasattr(module, "is_transposed") and getattr(module, "has_gate", True)
            and isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3)


def is_router(parent: nn.Module, child_name: str) -> bool:
    """Whether ``parent.<child_name>`` routes tokens (a MoE block's gate, router, or shared
    expert gate): never pruned."""
    return child_name in ROUTERS and hasattr(parent, "experts")


def num_experts(module: nn.Module) -> int:
    return module.gate_up_proj.shape[0]


def view_spec(module: nn.Module, matrix: str) -> tuple[str, bool, slice | None]:
    """(parameter name, transposed, rows of the (out, in) view) of one matrix of an expert."""
    transposed = bool(module.is_transposed)
    if matrix == "down_proj":
        return "down_proj", transposed, None
    rows = module.gate_up_proj.shape[2] if transposed else module.gate_up_proj.shape[1]  # 2I
    half = rows // 2
    if getattr(module, "is_concatenated", True):
        part = slice(0, half) if matrix == "gate_proj" else slice(half, rows)
    else:  # interleaved: gate0, up0, gate1, up1, ...
        part = slice(0, rows, 2) if matrix == "gate_proj" else slice(1, rows, 2)
    return "gate_up_proj", transposed, part


Weights = tuple  # one expert's (gate_up (2I, H) or (H, 2I), its bias or None, down, its bias or None)


def weights_of(module: nn.Module, e: int) -> Weights:
    """Expert e's tensors as the module holds them (views into the fused tensors)."""
    bias = getattr(module, "has_bias", False)
    return (module.gate_up_proj[e], module.gate_up_proj_bias[e] if bias else None,
            module.down_proj[e], module.down_proj_bias[e] if bias else None)


def _linear(module: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.to(w.dtype) @ w if module.is_transposed else F.linear(x.to(w.dtype), w)
    return y + b if b is not None else y


def _gated(module: nn.Module, x: torch.Tensor, w: Weights) -> torch.Tensor:
    """act(gate) * up of x (T, H) for an expert with weights w (the module's own _apply_gate:
    GPT-OSS clamps and adds 1 to up): (T, I)."""
    return module._apply_gate(_linear(module, x, w[0], w[1]))


def expert_step(module: nn.Module, e: int, w: Weights, hidden: torch.Tensor, index: torch.Tensor,
                weights: torch.Tensor, out: torch.Tensor, tap=None, policy: str = "routed") -> None:
    """Expert e's part of one forward call of the experts module (hidden (T, H), top_k_index
    and top_k_weights (T, k)): adds routing weight * expert(x) of its routed tokens into out
    (T, H) float32, and hands ``tap(e, input of gate and up, input of down)`` the inputs its
    statistics come from (``policy``; an expert with no tokens gets empty ones)."""
    routed = index == e  # (T, k)
    rows = routed.any(dim=-1).nonzero().squeeze(1)
    x = hidden[rows]
    h = _gated(module, x, w)
    r = (weights * routed).sum(-1)[rows, None]  # (T_e, 1): the routing weight of e for each of its tokens
    if tap is not None:
        if policy == "all":
            tap(e, hidden, _gated(module, hidden, w))
        elif policy == "weighted":
            tap(e, x * r.to(x.dtype), h * r.to(h.dtype))
        else:
            tap(e, x, h)
    if rows.numel():
        y = _linear(module, h, w[2], w[3])
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        out.index_add_(0, rows, y.float() * r.float())


def forward(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, *,
            fetch=weights_of, tap=None, policy: str = "routed") -> torch.Tensor:
    """The experts module's forward, one expert after another (``fetch(module, e)`` gives
    expert e's weights), summed in float32 in expert order: what distprune's calibration
    passes run instead of transformers' implementations (grouped_mm, eager), so that a
    block computes the same numbers whether its experts are in memory or read from disk
    one at a time (runner.collect), on any number of ranks."""
    flat, index, weights = flatten(hidden, index, weights)
    out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    for e in range(num_experts(module)):
        expert_step(module, e, fetch(module, e), flat, index, weights, out, tap, policy)
    return out.to(hidden.dtype).reshape(hidden.shape)


def flatten(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, *_) -> tuple:
    """An experts module's arguments as (hidden (T, H), top_k_index (T, k), top_k_weights (T, k))."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(flat.shape[0], -1)
    return flat, index, weights.reshape(index.shape)

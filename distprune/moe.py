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

Statistics: a forward hook on the experts module receives (hidden_states (T, H),
top_k_index (T, k), top_k_weights (T, k)). Expert e's gate and up see the hidden states of
the tokens routed to it, its down sees act(gate) * up of those tokens (recomputed here
with the module's own ``_apply_gate``). Routing weights scale an expert's output, not its
inputs: ``calib.moe=routed`` (the default) takes the inputs as they are; ``weighted``
multiplies each token's inputs by its routing weight, so that a token counts in proportion
to its share of the block's output (the output error of pruning is r_t * dW x_t); ``all``
sends every token through every expert, unweighted (llm-compressor's choice for
quantization): no expert is left without statistics. docs/RESULTS.md compares them.
"""

from __future__ import annotations

from collections.abc import Iterator

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


def _gate_up(module: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """The expert's fused gate/up projection of x (T, H), bias included: (T, 2I)."""
    w = module.gate_up_proj[e]
    y = x @ w if module.is_transposed else F.linear(x, w)
    if getattr(module, "has_bias", False):
        y = y + module.gate_up_proj_bias[e]
    return y


def expert_inputs(module: nn.Module, args: tuple, policy: str = "routed"
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(e, input of gate and up (T_e, H), input of down (T_e, I)) for every expert of the
    module, in expert order, from the arguments of one forward call; an expert with no
    tokens gets empty (0, H) and (0, I) inputs."""
    hidden, index, weights = args[0], args[1], args[2]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, H)
    index = index.reshape(hidden.shape[0], -1)  # (tokens, top_k)
    for e in range(num_experts(module)):
        if policy == "all":
            yield e, hidden, module._apply_gate(_gate_up(module, hidden, e))
            continue
        routed = index == e  # (tokens, top_k)
        rows = routed.any(dim=-1)
        x = hidden[rows]
        h = module._apply_gate(_gate_up(module, x, e))
        if policy == "weighted":
            r = (weights.reshape(routed.shape) * routed).sum(-1)[rows, None].to(x.dtype)  # (T_e, 1)
            x, h = x * r, h * r
        yield e, x, h

"""Perplexity over non-overlapping token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distprune.dist import SINGLE, Comm
from distprune.progress import progress


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, show: bool = True,
               comm: Comm = SINGLE) -> float:
    """exp(mean next-token negative log-likelihood) over windows (count, seqlen); every
    window is scored on its own, predicting tokens 2..seqlen. With several ranks each
    scores its share of the windows and the sums are all-reduced."""
    windows = torch.tensor_split(windows, comm.world_size)[comm.rank]
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for start in progress(range(0, windows.shape[0], batch_size), "perplexity", "batch", show):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, T-1, vocab)
        targets = ids[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               reduction="sum").double().cpu()
        tokens += targets.numel()
    totals = comm.all_reduce_sum(torch.stack([nll, torch.tensor(float(tokens), dtype=torch.float64)]))
    return math.exp(float(totals[0]) / float(totals[1]))

"""Perplexity over non-overlapping token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distprune.dist import SINGLE, Comm, batch_share
from distprune.progress import progress


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, show: bool = True,
               comm: Comm = SINGLE) -> float:
    """exp(mean next-token negative log-likelihood) over windows (count, seqlen); every
    window is scored on its own, predicting tokens 2..seqlen.

    The windows form the same batches whatever the number of ranks; each rank scores a
    contiguous share of the batches, and the per-batch sums are gathered and added in
    batch order, so the result does not depend on how many ranks computed it."""
    mine = windows[batch_share(windows.shape[0], batch_size, comm)]
    device = next(model.parameters()).device
    sums = torch.zeros(-(-mine.shape[0] // batch_size), dtype=torch.float64)
    batches = torch.split(mine, batch_size) if mine.shape[0] else ()  # a rank may get none
    for j, batch in enumerate(progress(batches, "perplexity", "batch", show)):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, T-1, vocab)
        sums[j] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                  reduction="sum").double().cpu()
    nll = comm.all_gather_cat(sums).sum()  # batch order on every rank
    return math.exp(float(nll) / (windows.shape[0] * (windows.shape[1] - 1)))

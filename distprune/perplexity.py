"""Perplexity over non-overlapping token windows: of the whole model at once, or block by
block (one decoder block in memory and on the device at a time)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from distprune.dist import SINGLE, Comm, batch_share
from distprune.layers import decoder_blocks
from distprune.progress import progress
from distprune.runner import StandIn, capture_block_inputs, run_block
from distprune.stream import IN_MEMORY, InMemory, Streamed, move


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of tokens 2..T of ids (B, T) under logits (B, T, vocab)."""
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="sum").double().cpu()


def _finish(sums: torch.Tensor, windows: torch.Tensor, comm: Comm) -> float:
    nll = comm.all_gather_cat(sums).sum()  # batch order on every rank
    return math.exp(float(nll) / (windows.shape[0] * (windows.shape[1] - 1)))


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, show: bool = True,
               comm: Comm = SINGLE) -> float:
    """exp(mean next-token negative log-likelihood) over windows (count, seqlen) of a model
    in memory; every window is scored on its own, predicting tokens 2..seqlen.

    The windows form the same batches whatever the number of ranks; each rank scores a
    contiguous share of the batches, and the per-batch sums are gathered and added in
    batch order, so the result does not depend on how many ranks computed it."""
    mine = windows[batch_share(windows.shape[0], batch_size, comm)]
    device = next(model.parameters()).device
    sums = torch.zeros(-(-mine.shape[0] // batch_size), dtype=torch.float64, device="cpu")
    batches = torch.split(mine, batch_size) if mine.shape[0] else ()  # a rank may get none
    for j, batch in enumerate(progress(batches, "perplexity", "batch", show)):
        ids = batch.to(device)
        sums[j] = _nll(model(input_ids=ids, use_cache=False).logits, ids)
    return _finish(sums, windows, comm)


class _Feed(StandIn):
    """Stands in for a decoder block during the last step of a block-wise pass: passes its
    input through, or (the last block) returns the final hidden states computed before, in
    the block's output format."""

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states if self._out is None else self._out
        return (h,) if self._tuple else h


def _logits(model: nn.Module, ids: torch.Tensor, final: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """The model's logits for ids when its decoder blocks produce ``final``: the model's own
    forward with the blocks replaced by _Feed, so that the final norm, head and any
    projection after the blocks are the model's, whatever its architecture."""
    blocks = decoder_blocks(model)
    originals = list(blocks)
    try:
        for j, block in enumerate(originals):
            blocks[j] = _Feed(block, _out=final if j == len(originals) - 1 else None, _tuple=as_tuple)
        return model(input_ids=ids, use_cache=False).logits
    finally:
        for j, block in enumerate(originals):
            blocks[j] = block


@torch.no_grad()
def blockwise_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int, device,
                         blocks_from: InMemory | Streamed = IN_MEMORY, comm: Comm = SINGLE,
                         before_block: Callable[[int], None] | None = None, show: bool = True) -> float:
    """``perplexity`` computed block by block: every window of this rank goes through
    block i before any goes through block i+1, so that only one block is in memory
    (``blocks_from`` reads it, streamed) and on the device. The batches and each batch's
    operations are those of ``perplexity``: the same number. ``before_block(i)`` runs on
    every rank once block i is read (several ranks: it gives every rank the pruned weights
    of block i)."""
    mine = windows[batch_share(windows.shape[0], batch_size, comm)]
    blocks = decoder_blocks(model)
    move(model, device, skip=blocks)  # embeddings, final norm, head: blocks go one at a time
    inputs = capture_block_inputs(model, mine, batch_size, device)
    as_tuple = False
    for i, block in enumerate(progress(blocks, "perplexity", "block", show)):
        blocks_from.load_block(i)
        if before_block is not None:
            before_block(i)
        block.to(device)
        outputs, as_tuple = run_block(block, inputs, i)
        block.to("cpu")
        blocks_from.release_block(i)
        inputs = outputs
    sums = torch.zeros(len(inputs), dtype=torch.float64, device="cpu")
    batches = torch.split(mine, batch_size) if mine.shape[0] else ()  # a rank may get none
    for j, ((final, _), batch) in enumerate(zip(inputs, batches, strict=True)):
        ids = batch.to(device)
        sums[j] = _nll(_logits(model, ids, final, as_tuple), ids)
    move(model, "cpu", skip=blocks)
    return _finish(sums, windows, comm)

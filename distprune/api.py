"""Python API: prune an already-loaded model in place."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from distprune import allocate, methods, runner, stats
from distprune.config import ConfigError, PruneConfig
from distprune.dist import SINGLE, Comm, batch_share
from distprune.layers import PrunableLayer, broadcast_weight, prunable_layers, weights_to
from distprune.masks import GroupsResult, LayerResult, prune_groups, write_solved
from distprune.progress import progress
from distprune.stream import IN_MEMORY, InMemory, Streamed


@dataclass
class PruneResult:
    config: PruneConfig
    groups: GroupsResult
    mode: str | None = None  # oneshot / sequential statistics; None without calibration
    stats_cache: str | None = None  # hit, miss or off
    stats_seconds: float = 0.0  # calibration forward passes (and cache I/O)
    solve: dict | None = None  # a solve method's per-layer details, seconds and bytes per rank
    allocation: allocate.Allocation | None = None  # the layers' targets (None: global scope)
    tokens: dict[str, int] | None = None  # calibration tokens that reached each layer (experts: those routed to it)

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.groups.layers)

    @property
    def pruned(self) -> int:
        return sum(r.pruned for r in self.groups.layers)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.groups.layers)

    def summary(self) -> dict:
        """The pruning part of distprune_report.json."""
        sel = self.groups.selection
        return {
            "method": self.config.method,
            "scope": self.config.scope,
            **({"m": self.config.m} if self.config.scope == "nm" else {}),  # N:M's group size
            "selector": self.config.selector_name,
            "target_sparsity": self.config.sparsity,
            "achieved_sparsity": self.zeros / self.numel,
            "pruned_fraction": self.pruned / self.numel,
            "prunable_weights": self.numel,
            "pruned_weights": self.pruned,
            "threshold": float(sel.threshold) if sel is not None and sel.threshold is not None else None,
            "selector_passes": self.groups.passes,
            "mode": self.mode,
            "stats_cache": self.stats_cache,
            "allocation": self.config.allocation,
            "normalize": self.config.normalization,
            **({"owl_m": self.config.owl_m, "owl_lambda": self.config.owl_lambda,
                "block_sparsity": self.allocation.block_sparsity} if self.config.allocation == "owl" else {}),
            **self.weight_kinds(),
            "layers": [{**asdict(r), **({"tokens": self.tokens[r.name]} if self.tokens and r.name in self.tokens
                                        else {})} for r in self.groups.layers],
            **({"solve": self.solve} if self.solve is not None else {}),
        }

    def weight_kinds(self) -> dict:
        """Expert and other pruned weights counted apart (only for a model with experts):
        totals, sparsity, and the expert matrices that no calibration token reached."""
        kinds: dict[str, dict] = {}
        for r in self.groups.layers:
            k = kinds.setdefault("expert_weights" if r.expert is not None else "other_weights",
                                 {"matrices": 0, "numel": 0, "zeros": 0})
            k["matrices"] += 1
            k["numel"] += r.numel
            k["zeros"] += r.zeros
        if "expert_weights" not in kinds:
            return {}
        for k in kinds.values():
            k["sparsity"] = k["zeros"] / max(k["numel"], 1)
        untouched = [r.name for r in self.groups.layers if r.expert is not None and self.tokens is not None
                     and self.tokens.get(r.name) == 0]
        kinds["expert_weights"]["without_tokens"] = untouched
        return kinds


def check_groups(layers: list[PrunableLayer], cfg: PruneConfig) -> None:
    """N:M groups must tile every row: refuse before any weight changes."""
    if cfg.scope != "nm":
        return
    for layer in layers:
        inputs = layer.weight.shape[1]
        if inputs % cfg.m:
            raise ConfigError(f"prune.m={cfg.m} does not divide the {inputs} inputs of {layer.name}")


@torch.no_grad()
def prune(model: nn.Module, config: PruneConfig | dict | None = None, statistics: dict | None = None,
          comm: Comm = SINGLE, layers: list[PrunableLayer] | None = None, show_progress: bool = True,
          targets: dict[str, int] | None = None) -> PruneResult:
    """Prune the decoder-block linear weights of ``model`` in place.

    ``statistics`` maps layer names to what the method accumulates over calibration data
    (wanda, ria: ``stats.LayerStats``; sparsegpt: the (in, in) Hessian 2/n sum x x^T), as
    ``calibrate_and_prune`` collects them. ``layers`` restricts pruning to a subset
    (default: every prunable layer that the config's include/exclude patterns admit). A
    solve method prunes each layer on its own, with no collectives. ``targets`` (layer name
    -> weights to prune, allocate.py) default to the config's allocation over ``layers``
    on every rank.
    """
    cfg = config if isinstance(config, PruneConfig) else PruneConfig(**(config or {}))
    cfg.check()
    method = methods.of(cfg)
    layers = layers if layers is not None else prunable_layers(model, cfg.include, cfg.exclude)
    if method.calibrated:
        missing = [layer.name for layer in layers if statistics is None or layer.name not in statistics]
        if missing:
            raise ConfigError(f"prune.method={cfg.method} needs calibration statistics; none for {missing[0]}")

    check_groups(layers, cfg)
    alloc = None
    if targets is None and cfg.scope != "global":
        if method.solve is not None and cfg.allocation != "uniform":
            raise ConfigError(f"prune.allocation={cfg.allocation} with prune.method={cfg.method} needs targets "
                              "(allocate.allocate over Wanda's scores); calibrate_and_prune computes them")
        alloc = allocate.allocate(cfg, layers, lambda layer: _scores(method, layer, statistics, cfg), comm)
        targets = alloc.targets
    if method.solve is not None:  # each layer on its own (no collectives): the caller owns the layers
        groups, details = GroupsResult([], seconds={"solve": 0.0}), {}
        for layer in progress(layers, f"{cfg.method} {cfg.scope}", "layer", show_progress):
            t0 = time.perf_counter()
            solved = method.solve(layer.weight, statistics[layer.name], cfg, targets[layer.name])
            groups.layers.append(write_solved(layer, solved.weight, solved.mask, targets[layer.name]))
            seconds = time.perf_counter() - t0
            groups.seconds["solve"] += seconds
            details[layer.name] = {"percdamp": solved.percdamp, "error": solved.error, "seconds": round(seconds, 4),
                                   "shape": list(layer.weight.shape)}
        return PruneResult(cfg, groups, solve={"layers": details}, allocation=alloc)

    def score(layer: PrunableLayer) -> torch.Tensor:  # global scope: normalized (allocate.normalized)
        return allocate.normalized(_scores(method, layer, statistics, cfg), cfg.normalization)

    def rows(layer: PrunableLayer, a: int, b: int) -> torch.Tensor:  # score(layer)[a:b], from rows a to b only
        return allocate.normalized(_scores(method, layer, statistics, cfg, slice(a, b)), cfg.normalization)

    # on CPU, layers scored row by row stream in cache-sized pieces (select.ScoreStream); a
    # layer-wide normalization needs the whole layer first, and a GPU is fastest on whole layers
    by_rows = method.rowwise and cfg.normalization in ("none", "row") and all(
        layer.weight.device.type == "cpu" for layer in layers)
    groups = prune_groups(layers, score, cfg.scope, cfg.sparsity, cfg.selector, comm, show_progress, m=cfg.m,
                          targets=targets, rows=rows if by_rows else None, search_tol=cfg.search_tol,
                          search_max_iter=cfg.search_max_iter)
    return PruneResult(cfg, groups, allocation=alloc)


def calibrate_and_prune(model: nn.Module, config: PruneConfig, windows: Callable[[], torch.Tensor], device,
                        layers: list[PrunableLayer] | None = None, batch_size: int = 8,
                        cache_file: Path | None = None, cache_fields: dict | None = None,
                        comm: Comm = SINGLE, show_progress: bool = True,
                        own: list[PrunableLayer] | None = None,
                        blocks_from: InMemory | Streamed = IN_MEMORY, moe_policy: str = "routed") -> PruneResult:
    """Collect the method's statistics over the calibration windows (``windows()`` returns
    them, (samples, seqlen); not called on a cache hit) block by block on ``device``, and
    prune ``model`` in place with them.

    oneshot: statistics of the dense model (read from / written to ``cache_file`` when
    given and the method's statistics are cacheable), then one pruning pass. sequential:
    block i is pruned as soon as its statistics are complete, before its outputs feed
    block i+1. A non-uniform allocation (owl, global) first scores the dense model with
    its allocating method's statistics (oneshot, cached like them), then prunes.

    With several ranks, each calibrates on its share of the windows, in whole batches
    (statistics are gathered per batch and added in batch order), and prunes ``own`` (its
    shard of ``layers``); in sequential mode each block's layers are pruned by the ranks
    they are spread over (``stats.balance``) and sent to every rank, which runs the next
    block on the pruned one (and keeps those of ``own``). A
    solve method (sparsegpt) solves each layer on one rank: ``_calibrate_and_solve``.
    ``blocks_from`` reads each block when a pass needs it (a streamed model, stream.py).
    ``moe_policy``: which tokens an expert's statistics come from (routed, weighted, all; moe.py).

    Afterwards the weights of ``own`` are on ``device`` and the rest of the model is where it
    was (block-wise onloading never moves the whole model): move it before running it.
    Only ``own`` is sure to hold pruned weights: the other ranks' layers may be dense (or
    on the meta device, streamed).
    """
    config.check()
    method = methods.of(config)
    layers = layers if layers is not None else prunable_layers(model, config.include, config.exclude)
    check_groups(layers, config)
    own = own if own is not None else layers
    mode = config.resolved_mode
    calibration: list[torch.Tensor] = []

    def mine() -> torch.Tensor:  # this rank's share, in whole batches (made once: allocation may need it too)
        if not calibration:
            w = windows()
            calibration.append(w[batch_share(w.shape[0], batch_size, comm)])
        return calibration[0]

    dense: dict = {}  # statistic -> (statistics of the dense model, cache hit/miss/off, seconds)

    def dense_stats(statistic) -> tuple[dict, str, float]:
        if statistic not in dense:
            dense[statistic] = _dense_statistics(model, statistic, layers, mine, device, batch_size, cache_file,
                                                 cache_fields, comm, show_progress, blocks_from, moe_policy)
        return dense[statistic]

    alloc = None
    if config.scope != "global":
        by = methods.allocating(method)
        st = dense_stats(by.statistic)[0] if config.allocation != "uniform" and by.calibrated else None
        t1 = time.perf_counter()
        alloc = allocate.allocate(config, own, lambda layer: _scores(by, layer, st, config), comm)
        allocate_seconds = time.perf_counter() - t1
    if method.solve is not None:
        result = _calibrate_and_solve(model, config, mine, device, layers, batch_size, comm, show_progress, own,
                                      alloc.targets, blocks_from, moe_policy)
    elif mode == "sequential":
        groups = GroupsResult([])

        def prune_block(_i: int, block_layers: list[PrunableLayer], st: dict) -> None:
            # the block's layers spread over all ranks (not the contiguous shards, which would
            # leave every rank but one waiting), balanced by size like SparseGPT's solves
            owner = stats.balance(block_layers, lambda rows, cols: rows * cols, comm.world_size)
            mine_here = [layer for layer in block_layers if owner[layer.name] == comm.rank]
            part = prune(model, config, st, layers=mine_here, show_progress=False, targets=alloc.targets)
            groups.extend(part.groups)
            for layer in block_layers:  # the pruned weights, from each owner to every rank
                broadcast_weight(comm, layer, owner[layer.name])

        t1 = time.perf_counter()
        acc = method.statistic(layers, comm)
        runner.collect(model, layers, mine(), device, acc, "sequential", prune_block, batch_size, show_progress,
                      blocks_from, moe_policy)
        elapsed = time.perf_counter() - t1 - sum(groups.seconds.values())
        pruned = {r.name: r for part in comm.all_gather_objects(groups.layers) for r in part}
        groups.layers = [pruned[layer.name] for layer in own]  # this rank reports (and saves) its shard
        result = PruneResult(config, groups, mode, "off", elapsed, tokens=_tokens(acc.stats))
    else:
        found, hit, _ = dense_stats(method.statistic)
        weights_to(own, device)
        part = prune(model, config, found, comm=comm, layers=own, show_progress=show_progress,
                     targets=alloc.targets if alloc else None)
        result = PruneResult(config, part.groups, mode, hit, 0.0, allocation=part.allocation, tokens=_tokens(found))
    if dense:  # the dense statistics' time counts as statistics; their cache use is reported
        result.stats_seconds += sum(v[2] for v in dense.values())
        if result.stats_cache in (None, "off"):
            result.stats_cache = next(iter(dense.values()))[1]
    if alloc is not None:
        result.allocation = alloc
        result.groups.seconds["allocate"] = allocate_seconds
    return result


def _scores(method, layer: PrunableLayer, statistics, cfg: PruneConfig, rows: slice = slice(None)) -> torch.Tensor:
    """A layer's (out, in) scores by a score method, or those of some of its rows (a
    ``rowwise`` method); contiguous: stream order (ties) is the flat index."""
    return method.score(layer.weight[rows], statistics[layer.name] if method.calibrated else None, cfg).contiguous()


def _tokens(statistics: dict[str, stats.LayerStats]) -> dict[str, int]:
    """Calibration tokens that reached each layer."""
    return {name: st.count for name, st in statistics.items()}


def _dense_statistics(model, statistic, layers, windows, device, batch_size, cache_file, cache_fields, comm,
                      show, blocks_from, moe_policy) -> tuple[dict, str, float]:
    """Statistics of the dense model for every layer (oneshot), from the cache when every
    rank has them there: (statistics, cache hit/miss/off, seconds)."""
    t0 = time.perf_counter()
    cacheable = cache_file is not None and statistic.cacheable
    cached = (stats.load(cache_file, {layer.name: layer.weight.shape[1] for layer in layers}, cache_fields or {})
              if cacheable else None)
    everywhere = comm.all_reduce_min(torch.tensor([int(cached is not None)], device="cpu"))  # every rank must hit
    found = cached if int(everywhere) else None
    if found is None:
        acc = statistic(layers, comm)
        runner.collect(model, layers, windows(), device, acc, batch_size=batch_size, show=show,
                      blocks_from=blocks_from, moe_policy=moe_policy)
        found = acc.stats
        if cacheable and comm.is_main:
            stats.save(cache_file, found, cache_fields or {})
    hit = "off" if not cacheable else ("hit" if found is cached else "miss")
    return found, hit, time.perf_counter() - t0


def _calibrate_and_solve(model: nn.Module, config: PruneConfig, windows: Callable[[], torch.Tensor], device,
                         layers: list[PrunableLayer], batch_size: int, comm: Comm, show: bool,
                         own: list[PrunableLayer], targets: dict[str, int],
                         blocks_from: InMemory | Streamed = IN_MEMORY, moe_policy: str = "routed") -> PruneResult:
    """A solve method, block by block: each block's statistics are reduced onto the rank
    that owns each layer (balanced by solve cost), the owner solves it, and the new
    weights are broadcast to every rank (sequential mode runs the next block on them;
    saving and evaluation need them anyway). oneshot takes every statistic from the
    dense model, sequential from the outputs of the pruned blocks before. No rank holds
    more than one block's statistics."""
    method, mode = methods.of(config), config.resolved_mode
    acc = method.statistic(layers, comm)
    solved: list[tuple[int, LayerResult]] = []  # (index in layers, result) of the layers this rank solved
    details: dict[str, dict] = {}
    tokens: dict[str, int] = {}
    index = {layer.name: i for i, layer in enumerate(layers)}
    seconds, block_bytes, mark = 0.0, [], comm.bytes_communicated

    def solve_block(_i: int, block_layers: list[PrunableLayer], hessians: dict) -> None:
        nonlocal seconds, mark
        t0 = time.perf_counter()
        mine = [layer for layer in block_layers if acc.owner[layer.name] == comm.rank]
        part = prune(model, config, hessians, layers=mine, show_progress=False, targets=targets)
        solved.extend((index[r.name], r) for r in part.groups.layers)
        details.update({name: {**d, "rank": comm.rank} for name, d in part.solve["layers"].items()})
        seconds += time.perf_counter() - t0
        tokens.update(acc.tokens)
        for layer in block_layers:  # the pruned weights, from each owner to every rank
            broadcast_weight(comm, layer, acc.owner[layer.name])
        block_bytes.append(comm.bytes_communicated - mark)  # this block's reduces and broadcasts
        mark = comm.bytes_communicated

    t0 = time.perf_counter()
    runner.collect(model, layers, windows(), device, acc, mode, solve_block, batch_size, show, blocks_from, moe_policy)
    elapsed = time.perf_counter() - t0 - seconds
    everyone = [r for part in comm.all_gather_objects(solved) for r in part]
    names = {layer.name for layer in own}
    results = [r for _, r in sorted(everyone, key=lambda ir: ir[0]) if r.name in names]
    merged: dict[str, dict] = {}
    for part in comm.all_gather_objects(details):
        merged.update(part)
    solve = {
        "seconds_per_rank": comm.all_gather_objects(round(seconds, 4)),
        "bytes_per_block_per_rank": comm.all_gather_objects(block_bytes),
        "raised_percdamp": {n: d["percdamp"] for n, d in merged.items() if d["percdamp"] != config.percdamp},
        "layers": {layer.name: merged[layer.name] for layer in layers},
    }
    groups = GroupsResult(results, seconds={"solve": seconds})
    return PruneResult(config, groups, mode, "off", elapsed, solve, tokens=tokens)

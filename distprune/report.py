"""What a job reports: its log lines about the pruning, and distprune_report.json (method,
targets and achieved sparsity, every layer, where the time and the bytes went, memory, the
resolved config)."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distprune.api import PruneResult
from distprune.config import Config
from distprune.dist import Comm
from distprune.layers import Coverage
from distprune.models import LoadedModel

log = logging.getLogger("distprune")
EMPTIED = 0.95  # a layer pruned past this fraction gets a warning that names it


def disk_read_bytes() -> int:
    """Bytes this process has read from storage (/proc/self/io read_bytes: page-cache misses);
    0 where the system does not say."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("read_bytes:")), 0)


def varied(cfg: Config) -> bool:
    """Whether the layers of this job lose different fractions (an allocation plot is drawn)."""
    return cfg.prune.allocation != "uniform" or cfg.prune.scope == "global"


def record_pruning(cfg: Config, result: PruneResult, seconds: dict) -> None:
    """The pruning's seconds into ``seconds``, and its log lines: statistics, the solve or
    the selection and mask, experts, the allocation's spread, layers left nearly empty."""
    if result.mode:
        seconds["statistics"] = round(result.stats_seconds, 4)
        log.info("statistics: %s, %d x %d tokens from %s, cache %s, in %.1fs", result.mode, cfg.calib.nsamples,
                 cfg.calib.seqlen, cfg.calib.source, result.stats_cache, seconds["statistics"])
    seconds.update({k: round(v, 4) for k, v in result.groups.seconds.items()})
    summary = result.summary()
    if result.solve is not None:
        solve = result.solve
        log.info("solve: %s %s scope, pruned %d of %d weights (%.4f, target %.4f); seconds per rank %s, %.1f MB moved "
                 "per rank", cfg.prune.method, cfg.prune.scope, result.pruned, result.numel, summary["pruned_fraction"],
                 cfg.prune.sparsity, solve["seconds_per_rank"],
                 max(sum(b) for b in solve["bytes_per_block_per_rank"]) / 1e6)
        for name, pd in solve["raised_percdamp"].items():
            log.warning("solve: %s factorized only with dampening raised to %g", name, pd)
    else:
        log.info("score+select: %s %s scope, selector %s, %d passes in %.2fs", cfg.prune.method, cfg.prune.scope,
                 summary["selector"], summary["selector_passes"], seconds["score+select"])
        log.info("mask: pruned %d of %d weights (%.4f, target %.4f) in %.2fs", result.pruned, result.numel,
                 summary["pruned_fraction"], cfg.prune.sparsity, seconds["mask"])

    if "expert_weights" in summary:
        ex, other = summary["expert_weights"], summary["other_weights"]
        log.info("experts: %d matrices, %d of %d weights zero (%.4f); other layers %d of %d (%.4f); calib.moe=%s",
                 ex["matrices"], ex["zeros"], ex["numel"], ex["sparsity"], other["zeros"], other["numel"],
                 other["sparsity"], cfg.calib.moe)
        if ex["without_tokens"]:
            log.warning("experts: %d expert matrices saw no calibration token and were pruned by magnitude (first: "
                        "%s); calib.moe=all sends every token to every expert", len(ex["without_tokens"]),
                        ex["without_tokens"][0])

    if varied(cfg):
        spread = [r["target"] / r["numel"] for r in summary["layers"]]
        log.info("allocation: %s (normalize %s), layer sparsity from %.4f to %.4f", cfg.prune.allocation
                 if cfg.prune.scope != "global" else "global scope", cfg.prune.normalization, min(spread), max(spread))
    emptied = [r for r in summary["layers"] if r["zeros"] > EMPTIED * r["numel"] and r["pruned"]]
    if emptied:
        worst = max(emptied, key=lambda r: r["zeros"] / r["numel"])
        log.warning("%d layer(s) are more than %d%% zero, which breaks most models (the worst: %s, %.2f%%)%s",
                    len(emptied), round(EMPTIED * 100), worst["name"], 100 * worst["zeros"] / worst["numel"],
                    "; prune.normalize=row spreads a global threshold more evenly" if varied(cfg) else "")


def build(cfg: Config, comm: Comm, loaded: LoadedModel, how: dict, coverage: Coverage, result: PruneResult,
          sent: int, ppl: dict, seconds: dict, device: str, traffic_mark: tuple[int, int], disk_mark: int) -> dict:
    """The report (every rank takes part in its gathers); ``zeroshot`` is filled in at save."""
    # peak resident memory of each rank's process so far (a sweep: over its jobs so far)
    rss = comm.all_gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    # what each rank read of the checkpoint in this job's passes (after its load), received of
    # other ranks' blocks, and read from the disk itself (page-cache misses, the whole job)
    read, received = (a - b for a, b in zip(loaded.stream.traffic(), traffic_mark, strict=True))
    blocks = {"read_bytes_per_rank": comm.all_gather_ints(read),
              "received_bytes_per_rank": comm.all_gather_ints(received),
              "disk_read_bytes_per_rank": comm.all_gather_ints(disk_read_bytes() - disk_mark)}
    return {
        "model": loaded.source,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "device": device,
        "world_size": comm.world_size,
        "model_reused": how["mode"] == "reused",
        "load": how,
        "blocks": blocks,
        "selection_bytes_per_rank": sent,  # statistics (a cache miss) and selection collectives
        "weights": coverage.as_dict(),  # every parameter of the model, by what was done with it
        **result.summary(),
        "perplexity": ppl or None,
        "zeroshot": None,  # filled in once the pruned model is evaluated
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "peak_rss_gib": max(rss),
        "peak_rss_gib_per_rank": rss,
        "seconds": seconds,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }

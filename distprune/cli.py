"""The Hydra app: wires load -> score -> select -> mask -> save. No math lives here."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from distprune import checkpoint, models
from distprune.api import prune
from distprune.config import Config, ConfigError, register_configs
from distprune.dist import SINGLE
from distprune.select import NonFiniteScoreError

log = logging.getLogger("distprune")


@contextmanager
def phase(seconds: dict, name: str):
    t0 = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - t0, 4)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run(cfg: Config) -> dict:
    """Run one pruning job; returns the report. Raises ConfigError on bad input."""
    cfg.check()
    models.check_source(cfg.model)
    out = checkpoint.check_output(cfg.output_dir, cfg.overwrite, models.input_dir(cfg.model))
    device = resolve_device(cfg.device)
    seconds: dict[str, float] = {}

    with phase(seconds, "load"):
        loaded = models.load(cfg.model, device)
        layers = models.prunable_layers(loaded.model, cfg.prune.include, cfg.prune.exclude)
    log.info("load: %s from %s on %s in %.1fs", models.describe(loaded.model, layers), loaded.source,
             device, seconds["load"])

    result = prune(loaded.model, cfg.prune, layers=layers)
    seconds.update({k: round(v, 4) for k, v in result.groups.seconds.items()})
    summary = result.summary()
    log.info("score+select: %s %s scope, selector %s, %d passes in %.2fs", cfg.prune.method, cfg.prune.scope,
             summary["selector"], summary["selector_passes"], seconds["score+select"])
    log.info("mask: pruned %d of %d weights (%.4f, target %.4f) in %.2fs", result.pruned, result.numel,
             summary["pruned_fraction"], cfg.prune.sparsity, seconds["mask"])

    report = {
        "model": loaded.source,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "device": device,
        "world_size": SINGLE.world_size,
        **summary,
        "seconds": seconds,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }
    with checkpoint.atomic_dir(out) as tmp:
        with phase(seconds, "save"):
            if cfg.save:
                checkpoint.write_checkpoint(tmp, loaded.model, loaded.tokenizer, cfg.max_shard_size)
        checkpoint.write_report(tmp, report)
    log.info("save: %s in %.1fs", out if cfg.save else f"report only in {out}", seconds["save"])
    return report


register_configs()


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # top-level conf/ of the checkout


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)
    try:
        run(OmegaConf.to_object(dcfg))
    except (ConfigError, NonFiniteScoreError) as e:
        log.error("%s", e)
        sys.exit(2)

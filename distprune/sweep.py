"""What the jobs of a Hydra multirun sweep share, and where they write.

Hydra runs a sweep's jobs one after another in each process (every rank walks the same
job list). The model is loaded once and restored to its dense weights before each job;
the dense perplexity is computed once. Every job writes into a directory under one sweep
directory, named from the command line so that every rank agrees on it (a timestamp would
not); after every job rank 0 rewrites the summary there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distprune import dist, summarize
from distprune.config import EvalConfig, ModelConfig
from distprune.layers import prunable_layers
from distprune.models import LoadedModel
from distprune.sources import fingerprint
from distprune.stream import move

log = logging.getLogger("distprune")


class SweepModels:
    """The model of the last job of a sweep, so that the next job on the same model loads
    nothing and still starts from the dense weights (never from an already pruned model):
    a streamed model reads its resident weights again, a model in memory keeps a CPU copy
    of its prunable weights."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.loaded: LoadedModel | None = None
        self.dense: dict[str, torch.Tensor] = {}
        self._dense: dict[str, object] = {}  # (what, model, eval settings) -> the dense model's result

    def get(self, cfg: ModelConfig, load: Callable[[], tuple[LoadedModel, dict]], how: list
            ) -> tuple[LoadedModel, dict]:
        """(the model, how it was loaded: {"mode": "reused"} when it was reused with its
        dense weights restored). ``how`` (streaming, what stays in memory) must match too."""
        key = json.dumps([fingerprint(cfg), how], sort_keys=True, default=str)
        if key == self.key and self.loaded is not None:
            model = self.loaded.model
            move(model, "cpu")
            with torch.no_grad():
                if self.loaded.stream.streamed:
                    self.loaded.stream.reload()
                else:
                    for layer in prunable_layers(model):
                        layer.weight.copy_(self.dense[layer.name])
            return self.loaded, {"mode": "reused"}
        self.key, self.loaded, self.dense = None, None, {}  # free the previous model first
        loaded, loaded_how = load()
        if not loaded.stream.streamed:
            self.dense = {layer.name: layer.weight.clone() for layer in prunable_layers(loaded.model)}
        self.key, self.loaded = key, loaded
        return loaded, loaded_how

    def dense_result(self, what: str, model: ModelConfig, evaluation: EvalConfig, compute: Callable[[], Any]
                     ) -> tuple[Any, bool]:
        """(the dense model's ``what`` (perplexity, zeroshot), True when an earlier job
        computed it): the same model and evaluation settings give the same numbers."""
        key = json.dumps([what, fingerprint(model), OmegaConf.to_container(OmegaConf.structured(evaluation))],
                         sort_keys=True, default=str)
        if key in self._dense:
            return self._dense[key], True
        self._dense[key] = compute()
        return self._dense[key], False


MODELS = SweepModels()  # one per process


def _sweep_overrides(argv: list[str]) -> list:
    """The command line's sweep overrides (``a,b``, ``range()``, ``choice()``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    return [o for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()]


def sweep_job_dir(task_overrides: list[str], argv: list[str], num: int) -> str:
    """A sweep job's directory name: the values this job takes of the keys the command line
    sweeps over, e.g. ``prune.method=wanda,prune.sparsity=0.5``. Every rank computes the same."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = {o.key_or_group for o in _sweep_overrides(argv)}
    parts = [f"{o.key_or_group}={o.get_value_element_as_str()}"
             for o in OverridesParser.create().parse_overrides(task_overrides) if o.key_or_group in swept]
    name = ",".join(parts).replace("/", "_")
    if len(name) > 150:  # file names stop at 255 bytes: long paths as values
        name = f"job{num}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return name or f"job{num}"


def sweep_name(model_name: str, argv: list[str]) -> str:
    """The sweep directory's name: the model's name, or the swept models' names joined by
    '+' when the command line sweeps over models: the same for every job and rank."""
    names = [basename(v) for o in _sweep_overrides(argv) if o.key_or_group in ("model", "model.name", "model.path")
             for v in o.sweep_string_iterator()]
    joined = "+".join(dict.fromkeys(names))
    return model_name if not names else joined if len(joined) <= 100 else f"{len(names)}-models"


def basename(path: str) -> str:
    """meta-llama/Llama-2-7b-hf -> Llama-2-7b-hf; /models/x.gguf -> x."""
    p = Path(str(path).rstrip("/"))
    return p.stem if p.suffix == ".gguf" else p.name


# conf/config.yaml: hydra.sweep.dir: sweeps/${distprune_sweep_name:${model.name}} and
# hydra.sweep.subdir: ${distprune_job_dir:${hydra:overrides.task},${hydra:job.num}}
OmegaConf.register_new_resolver("distprune_sweep_name", lambda name: sweep_name(name, sys.argv[1:]), replace=True)
OmegaConf.register_new_resolver("distprune_job_dir", lambda task, num: sweep_job_dir(list(task), sys.argv[1:], num),
                                replace=True)
# conf/model/hf.yaml: name: ${distprune_basename:${.path}}, e.g. Llama-2-7b-hf for meta-llama/Llama-2-7b-hf
OmegaConf.register_new_resolver("distprune_basename", basename, replace=True)
# conf/model/smollm2-135m.yaml: name: ${distprune_name:smollm2-135m,${.path}}: model.path=DIR without
# model=hf is that HF model, named after DIR (outputs/DIR-...), not after the default preset
OmegaConf.register_new_resolver("distprune_name", lambda preset, path: basename(path) if path else preset,
                                replace=True)
# conf/config.yaml: output_dir names the scope, and N:M's group size (nm4, nm8): 2:4 and 4:8 differ
OmegaConf.register_new_resolver("distprune_scope", lambda scope, m: f"nm{m}" if scope == "nm" else scope,
                                replace=True)
# conf/config.yaml: output_dir names a refit (outputs/smollm2-135m-wanda-refit-row-0.5): it is another model
OmegaConf.register_new_resolver("distprune_refit", lambda refit: "-refit" if refit else "", replace=True)


JOB_PARENTS: list[Path] = []  # where this process's sweep jobs wrote, for the summary at its end


class SweepEnd(Callback):
    """Rank 0 keeps summary.csv/md/png (``distprune.summarize``) current in the directory
    that holds the job directories: rewritten after every job, so a sweep that stops early
    (a failing job, Ctrl-C) still has the summary of the jobs that finished. At the end of
    the sweep it is logged, and the process group ends."""

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        self._summarize(final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._summarize(final=True)
        dist.shutdown()

    @staticmethod
    def _summarize(final: bool) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        for parent in dict.fromkeys(JOB_PARENTS):
            try:
                table = summarize.write(parent)
            except FileNotFoundError as e:  # no job has finished yet
                if final:
                    log.warning("no summary: %s", e)
                continue
            except Exception as e:  # e.g. an unreadable report from an earlier sweep: never stop this one
                log.warning("summary of %s not written: %s: %s", parent, type(e).__name__, e)
                continue
            if final:
                log.info("summary: %d jobs in %s/summary.csv, summary.md%s", len(table), parent,
                         ", summary.png" if (parent / "summary.png").exists() else "")

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        dist.shutdown()


def job_output_dir(output_dir: str, hc) -> str:
    """A sweep job's output directory: the one Hydra made for it under the sweep directory,
    unless the command line sets output_dir (then Hydra's, left empty, is removed).
    Remembered for the summary at the end of the sweep."""
    if not any(o.split("=", 1)[0].lstrip("+~") == "output_dir" for o in hc.overrides.task):
        output_dir = str(Path(hc.sweep.dir) / hc.sweep.subdir)
    elif Path(hc.runtime.output_dir).resolve() != Path(output_dir).expanduser().resolve():
        with contextlib.suppress(OSError):
            Path(hc.runtime.output_dir).rmdir()
    JOB_PARENTS.append(Path(output_dir).expanduser().resolve().parent)
    return output_dir

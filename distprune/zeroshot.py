"""Zero-shot (or few-shot) accuracy through lm-evaluation-harness (``lm_eval``, the extra
``distprune[eval]``): its ``HFLM`` wraps the model already in memory, nothing is reloaded.

Where it runs (cli.py): on rank 0 only, the other ranks waiting. lm-eval's own
data-parallel mode needs ``accelerate launch`` and a model it loads itself; a pruned model
lives in distprune's ranks, so rank 0 gathers it: a model in memory gets every pruned
weight from its owner; a streamed model, whole on no rank, is evaluated from the written
checkpoint (pruned) and from a full load of the input (dense) on rank 0.

Standard tasks (arc_easy, hellaswag, ...) download their datasets from the Hugging Face
hub on first use; ``eval.task_path=DIR`` adds the user's own YAML tasks, which may read
local files (``dataset_path: json``), as the tests do.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from distprune import models
from distprune.config import EvalConfig, ModelConfig
from distprune.errors import ConfigError
from distprune.stream import move

log = logging.getLogger("distprune")

METRICS = ("acc", "acc_norm")  # what the report keeps of each task, where the task has it
INSTALL = "pip install 'distprune[eval]' (lm-evaluation-harness)"


@contextmanager
def _quiet():
    """lm-eval logs every request batch and warns that it was handed a model object (as
    intended here), and asks git for the working directory's commit (git prints "fatal"
    outside a repository): only its errors reach distprune's log."""
    import lm_eval.evaluator

    logger, commit = logging.getLogger("lm_eval"), lm_eval.evaluator.get_git_commit_hash
    level = logger.level
    logger.setLevel(logging.ERROR)
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(level)
        lm_eval.evaluator.get_git_commit_hash = commit


@functools.lru_cache(maxsize=4)
def _index(task_path: str | None, defaults: bool):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"eval.tasks needs lm-evaluation-harness, which is not installed: {INSTALL}") from e
    with _quiet():
        return TaskManager(include_path=task_path, include_defaults=defaults)


def task_manager(tasks: list[str], task_path: str | None):
    """lm-eval's index of the tasks under task_path, and of its own only when a task is
    not there (reading its thousands of YAML files takes seconds; once a process)."""
    if task_path is not None:
        if not Path(task_path).expanduser().is_dir():
            raise ConfigError(f"eval.task_path={task_path!r} is not a directory")
        task_path = str(Path(task_path).expanduser().resolve())
        own = _index(task_path, False)
        if all(t in own.all_tasks for t in tasks):
            return own
    return _index(task_path, True)


def check(tasks: list[str], task_path: str | None) -> None:
    """Before anything is loaded: lm-eval is installed and knows every task."""
    if not tasks:
        return
    known = set(task_manager(tasks, task_path).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(f"eval.tasks: lm-eval knows no task {', '.join(unknown)} (its tasks: `lm_eval ls tasks`; "
                          "eval.task_path=DIR adds YAML tasks)")


def evaluate(model: nn.Module, tokenizer, tasks: list[str], task_path: str | None, num_fewshot: int,
             limit: int | None, batch_size: int) -> dict[str, dict[str, float]]:
    """{task: {"acc": ..., "acc_norm": ...}} of the model (on the device it is on)."""
    if tokenizer is None:
        raise ConfigError("eval.tasks needs a tokenizer; this model has none")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, task_path)
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, bootstrap_iters=0, log_samples=False)
        except OSError as e:  # a task's dataset: not on the hub, or the hub not reachable
            raise ConfigError(f"eval.tasks: a task's data cannot be loaded: {str(e).splitlines()[0]}") from e
    results = {}
    for task in tasks:
        got = out["results"][task]
        results[task] = {m: float(got[f"{m},none"]) for m in METRICS if f"{m},none" in got}
    return results


def mean_acc(results: dict[str, dict[str, float]]) -> float | None:
    """The mean of the tasks' plain accuracy (acc), as the pruning papers average their
    zero-shot tables; None when no task reports acc."""
    accs = [r["acc"] for r in results.values() if "acc" in r]
    return sum(accs) / len(accs) if accs else None


def on_device(model: nn.Module, tokenizer, ev: EvalConfig, device: str) -> dict[str, dict[str, float]]:
    """``evaluate`` with the settings of ``ev`` on a whole model, moved to the device and back."""
    move(model, device)
    try:
        return evaluate(model, tokenizer, ev.tasks, ev.task_path, ev.num_fewshot, ev.limit, ev.batch_size)
    finally:
        move(model, "cpu")


def from_checkpoint(model_cfg: ModelConfig, ev: EvalConfig, device: str) -> dict[str, dict[str, float]]:
    """``on_device`` for a checkpoint loaded in full for the purpose (a streamed model is
    whole on no rank)."""
    loaded = models.load(model_cfg, "cpu")
    return on_device(loaded.model, loaded.tokenizer, ev, device)


def report(scores: dict[str, dict[str, dict[str, float]]]) -> dict:
    """The report's ``zeroshot``: each model's (dense, pruned) accuracies and their means."""
    return {**scores, "mean_acc": {k: mean_acc(v) for k, v in scores.items()}}


def log_scores(scores: dict[str, dict[str, dict[str, float]]], seconds: float) -> None:
    """A line per task with each model's accuracies, and one with the means."""
    for task in next(iter(scores.values())):
        log.info("zeroshot: %s %s", task, ", ".join(f"{which} {' '.join(f'{m} {v:.4f}' for m, v in got[task].items())}"
                                                      for which, got in scores.items()))
    means = {which: mean_acc(got) for which, got in scores.items()}
    log.info("zeroshot: mean acc %s in %.1fs", ", ".join(f"{k} {v:.4f}" for k, v in means.items() if v is not None),
             seconds)

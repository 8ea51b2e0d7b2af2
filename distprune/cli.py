"""The Hydra app: the command line of ``python -m distprune`` and ``distprune-eval``, its
settings, its logging, and its errors in one line with their exit codes. The jobs it runs
are in job.py."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from distprune import (
    dist,
    sweep,
)
from distprune.config import ConfigError, register_configs
from distprune.dist import SINGLE, Comm
from distprune.job import STAGE, run, run_eval
from distprune.select import NonFiniteScoreError

log = logging.getLogger("distprune")

register_configs()


def conf_dir() -> str:
    """The Hydra configs: distprune/conf, where an installed wheel carries a copy of conf/
    (pyproject.toml), or else conf/ of the checkout (an editable install, the tests)."""
    here = Path(__file__).resolve().parent
    return str(next((d for d in (here / "conf", here.parent / "conf") if (d / "config.yaml").is_file()),
                    here / "conf"))


CONF_DIR = conf_dir()


def setup_logging(comm: Comm) -> None:
    """Rank 0 logs progress; other ranks only warnings and errors, tagged with their rank."""
    tag = f" rank {comm.rank}" if comm.world_size > 1 else ""
    logging.basicConfig(level=logging.INFO if comm.is_main else logging.WARNING, stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(name)s{tag} %(levelname)s: %(message)s")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig) -> None:
    dist.exit_on_sigterm()
    try:
        dist.check_device(dcfg.device)
    except ConfigError as e:
        tag = f" rank {os.environ.get('RANK', '0')}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"distprune{tag}: error: {e}", file=sys.stderr)
        sys.exit(2)
    comm = dist.init(device=dcfg.device)
    setup_logging(comm)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    cfg = OmegaConf.to_object(dcfg)
    if multirun:
        cfg.output_dir = sweep.job_output_dir(cfg.output_dir, hc)
        if hc.job.num == 0:  # Hydra announces the first job before this process's logging is set up
            log.info("\t#0 : %s", " ".join(hc.overrides.task))
    try:
        run(cfg, comm, sweep.MODELS if multirun else None)
    except BaseException as e:
        dist.exiting()
        if multirun:  # the job directory Hydra made, unless a complete earlier output is in it
            with contextlib.suppress(OSError):
                Path(hc.runtime.output_dir).rmdir()
        line = str(e) if isinstance(e, (ConfigError, NonFiniteScoreError)) else failure_line(e)
        if line is not None:
            dist.report_failure(comm, line)
            log.error("%s", line)
            sys.exit(2)
        if not isinstance(e, Exception):
            raise
        peer = dist.failed_peer(comm) if isinstance(e, RuntimeError) else None
        if peer is not None:  # a collective failed because that rank is gone: one line, no transport traceback
            log.error("rank %d of %d stops: %s", comm.rank, comm.world_size, peer)
            sys.exit(1)
        # name the failing rank; under a launcher end this process (even mid-sweep, where Hydra
        # would go on to the next job out of step with the other ranks): the launcher ends them
        dist.report_failure(comm, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        log.error("rank %d of %d failed: %s: %s", comm.rank, comm.world_size, type(e).__name__, e,
                  exc_info=comm.world_size > 1)
        if comm.world_size > 1:
            sys.exit(1)
        raise


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def failure_line(e: BaseException) -> str | None:
    """One line for a failure of the machine rather than of distprune (exit code 2): a disk
    that is full or read-only (the path, and the bytes free), memory that ran out (what was
    being done, and what helps); None for anything else (a bug: its traceback)."""
    if isinstance(e, OSError) and e.errno in DISK_ERRORS:
        where = e.filename or "a file"
        free = ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename:
            parent = next((p for p in Path(e.filename).parents if p.exists()), None)
            free = f" ({shutil.disk_usage(parent).free} bytes free there)" if parent is not None else ""
        return f"cannot write {where}: {e.strerror}{free}"
    memory = isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))
    if memory:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        return (f"out of memory while {STAGE[0]} ({detail}): run more ranks (torchrun --nproc_per_node N), each "
                "holding its shard, or keep model.stream=true, or use a smaller calib.batch_size")
    return None


def _one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's errors in one line: the first line of the error and of its
    cause (e.g. "Error merging override prune.sparsity=abc: Value 'abc' of type 'str'
    could not be converted to Float"); a missing preset also lists the group's options."""
    from hydra.errors import MissingConfigException

    lines = [str(x).strip().splitlines()[0] for x in (e, e.__cause__) if x is not None and str(x).strip()]
    if isinstance(e, MissingConfigException) and e.options:
        lines.append(f"options: {', '.join(e.options)}")
    return ": ".join(dict.fromkeys(lines)) or type(e).__name__


HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve", "--package", "-p", "--run",
               "-r", "--multirun", "-m", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun", "--info", "-i")
# the flags of the Wanda and SparseGPT scripts, and what they are here
FLAG_HINTS = {"--model": "model=hf model.path=...", "--sparsity_ratio": "prune.sparsity=...",
              "--sparsity": "prune.sparsity=...", "--prune_method": "prune.method=...",
              "--sparsity_type": "prune.scope=nm prune.m=4 (2:4), prune.m=8 (4:8)", "--nsamples": "calib.nsamples=...",
              "--seed": "calib.seed=...", "--save_model": "output_dir=...", "--save": "output_dir=...",
              "--device": "device=...", "--blocksize": "prune.blocksize=...", "--percdamp": "prune.percdamp=..."}


def flag_error(argv: list[str]) -> str | None:
    """One line for ``--key value`` flags (distprune takes ``key=value``), with what the
    common flags of the reference scripts are called here."""
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("-") and a.split("=", 1)[0] not in HYDRA_FLAGS]
    if not flags:
        return None
    hints = [f"{f} -> {FLAG_HINTS[f]}" for f in flags if f in FLAG_HINTS]
    return (f"unknown option {flags[0]}: distprune takes key=value settings"
            + (f" ({'; '.join(hints)})" if hints else " (e.g. prune.sparsity=0.5; every key: --cfg job --resolve)"))


def entry(app: Callable[[], None]) -> None:
    """What ``python -m distprune`` (and ``distprune.eval``) run: the Hydra app, with bad
    settings that Hydra itself rejects (a value of the wrong type, an unknown key or
    preset, an unparsable override) reported in one line with exit code 2, like the
    settings distprune checks, and Ctrl-C in one line per process with exit code 130.
    HYDRA_FULL_ERROR=1 keeps Hydra's full tracebacks."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them and exiting 1
    tag = f" rank {os.environ.get('RANK', '0')}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    bad_flags = flag_error(sys.argv[1:])
    if bad_flags:
        print(f"distprune{tag}: error: {bad_flags}", file=sys.stderr)
        sys.exit(2)
    try:
        app()
    except KeyboardInterrupt:
        print(f"distprune{tag}: interrupted", file=sys.stderr)
        sys.exit(130)
    except dist.Terminated:
        print(f"distprune{tag}: terminated (SIGTERM)", file=sys.stderr)
        sys.exit(143)
    except (HydraException, OmegaConfBaseException) as e:
        if full:
            raise
        print(f"distprune{tag}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)



@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def eval_main(dcfg: DictConfig) -> None:
    setup_logging(SINGLE)
    try:
        run_eval(OmegaConf.to_object(dcfg))
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)


def console() -> None:
    """The ``distprune`` command (pyproject's [project.scripts]): ``python -m distprune``."""
    entry(main)


def console_eval() -> None:
    """The ``distprune-eval`` command: ``python -m distprune.eval``."""
    entry(eval_main)


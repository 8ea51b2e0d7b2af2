"""The output directory: checked before any work, written into a temporary directory
beside it, and renamed into place only when complete."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from distprune.config import ConfigError
from distprune.dist import SINGLE, Comm
from distprune.models import tie_groups

log = logging.getLogger("distprune")

REPORT = "distprune_report.json"
UMASK = os.umask(0o022)  # read it (umask can only be read by setting it)...
os.umask(UMASK)  # ...and put it back


def check_output(output_dir: str, overwrite: bool, input_dir: Path | None) -> Path:
    """Refuse an output_dir that is a file, is non-empty (unless overwrite), or would
    replace the input model."""
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={output_dir!r} is a file, not a directory")
    if input_dir is not None:
        inp = Path(input_dir).expanduser().resolve()
        if out == inp or out in inp.parents:
            raise ConfigError(f"output_dir={output_dir!r} would replace the input model {str(inp)!r}")
        if inp in out.parents:
            raise ConfigError(f"output_dir={output_dir!r} lies inside the input model's directory {str(inp)!r}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir={output_dir!r} is not empty; pass overwrite=true to replace it")
    for parent in out.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output_dir={output_dir!r} lies under a file: {str(parent)!r}")
            break
    return out


def _temp_name(out: Path, kind: str, token: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{token}")


def owner_token() -> str:
    """host-pid of this process: names its temporary directories, so that a later run can
    tell whether their owner is gone (same host, no such process)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _owner_alive(token: str) -> bool:
    host, _, pid = token.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's (a shared file system): not ours to judge
    try:
        os.kill(int(pid), 0)  # PermissionError: it exists, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary directories beside out that a run killed before it could clean
    up left behind (their owner process on this host is gone); returns them."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            token = p.name.removeprefix(f".{out.name}.{kind}-")
            if p.is_dir() and not _owner_alive(token):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


class OutputExistsError(ConfigError):
    """output_dir was filled by someone else while this job ran."""


@contextmanager
def atomic_dir(out: Path, comm: Comm = SINGLE, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside out that every rank writes into; when all ranks
    are done rank 0 renames it into place. Without overwrite the rename itself refuses a
    non-empty out (rename(2) replaces only an empty directory), so a job that filled out
    meanwhile is never replaced: OutputExistsError on every rank. On any error or signal
    every rank removes the temporary directory (whoever gets there first) and out is left
    as it was."""
    token = comm.all_gather_objects(owner_token())[0]  # rank 0's: one name on every rank
    tmp = _temp_name(out, "tmp", token)
    if comm.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        for p in remove_stale(out):
            log.warning("removed %s, left by a run that was killed", p)
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from an earlier job
        tmp.mkdir()
    comm.barrier()
    try:
        yield tmp
        comm.barrier()  # every rank has written its files
        refused = 0
        if comm.is_main:
            refused = int(not _publish(tmp, out, overwrite, token))
        if comm.broadcast_int(refused):
            raise OutputExistsError(f"output_dir={str(out)!r} was filled by another job while this one ran; "
                                    "nothing replaced (pass overwrite=true to replace it)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # every rank: rank 0 may be the one that died
        raise


def _publish(tmp: Path, out: Path, overwrite: bool, token: str) -> bool:
    """Rename tmp to out; False when out is a non-empty directory and overwrite is off."""
    if overwrite and out.exists():
        old = _temp_name(out, "old", token)
        out.rename(old)  # two renames: out is never missing a complete version for long
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return True
    try:
        os.rename(tmp, out)  # atomic; replaces an empty directory, never a non-empty one
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _size_bytes(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (lm_head tied to the embeddings): the first
    name of each tensor stays, as Hugging Face does; loading re-ties the rest. Tensors
    this rank did not load stay on the meta device: only their size is used."""
    first = {group[0] for group in tie_groups(model)}
    return {k: t for k, t in model.state_dict().items() if k in first}


def shard_plan(state: dict[str, torch.Tensor], parts: list[list[str]], max_shard_size: str
               ) -> list[tuple[int, list[str]]]:
    """[(rank, tensor names)] per output file, the same on every rank: rank r writes the
    prunable weights it owns (parts[r], module names); rank 0 also writes every other
    tensor. Files never exceed max_shard_size unless one tensor does."""
    limit = _size_bytes(max_shard_size)
    owned = {f"{name}.weight" for part in parts for name in part}
    plan = []
    for rank, part in enumerate(parts):
        keys = [f"{name}.weight" for name in part]
        if rank == 0:
            keys = [k for k in state if k not in owned] + keys
        chunk, size = [], 0
        for k in keys:
            nbytes = state[k].numel() * state[k].element_size()
            if chunk and size + nbytes > limit:
                plan.append((rank, chunk))
                chunk, size = [], 0
            chunk.append(k)
            size += nbytes
        if chunk:
            plan.append((rank, chunk))
    return plan


def write_checkpoint(directory: Path, model: nn.Module, tokenizer, max_shard_size: str,
                     parts: list[list[str]] | None = None, comm: Comm = SINGLE) -> None:
    """A Hugging Face checkpoint written by all ranks at once: each rank writes the
    safetensors files of its own layers; rank 0 writes the other tensors, the index,
    config, generation config and tokenizer."""
    parts = parts if parts is not None else [[]]
    state = _unique_state_dict(model)
    plan = shard_plan(state, parts, max_shard_size)
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    for (rank, keys), name in zip(plan, names, strict=True):
        if rank == comm.rank:
            save_file({k: state[k].detach().contiguous().cpu() for k in keys}, directory / name,
                      metadata={"format": "pt"})
            os.chmod(directory / name, 0o666 & ~UMASK)  # safetensors creates 0600; the JSON files get the umask
    if not comm.is_main:
        return
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for (_, keys), name in zip(plan, names, strict=True) for k in keys}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_report(directory: Path, report: dict) -> None:
    (directory / REPORT).write_text(json.dumps(report, indent=2) + "\n")

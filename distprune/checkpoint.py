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

from distprune.dist import SINGLE, Comm
from distprune.errors import ConfigError

log = logging.getLogger("distprune")

REPORT = "distprune_report.json"


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


def write_report(directory: Path, report: dict) -> None:
    (directory / REPORT).write_text(json.dumps(report, indent=2) + "\n")

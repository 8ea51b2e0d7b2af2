"""The output directory: checked before any work, written into a temporary directory
beside it, and renamed into place only when complete."""

from __future__ import annotations

import contextlib
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


def check_output(output_dir: str, overwrite: bool, input_dir: Path | None, needs: int | None = None) -> Path:
    """Refuse, before any work, an output_dir that is a file, is non-empty (unless
    overwrite), would replace the input model, is a mount point (the publishing rename
    cannot replace it), lies where this process cannot write (a read-only file system,
    /proc: a probe file), or on a file system without room for ``needs`` bytes. A publish
    that a crash interrupted between its two renames is repaired first (``repair``)."""
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={output_dir!r} is a file, not a directory")
    if input_dir is not None:
        inp = Path(input_dir).expanduser().resolve()
        if out == inp or out in inp.parents:
            raise ConfigError(f"output_dir={output_dir!r} would replace the input model {str(inp)!r}")
        if inp in out.parents:
            raise ConfigError(f"output_dir={output_dir!r} lies inside the input model's directory {str(inp)!r}")
    repair(out)
    if out.is_dir() and os.path.ismount(out):
        raise ConfigError(f"output_dir={output_dir!r} is a mount point: distprune writes beside it and renames the "
                          f"result into place, which a mount point refuses; pass a directory inside it "
                          f"(output_dir={str(out / 'pruned')!r})")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir={output_dir!r} is not empty; pass overwrite=true to replace it")
    parent = next(p for p in out.parents if p.exists())  # where the temporary directory goes (or its parents)
    if not parent.is_dir():
        raise ConfigError(f"output_dir={output_dir!r} lies under a file: {str(parent)!r}")
    probe = parent / f".distprune-probe-{owner_token()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir={output_dir!r}: cannot write in {str(parent)!r} ({e.strerror})") from e
    free = shutil.disk_usage(parent).free
    if needs is not None and needs > free:
        raise ConfigError(f"output_dir={output_dir!r}: the checkpoint needs about {needs / 1e9:.2f} GB and "
                          f"{str(parent)!r} has {free / 1e9:.2f} GB free")
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


def _dead_owner(p: Path, out: Path, kind: str) -> bool:
    return p.is_dir() and not _owner_alive(p.name.removeprefix(f".{out.name}.{kind}-"))


def repair(out: Path) -> Path | None:
    """A publish with overwrite renames the old output away (``.<name>.old-<owner>``) and the
    new one into place: when a crash came between the two (output_dir missing, the owner
    gone), the old result is renamed back, never deleted. Returns what was restored."""
    if out.exists() or not out.parent.is_dir():
        return None
    for p in sorted(out.parent.glob(f".{out.name}.old-*")):
        if _dead_owner(p, out, "old"):
            with contextlib.suppress(OSError):  # another rank of the same job got there first
                p.rename(out)
                log.warning("restored %s from %s, left by a run that was killed while publishing", out, p.name)
                return p
    return None


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary directories beside out that a run killed before it could clean
    up left behind (their owner process on this host is gone); returns them. An old output
    is removed only once output_dir holds a complete one (``check_output`` has ``repair``ed
    an interrupted publish before)."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            if _dead_owner(p, out, kind) and (kind == "tmp" or out.exists()):
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

"""Files of the distprune cache (calibration statistics, sampled windows) that can be
trusted. Each is a safetensors file whose metadata records what it was made for (the
fields of its key: model, settings) and a SHA-256 of its content (names, dtypes, shapes,
bytes); it is written to a temporary file of this process, fsynced and renamed into place.

Reading is all or nothing: a file that is missing, cut short, unreadable, made for other
fields, of other tensors, shapes or dtypes than expected, or whose checksum fails is a miss
(``read`` returns None, with one warning naming the file), so the caller recomputes and
replaces it. A cache that cannot be written (read-only, full) is one warning, never a
failure: no result depends on the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from distprune.writer import save_tensors

log = logging.getLogger("distprune")


def cache_dir() -> Path:
    return Path(os.environ.get("DISTPRUNE_CACHE", Path.home() / ".cache" / "distprune"))


Expect = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor name -> (shape, dtype)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _fields(fields: dict) -> str:
    return json.dumps(fields, sort_keys=True, default=str)


def write(path: Path, tensors: dict[str, torch.Tensor], fields: dict) -> bool:
    """Write tensors with their fields and checksum; True when the file is in place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        save_tensors(cpu, tmp, {"distprune": _fields(fields), "sha256": checksum(cpu)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cache: cannot write %s (%s); the job goes on without it", path, e.strerror or e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    return True


def read(path: Path, fields: dict, expect: Expect) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file made for ``fields``, exactly the ``expect``ed ones; None
    (a miss) otherwise, with a warning when the file is there but cannot be used."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for cut and damaged files
        return _miss(path, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if meta.get("distprune") != _fields(fields):
        return _miss(path, "made for other settings")
    if set(tensors) != set(expect):
        return _miss(path, f"it holds {len(tensors)} tensors, not the {len(expect)} expected")
    for name, (shape, dtype) in expect.items():
        if tuple(tensors[name].shape) != tuple(shape) or tensors[name].dtype != dtype:
            return _miss(path, f"it holds {name} as {tuple(tensors[name].shape)} {tensors[name].dtype}, not "
                               f"{tuple(shape)} {dtype}")
    if meta.get("sha256") != checksum(tensors):
        return _miss(path, "damaged: its checksum fails")
    return tensors


def _miss(path: Path, why: str) -> None:
    log.warning("cache: %s cannot be used (%s); computing it again", path, why)
    return None

"""The output directory: checked before any work, written into a temporary directory
beside it, and renamed into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from distprune.config import ConfigError

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
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir={output_dir!r} is not empty; pass overwrite=true to replace it")
    for parent in out.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output_dir={output_dir!r} lies under a file: {str(parent)!r}")
            break
    return out


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside out; on success it replaces out, on error it
    is removed and out is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)  # two renames: out is never missing a complete version for long
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_checkpoint(directory: Path, model: nn.Module, tokenizer, max_shard_size: str) -> None:
    """A Hugging Face checkpoint: safetensors shards (+ index), config, generation config,
    tokenizer."""
    model.save_pretrained(directory, max_shard_size=max_shard_size, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_report(directory: Path, report: dict) -> None:
    (directory / REPORT).write_text(json.dumps(report, indent=2) + "\n")

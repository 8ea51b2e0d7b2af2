"""Whether a checkpoint holds exactly the model its config describes: every parameter and
persistent buffer once, with the right shape and kind of dtype, and no tensor the model does
not use. A weight that is missing must never be random-initialised, and an extra one must
never be dropped without a word.

A streamed load checks the safetensors headers against the model built on the meta device,
before any weight is read (``stream.Streamed.mismatches``, in ``models.load_streamed``). Every
other load (GGUF, ``.bin``, a layout that only from_pretrained converts, ``model.stream=false``)
checks from_pretrained's loading report right after the load, before any other work
(``check_loading_info``). Both fail with one line: ``ConfigError`` naming the first offenders
and their count.

Names that may be in a checkpoint and are not used (``UNUSED``, and the model class's own
``_keys_to_ignore_on_load_unexpected``): rotary inverse-frequency tables and causal-mask
buffers that old versions of transformers saved. They are counted in the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from distprune.errors import ConfigError

log = logging.getLogger(__name__)

# checkpoint tensors known to be unused: computed at construction, or masks that older
# transformers versions stored (regular expressions, searched in the name)
UNUSED = (r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)attn\.masked_bias$", r"(^|\.)attention\.masked_bias$")
SHOWN = 3  # offenders named in the message


def unused_patterns(model: nn.Module) -> list[str]:
    return [*UNUSED, *(getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or [])]


def split_ignored(model: nn.Module, keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """(keys that are unused by mistake, keys known to be unused)."""
    patterns = unused_patterns(model)
    bad, known = [], []
    for k in keys:
        (known if any(re.search(p, k) for p in patterns) else bad).append(k)
    return bad, known


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return f"{shown}{f' and {len(keys) - SHOWN} more' if len(keys) > SHOWN else ''}"


def blocks_on_disk(keys: Iterable[str], prefix: str) -> set[int]:
    """Indices of the decoder blocks that checkpoint names ``keys`` hold (prefix.N.)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pattern.match(k))}


def mismatch(source: str, missing: list[str], unused: list[str], wrong: list[str], blocks: int | None = None,
             on_disk: set[int] | None = None) -> ConfigError | None:
    """The one-line error for a checkpoint that does not hold its config's model, or None.
    ``blocks``/``on_disk``: the config's block count and the blocks the checkpoint holds."""
    if not (missing or unused or wrong):
        return None
    parts = []
    if blocks is not None and on_disk and len(on_disk) != blocks:
        parts.append(f"config.json says {blocks} decoder blocks, the checkpoint holds {len(on_disk)}")
    if missing:
        parts.append(f"{len(missing)} model tensor(s) missing from it ({_names(missing)})")
    if unused:
        hint = ""
        if any(k.endswith(("_blocks", "_scales")) for k in unused):
            hint = " (tensors named *_blocks/*_scales are MXFP4-quantized: config.json lacks its quantization_config)"
        parts.append(f"{len(unused)} checkpoint tensor(s) the model does not use ({_names(unused)}){hint}")
    if wrong:
        parts.append(f"{len(wrong)} of another shape or dtype ({_names(wrong)})")
    return ConfigError(f"checkpoint {source!r} does not match its config: {'; '.join(parts)}")


def dtype_kind(dtype: torch.dtype) -> str:
    return "float" if dtype.is_floating_point else "bool" if dtype == torch.bool else "int"


def check_loading_info(source: str, model: nn.Module, info: dict) -> None:
    """Refuse what from_pretrained reported: missing keys (it random-initialised them),
    unexpected keys (it dropped them) and mismatched shapes."""
    unused, known = split_ignored(model, sorted(info.get("unexpected_keys") or []))
    if known:
        log.info("%s: %d checkpoint tensor(s) known to be unused, ignored (%s)", source, len(known), _names(known))
    wrong = sorted(str(m[0] if isinstance(m, tuple) else m) for m in info.get("mismatched_keys") or [])
    error = mismatch(source, sorted(info.get("missing_keys") or []), unused, wrong)
    if error is not None:
        raise error


def conversion_error(source: str, report: list[str], error: Exception) -> ConfigError:
    """One line for a checkpoint whose tensors from_pretrained's conversion could not map
    onto the model (experts under other names, or stacked another way): the model tensors
    it names in its report."""
    targets = sorted({m for line in report for m in re.findall(r"destined for (\S+?)\.? ", line + " ")})
    what = f"{len(targets)} model tensor(s) it cannot make from the checkpoint's ({_names(targets)})" if targets \
        else str(error).splitlines()[0]
    return ConfigError(f"checkpoint {source!r} does not match its config: transformers' conversion fails: {what}")

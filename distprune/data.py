"""Token windows for calibration and evaluation: from text files or folders, Hugging Face
datasets (named presets, when the hub is reachable), or text sampled from the model itself."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from distprune.errors import ConfigError
from distprune.progress import progress

log = logging.getLogger(__name__)

# name -> (dataset, config, split for calibration, split for evaluation, text field)
PRESETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
}
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def check_source(source: str, key: str) -> None:
    """Fail fast, before any model loads, on a text source that cannot exist."""
    if source in ("self", "random") and key == "calib.source":
        return
    if source not in PRESETS and not Path(source).expanduser().exists():
        group = key.split(".")[0]
        presets = ["self", "wikitext2-local", *PRESETS] if group == "calib" else ["wikitext2-local", *PRESETS]
        hint = ""
        if Path(source).parent.name == "wikitext-2":  # what calib/eval=wikitext2-local point at
            hint = (f" ({group}=wikitext2-local reads $DISTPRUNE_DATA/wikitext-2/{Path(source).name}; "
                    "set DISTPRUNE_DATA to the folder that holds wikitext-2/)")
        raise ConfigError(f"{key}={source!r} does not exist{hint}; give a text file or folder, or a preset: "
                          + ", ".join(f"{group}={p}" for p in presets))


def read_text(source: str, key: str, split: str = "calib") -> str:
    """All text of a file, a folder of .txt files (sorted), or a preset dataset split."""
    if source in PRESETS:
        return _preset_text(source, key, split)
    check_source(source, key)
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise ConfigError(f"{key}={source!r} is a folder without .txt files")
        text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    else:
        text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ConfigError(f"{key}={source!r} holds no text")
    return text


def _preset_text(name: str, key: str, split: str) -> str:
    dataset, config, calib_split, eval_split, field = PRESETS[name]
    split = calib_split if split == "calib" else eval_split
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{key}={name} needs the datasets package (pip install datasets) and the hub") from None
    try:
        if name == "c4":  # one shard, as the Wanda and SparseGPT code do
            ds = datasets.load_dataset(dataset, data_files={split: C4_FILES[split]}, split=split)
        else:
            ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # network, hub or cache errors all mean: not reachable here
        raise ConfigError(f"{key}={name}: dataset {dataset} is not reachable ({type(e).__name__})") from e
    return "\n\n".join(ds[field][:20000] if name == "c4" else ds[field])


_TOKENS: dict[str, torch.Tensor] = {}  # a text's tokens by (tokenizer, text): a sweep's jobs tokenize once


def tokenize(tokenizer, text: str, key: str = "calib.source") -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (kept for the next call with the same
    tokenizer and text: each job of a sweep checks its windows before loading)."""
    if tokenizer is None:
        hint = " (use calib.source=self)" if key.startswith("calib") else ""
        raise ConfigError(f"{key} is text, which needs a tokenizer; this model has none{hint}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    memo = hashlib.sha256(f"{type(tokenizer).__name__}\0{identity}\0{text}".encode()).hexdigest()
    if memo not in _TOKENS:
        if len(_TOKENS) >= 4:
            _TOKENS.clear()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        _TOKENS[memo] = torch.tensor(ids, dtype=torch.long, device="cpu")
    return _TOKENS[memo]


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, key: str) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random offsets, reproducible from seed: (nsamples, seqlen)."""
    if tokens.numel() < nsamples * seqlen:
        raise ConfigError(f"{key} has {tokens.numel()} tokens, too few for {nsamples} windows of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=g, device="cpu")
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def sequential_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None, key: str) -> torch.Tensor:
    """Non-overlapping windows from the start of the text: (windows, seqlen)."""
    count = tokens.numel() // seqlen
    if count == 0:
        raise ConfigError(f"{key} has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows:
        count = min(count, max_windows)
    return tokens[: count * seqlen].view(count, seqlen)


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (batch, vocab), drawn from that distribution: the first
    index whose cumulative probability exceeds a uniform draw (float64 sums). One uniform
    number per row: torch.multinomial draws one exponential per vocabulary entry, 18% of
    a CPU sampling step for a 49k vocabulary."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(model: nn.Module, prompt: torch.Tensor, steps: int, pick=inverse_cdf, show: bool = True) -> torch.Tensor:
    """prompt (batch, t) followed by ``steps`` tokens, each drawn by ``pick`` from the
    model's next-token distribution (temperature 1, no top-k or top-p), with a KV cache:
    one forward of one token per step. (batch, t + steps)."""
    import inspect

    from transformers import DynamicCache

    # transformers 5.2x names the argument cache; earlier versions past_key_values
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache, tokens = DynamicCache(), [prompt]
    for _ in progress(range(steps), "sample", "token", show):
        logits = model(input_ids=tokens[-1], use_cache=True, **{key: cache}).logits[:, -1]
        tokens.append(pick(torch.softmax(logits.float(), dim=-1)))
    return torch.cat(tokens, dim=1)


SAMPLER_VERSION = 1  # bump when self_windows would sample other tokens: cached windows are then stale


@torch.no_grad()
def self_windows(model: nn.Module, nsamples: int, seqlen: int, seed: int, batch_size: int = 64,
                 show: bool = True) -> torch.Tensor:
    """Text sampled from the model itself (no data needed): (nsamples, seqlen), starting at
    BOS, reproducible from seed on a given device."""
    device = next(model.parameters()).device
    bos = model.config.bos_token_id
    bos = bos if isinstance(bos, int) else 0
    out = []
    g = torch.Generator(device=device).manual_seed(seed)
    log.info("calib: sampling %d x %d tokens from the model (calib=self) on %s", nsamples, seqlen, device)
    for start in range(0, nsamples, batch_size):
        b = min(batch_size, nsamples - start)
        prompt = torch.full((b, 1), bos, dtype=torch.long, device=device)
        out.append(sample(model, prompt, seqlen - 1, lambda p: inverse_cdf(p, g), show).cpu())
    return torch.cat(out)


def calibration_windows(source: str, model: nn.Module, tokenizer, nsamples: int, seqlen: int,
                        seed: int) -> torch.Tensor:
    if source == "self":
        return self_windows(model, nsamples, seqlen, seed)
    if source == "random":  # uniform random token ids: for timing runs of random-weight models, not quality
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=g, device="cpu")
    tokens = tokenize(tokenizer, read_text(source, "calib.source", "calib"))
    return random_windows(tokens, nsamples, seqlen, seed, f"calib.source={source!r}")

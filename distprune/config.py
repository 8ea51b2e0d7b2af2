"""Every setting as a dataclass: the schema Hydra validates YAML and overrides against.

Values live in conf/*.yaml; the schema and its checks live here. ``check()`` raises a
ConfigError with one line that names the bad key and value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

METHODS = ("magnitude", "wanda")
SCOPES = ("global", "layer", "row")
SELECTORS = ("radix", "search", "sort")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A setting has a value distprune cannot use."""


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # preset name; also names the default output directory
    path: str | None = None  # HF model dir, hub id or .gguf file; None: the built-in preset
    dtype: str = "auto"  # auto keeps the checkpoint's dtype
    random: dict[str, Any] | None = None  # a transformers config dict: random weights
    seed: int = 0  # seed of random weights

    def check(self) -> None:
        _one_of("model.dtype", self.dtype, DTYPES)


@dataclass
class PruneConfig:
    method: str = "magnitude"
    scope: str = "row"
    sparsity: float = 0.5
    selector: str = "radix"
    include: list[str] = field(default_factory=list)  # fnmatch patterns of layer names
    exclude: list[str] = field(default_factory=list)
    search_tol: float = 1e-4  # search: stop when |count - k| <= tol * n
    search_max_iter: int = 20  # search: counting passes at most (the seed report's 20)

    def check(self) -> None:
        _one_of("prune.method", self.method, METHODS)
        _one_of("prune.scope", self.scope, SCOPES)
        _one_of("prune.selector", self.selector, SELECTORS)
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"prune.sparsity={self.sparsity} is outside [0, 1)")
        if self.search_tol < 0 or self.search_max_iter < 0:
            raise ConfigError("prune.search_tol and prune.search_max_iter must be >= 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    output_dir: str = "outputs/pruned"
    overwrite: bool = False  # replace a non-empty output_dir
    save: bool = True  # write the pruned checkpoint (the report is always written)
    device: str = "auto"  # auto: cuda when available, else cpu
    max_shard_size: str = "5GB"

    def check(self) -> None:
        self.model.check()
        self.prune.check()


def register_configs() -> None:
    ConfigStore.instance().store(name="distprune_schema", node=Config)

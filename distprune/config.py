"""Every setting as a dataclass: the schema Hydra validates YAML and overrides against.

Values live in conf/*.yaml; the schema and its checks live here. ``check()`` raises a
ConfigError with one line that names the bad key and value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from distprune.errors import ConfigError

__all__ = ["CalibConfig", "Config", "ConfigError", "EvalConfig", "ModelConfig", "PruneConfig", "register_configs"]
# The names the settings take, and what each method reads: plain data, so that this module
# imports nothing of the package (every other module may import it). The registries that
# implement them (methods.METHODS, masks, select, allocate) dispatch on these names;
# tests/test_imports.py holds the two against each other.
METHOD_NAMES = ("magnitude", "wanda", "ria", "sparsegpt", "alps")
SOLVES = ("sparsegpt", "alps")  # methods whose solve chooses the mask and new weights (no scores)
SCOPES = ("global", "layer", "row", "nm")
SELECTORS = ("radix", "search", "sort")
ALLOCATIONS = ("uniform", "owl", "global")
NORMALIZE = ("none", "layer", "row")
SOLVE_SCOPES = ("layer", "row", "nm")  # a solve works on one layer at a time
# the settings only some methods read (the rest of PruneConfig is every method's)
METHOD_OPTIONS = {"magnitude": (), "wanda": (), "ria": ("ria_a",), "sparsegpt": ("percdamp", "blocksize"),
                  "alps": ("percdamp", "alps_rho", "alps_update_iter", "alps_max_iter", "refit_iters")}
REFIT_OPTIONS = ("percdamp", "refit_iters")  # what prune.refit=true reads, whatever the method
OPTIONS = tuple(dict.fromkeys(o for options in METHOD_OPTIONS.values() for o in options))
MODES = ("auto", "oneshot", "sequential")
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    # a local safetensors checkpoint: each rank keeps its own layers and reads every decoder
    # block when a pass needs it (memory: a shard plus one block); false loads it in full
    stream: bool = True

    def check(self) -> None:
        _one_of("model.dtype", self.dtype, DTYPES)
        if self.random is not None and self.path is not None:
            raise ConfigError(f"model.path={self.path!r} with model={self.name}, a random-weight preset: pass model=hf "
                              "model.path=... for a checkpoint")


@dataclass
class PruneConfig:
    method: str = "wanda"
    scope: str = "row"
    sparsity: float = 0.5
    # nm scope (N:M semi-structured): every m consecutive weights of a row keep m - n, where
    # n = sparsity * m must be a whole number (2:4 is sparsity 0.5, m 4)
    m: int = 4
    selector: str = "radix"
    # where the statistics come from: oneshot (dense model) or sequential (block i pruned
    # before block i+1 sees its outputs); auto: sequential for row/layer, oneshot for global
    mode: str = "auto"
    include: list[str] = field(default_factory=list)  # fnmatch patterns of layer names
    exclude: list[str] = field(default_factory=list)
    search_tol: float = 1e-4  # search: stop when |count - k| <= tol * n
    search_max_iter: int = 20  # search: counting passes at most (the seed report's 20)
    ria_a: float = 0.5  # ria: exponent of the activation norm
    percdamp: float = 0.01  # sparsegpt, alps, refit: dampening added to diag(H), a fraction of its mean
    blocksize: int = 128  # sparsegpt: columns whose mask is chosen together (a multiple of m for nm)
    # alps (alps.py): the ADMM penalty's start, iterations between its updates, and the cap on
    # iterations (the paper's 0.1, 3 and 300)
    alps_rho: float = 0.1
    alps_update_iter: int = 3
    alps_max_iter: int = 300
    # refit the kept weights of every layer to its dense outputs by conjugate gradients on its
    # Hessian, after any method's mask (layer, row and nm scopes); alps always ends with it
    refit: bool = False
    refit_iters: int = 10  # conjugate-gradient iterations of the refit (alps's too)
    # how many weights each layer loses (allocate.py): uniform (prune.sparsity everywhere),
    # owl (outlier-weighed per block) or global (one global threshold over normalized scores
    # sets each layer's count; the scope's own rule picks the weights); layer and row scopes
    allocation: str = "uniform"
    owl_m: float = 5.0  # owl: a score is an outlier above owl_m times its block's mean score
    owl_lambda: float = 0.08  # owl: block sparsities spread over prune.sparsity +- owl_lambda
    # global scope and allocation: divide each score by the mean score of its layer or row;
    # auto: row there (measured best on SmolLM2: 1.06x per-row Wanda's perplexity, against 44x
    # for raw scores, whose threshold empties the first blocks; docs/RESULTS.md), none elsewhere
    normalize: str = "auto"

    @property
    def normalization(self) -> str:
        """The normalization this config applies (``normalize`` with auto resolved)."""
        if self.normalize != "auto":
            return self.normalize
        return "row" if self.scope == "global" or self.allocation == "global" else "none"

    @property
    def solves(self) -> bool:
        """Whether the method runs as a solve (its own, or its mask followed by the refit)."""
        return self.method in SOLVES or self.refit

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes the method supports as this config runs it."""
        return SOLVE_SCOPES if self.solves else SCOPES

    @property
    def options(self) -> tuple[str, ...]:
        """The method-specific settings it reads (``METHOD_OPTIONS``; the refit's too)."""
        own = METHOD_OPTIONS[self.method]
        return tuple(dict.fromkeys((*own, *REFIT_OPTIONS))) if self.refit else own

    @property
    def selector_name(self) -> str:
        """The selector this scope uses, as reports name it: row and N:M groups are always
        selected with an exact per-group kthvalue; a solve chooses its mask itself, block
        of columns by block."""
        if self.solves:
            return f"{self.method}{'+refit' * self.refit}-{self.scope}"
        return f"{self.scope}-kthvalue" if self.scope in ("row", "nm") else self.selector

    @property
    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "oneshot" if self.scope == "global" else "sequential"

    def check(self) -> None:
        _one_of("prune.method", self.method, METHOD_NAMES)
        _one_of("prune.scope", self.scope, SCOPES)
        _one_of("prune.selector", self.selector, SELECTORS)
        _one_of("prune.mode", self.mode, MODES)
        _one_of("prune.allocation", self.allocation, ALLOCATIONS)
        _one_of("prune.normalize", self.normalize, ("auto", *NORMALIZE))
        if self.scope == "global" and self.mode == "sequential":
            raise ConfigError("prune.mode=sequential needs a per-layer scope; global scope needs oneshot statistics")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"prune.sparsity={self.sparsity} is outside [0, 1)")
        if self.m < 1:
            raise ConfigError(f"prune.m={self.m} must be at least 1")
        if self.scope == "nm" and abs(self.sparsity * self.m - round(self.sparsity * self.m)) > 1e-9:
            raise ConfigError(f"prune.sparsity={self.sparsity} of prune.m={self.m} weights is not a whole number: "
                              "N:M pruning needs sparsity = N/M (2:4 is prune.sparsity=0.5 prune.m=4)")
        if self.search_tol < 0 or self.search_max_iter < 0:
            raise ConfigError("prune.search_tol and prune.search_max_iter must be >= 0")
        if self.percdamp < 0:
            raise ConfigError(f"prune.percdamp={self.percdamp} must be >= 0")
        if self.blocksize < 1:
            raise ConfigError(f"prune.blocksize={self.blocksize} must be at least 1")
        if self.ria_a < 0:
            raise ConfigError(f"prune.ria_a={self.ria_a} must be >= 0")
        if self.alps_rho <= 0:
            raise ConfigError(f"prune.alps_rho={self.alps_rho} must be > 0")
        for key in ("alps_update_iter", "alps_max_iter", "refit_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"prune.{key}={getattr(self, key)} must be at least 1")
        if self.refit and self.method == "alps":
            raise ConfigError("prune.refit=true has no effect with prune.method=alps: it always ends with the refit "
                              "(prune.refit_iters sets its iterations)")
        if self.refit and self.scope == "global":
            raise ConfigError("prune.refit=true needs a per-layer scope (layer, row or nm): it refits each layer "
                              "on its own Hessian, one block at a time, and a global threshold needs every layer's "
                              "scores first; for global budgets use prune.allocation=global")
        if self.scope not in self.scopes:
            why = " (for global budgets use prune.allocation=global)" if self.scope == "global" else ""
            raise ConfigError(f"prune.method={self.method} does not support prune.scope={self.scope}{why}; use "
                              f"{', '.join(self.scopes)}")
        if self.allocation != "uniform" and self.scope not in ("layer", "row"):
            why = ("N:M keeps the same ratio in every group of m" if self.scope == "nm" else
                   "one global threshold allocates by itself")
            raise ConfigError(f"prune.allocation={self.allocation} needs prune.scope=layer or row: {why}")
        if self.allocation == "owl":
            if self.owl_m <= 0:
                raise ConfigError(f"prune.owl_m={self.owl_m} must be > 0")
            most = min(self.sparsity, 1 - self.sparsity)
            if not 0 <= self.owl_lambda <= most:
                raise ConfigError(f"prune.owl_lambda={self.owl_lambda} is outside [0, {most:g}]: block sparsities "
                                  f"prune.sparsity={self.sparsity} +- owl_lambda must stay within [0, 1]")
        if "blocksize" in self.options and self.scope == "nm" and self.blocksize % self.m:
            raise ConfigError(f"prune.blocksize={self.blocksize} is not a multiple of prune.m={self.m}: N:M groups "
                              "must not straddle two blocks of columns")
        self._check_effective()

    def _check_effective(self) -> None:
        """Refuse a setting that would be silently ignored in the chosen scope (a value
        other than its default that nothing reads)."""
        defaults = PruneConfig.__dataclass_fields__
        for key in OPTIONS:
            if key not in self.options and getattr(self, key) != defaults[key].default:
                users = [name for name, options in METHOD_OPTIONS.items() if key in options]
                also = " or prune.refit=true" if key in REFIT_OPTIONS else ""
                raise ConfigError(f"prune.{key}={getattr(self, key)} has no effect with prune.method={self.method}: "
                                  f"it tunes prune.method={'/'.join(users)}{also}")
        picks = self.allocation == "global"  # the global budgets' threshold is selected with prune.selector
        if self.solves and not picks and self.selector != defaults["selector"].default:
            raise ConfigError(f"prune.selector={self.selector} has no effect with prune.method={self.method}: "
                              "its solve chooses the mask itself")
        if self.scope in ("row", "nm") and not picks and self.selector != defaults["selector"].default:
            raise ConfigError(f"prune.selector={self.selector} has no effect with prune.scope={self.scope}: row and "
                              f"N:M groups are always selected exactly per group (selector {self.selector_name}); "
                              "selectors apply to the global and layer scopes")
        for key in ("owl_m", "owl_lambda"):
            if self.allocation != "owl" and getattr(self, key) != defaults[key].default:
                raise ConfigError(f"prune.{key}={getattr(self, key)} has no effect with prune.allocation="
                                  f"{self.allocation}: it tunes prune.allocation=owl")
        if self.normalize not in ("auto", "none") and self.scope != "global" and self.allocation != "global":
            raise ConfigError(f"prune.normalize={self.normalize} has no effect with prune.scope={self.scope} and "
                              f"prune.allocation={self.allocation}: it scales scores for one global threshold "
                              "(prune.scope=global or prune.allocation=global)")
        if self.scope != "nm" and self.m != defaults["m"].default:
            raise ConfigError(f"prune.m={self.m} has no effect with prune.scope={self.scope}: it is N:M's group size "
                              "(prune.scope=nm)")
        for key in ("search_tol", "search_max_iter"):
            if self.selector != "search" and getattr(self, key) != defaults[key].default:
                raise ConfigError(f"prune.{key}={getattr(self, key)} has no effect with prune.selector="
                                  f"{self.selector}: it tunes prune.selector=search")


@dataclass
class CalibConfig:
    # a text file or folder, a preset (wikitext2, c4), self (sampled from the model), or
    # random (uniform token ids: timing runs of random-weight models only)
    source: str = "self"
    nsamples: int = 32
    seqlen: int = 512  # never the model's max_position_embeddings: that is 8k-128k and blows memory
    seed: int = 0
    batch_size: int = 8
    cache: bool = True  # reuse oneshot statistics from ~/.cache/distprune/stats
    # mixtures of experts: an expert's statistics come from the tokens routed to it (routed;
    # an expert no token reaches is pruned by magnitude), the same scaled by their routing
    # weights (weighted), or every token (all). distprune/moe.py
    moe: str = "routed"

    def check(self) -> None:
        if self.moe not in ("routed", "weighted", "all"):
            raise ConfigError(f"calib.moe={self.moe!r} is not one of routed, weighted, all")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ConfigError(f"calib.nsamples={self.nsamples}, calib.seqlen={self.seqlen} and "
                              f"calib.batch_size={self.batch_size} must be >= 1, >= 2 and >= 1")


@dataclass
class EvalConfig:
    source: str | None = None  # text file or folder, or a preset; None: no evaluation
    seqlen: int = 512
    max_windows: int | None = None  # None: every non-overlapping window of the text
    batch_size: int = 4
    dense: bool = True  # also evaluate the model before pruning, for a side-by-side cost
    # zero-shot (or few-shot) accuracy through lm-evaluation-harness (zeroshot.py): its task
    # names, e.g. [arc_easy,hellaswag]; task_path: a folder of the user's own YAML tasks
    tasks: list[str] = field(default_factory=list)
    task_path: str | None = None
    num_fewshot: int = 0
    limit: int | None = None  # at most this many examples per task (None: all)

    def check(self) -> None:
        if self.seqlen < 2 or self.batch_size < 1 or (self.max_windows is not None and self.max_windows < 1):
            raise ConfigError(f"eval.seqlen={self.seqlen}, eval.batch_size={self.batch_size} and "
                              f"eval.max_windows={self.max_windows} must be >= 2, >= 1 and >= 1")
        if self.num_fewshot < 0 or (self.limit is not None and self.limit < 1):
            raise ConfigError(f"eval.num_fewshot={self.num_fewshot} and eval.limit={self.limit} must be >= 0 and >= 1")
        if not self.tasks:
            for key in ("task_path", "limit"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"eval.{key} has no effect without eval.tasks")
            if self.num_fewshot:
                raise ConfigError("eval.num_fewshot has no effect without eval.tasks")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/pruned"
    overwrite: bool = False  # replace a non-empty output_dir
    save: bool = True  # write the pruned checkpoint (the report is always written)
    device: str = "auto"  # auto: cuda when available, else cpu
    max_shard_size: str = "5GB"

    def check(self) -> None:
        self.model.check()
        self.prune.check()
        self.calib.check()
        self.eval.check()


def register_configs() -> None:
    ConfigStore.instance().store(name="distprune_schema", node=Config)

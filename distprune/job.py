"""One pruning job, stage by stage (``run``: check, build, evaluate the dense model, prune,
evaluate the pruned model, report, save), and one evaluation job (``run_eval``). No math lives
here: each stage calls the modules that do its work."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distprune import (
    cache,
    checkpoint,
    data,
    dist,
    models,
    plan,
    report,
    sources,
    stats,
    summarize,
    writer,
    zeroshot,
)
from distprune.api import PruneResult, calibrate_and_prune, prune
from distprune.config import Config, ConfigError, ModelConfig
from distprune.dist import SINGLE, Comm
from distprune.layers import (
    Coverage,
    PrunableLayer,
    broadcast_weight,
    decoder_blocks,
    describe,
    outside_keys,
    prunable_layers,
    weights_to,
)
from distprune.methods import of
from distprune.perplexity import blockwise_perplexity
from distprune.stream import move
from distprune.sweep import SweepModels

log = logging.getLogger("distprune")
ALLOCATION_PNG = "allocation.png"  # a job whose layers lose different fractions: target sparsity per layer


STAGE = ["starting"]  # what run() is doing, for an out-of-memory message
STAGES = {"load": "loading the model", "eval_dense": "evaluating the dense model", "eval": "evaluating the pruned "
          "model", "calib_windows": "making the calibration windows", "save": "writing the checkpoint"}


@contextmanager
def phase(seconds: dict, name: str):
    STAGE[0] = STAGES.get(name, name)
    t0 = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - t0, 4)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def calibration_source_fields(cfg: Config) -> dict:
    """Calibration settings for the statistics cache key; a local text file adds its size
    and mtime, so an edited file invalidates."""
    c = cfg.calib
    # batch_size too: float64 sums are added batch by batch, so it sets their rounding
    fields = {"source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed,
              "batch_size": c.batch_size}
    if c.moe != "routed":  # the experts' statistics differ (the key of a model without experts stays as it was)
        fields["moe"] = c.moe
    p = Path(c.source).expanduser()
    if p.exists():  # the same file named two ways is one key
        fields["source"] = str(p.resolve())
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        fields["files"] = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return fields


def eval_windows(cfg: Config, tokenizer) -> torch.Tensor:
    text = data.read_text(cfg.eval.source, "eval.source", "eval")
    return data.sequential_windows(data.tokenize(tokenizer, text, "eval.source"), cfg.eval.seqlen,
                                   cfg.eval.max_windows, f"eval.source={cfg.eval.source!r}")


def text_windows(cfg: Config, seconds: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(calibration windows, evaluation windows) of the job's text sources, made before any
    weight loads, with the tokenizer loaded on its own: a model without a tokenizer, or a
    text too short for the windows asked, stops the job before its work. None where the
    job reads no text (calib=self and calib.source=random need the model)."""
    calib_text = of(cfg.prune).calibrated and cfg.calib.source not in ("self", "random")
    if not (calib_text or cfg.eval.source or cfg.eval.tasks):
        return None, None
    tokenizer = models.load_tokenizer(cfg.model)
    if cfg.eval.tasks and tokenizer is None:
        raise ConfigError("eval.tasks needs a tokenizer; this model has none")
    calib = None
    if calib_text:
        with phase(seconds, "calib_windows"):
            calib = data.calibration_windows(cfg.calib.source, None, tokenizer, cfg.calib.nsamples, cfg.calib.seqlen,
                                             cfg.calib.seed)
    return calib, eval_windows(cfg, tokenizer) if cfg.eval.source else None


def evaluate_ppl(cfg: Config, loaded: models.LoadedModel, windows: torch.Tensor, device: str, comm: Comm = SINGLE,
                 before_block: Callable[[int], None] | None = None) -> float:
    """Perplexity, block by block (one block in memory and on the device at a time)."""
    return blockwise_perplexity(loaded.model, windows, cfg.eval.batch_size, device, loaded.stream, comm, before_block)


def streams(cfg: Config) -> bool:
    """Whether this job reads decoder blocks from the checkpoint when it needs them:
    model.stream, unless calibration samples from the model itself (generation runs the
    whole model)."""
    return cfg.model.stream and not (of(cfg.prune).calibrated and cfg.calib.source == "self")


def forward_passes(cfg: Config) -> bool:
    """Whether the job runs the model (calibration, evaluation): a streamed load then gives
    rank 0 the tensors outside the decoder blocks to read and send (``load_model``)."""
    return of(cfg.prune).calibrated or bool(cfg.eval.source)


def load_model(cfg: Config, comm: Comm, shared: SweepModels | None) -> tuple[models.LoadedModel, dict]:
    """The model, and how it was loaded. A local safetensors checkpoint is streamed: each
    rank reads its own layers now (and, when it runs forward passes, the tensors outside
    the decoder blocks); every other tensor is read when a pass needs its block
    (stream.py). Anything else (a random config, GGUF, a hub id, model.stream=false, a
    layout that from_pretrained converts) loads in full on every rank. A sweep reuses the
    model of its previous job with the dense weights restored."""
    forward = forward_passes(cfg)

    def load() -> tuple[models.LoadedModel, dict]:
        if streams(cfg):
            shards: list[set[str]] = []  # each rank's layers

            def wanted(model) -> set[str]:  # the tensors outside the blocks: rank 0 reads them, sends them below
                shards.extend(plan.shard_keys(model, cfg.prune.include, cfg.prune.exclude, comm.world_size, forward))
                keys = shards[comm.rank]
                return keys | outside_keys(model) if forward and comm.is_main else keys

            found = models.load_streamed(cfg.model, wanted)
            if found is not None:
                loaded, nbytes = found
                if comm.world_size > 1:  # blocks travel between ranks, not from disk
                    if forward:
                        loaded.stream.keep_from(comm, outside_keys(loaded.model), 0)
                    loaded.stream.share(comm, shards)
                return loaded, {"mode": "streamed", "bytes_per_rank": comm.all_gather_ints(nbytes)}
        return models.load(cfg.model, "cpu"), {"mode": "full"}

    if shared is not None:
        return shared.get(cfg.model, load, [streams(cfg), forward, cfg.prune.include, cfg.prune.exclude])
    return load()


def sampled_windows_file(cfg: Config, device: str) -> tuple[Path, dict]:
    """Where calib=self keeps the windows it sampled, and what they were made for: keyed
    like the statistics, by the model, the sampling settings and the device type (its
    arithmetic picks the tokens)."""
    fields = {"model": sources.fingerprint(cfg.model), "nsamples": cfg.calib.nsamples, "seqlen": cfg.calib.seqlen,
              "seed": cfg.calib.seed, "device": torch.device(device).type, "sampler": data.SAMPLER_VERSION}
    return cache.cache_dir() / "windows" / f"{stats.cache_key(fields)}.safetensors", fields


def prune_model(cfg: Config, loaded: models.LoadedModel, layers, own, device: str, comm: Comm,
                seconds: dict, text: torch.Tensor | None = None) -> PruneResult:
    """Prune in place: directly, or after block-wise calibration when the method needs
    statistics. This rank prunes ``own``, its shard of ``layers``. ``text``: the
    calibration windows of a text source (``text_windows``); the others are made here.
    Records in ``seconds`` how long the calibration windows took to make (sampling them,
    for calib=self), a part of the statistics phase."""
    if not of(cfg.prune).calibrated:
        weights_to(own, device)
        return prune(loaded.model, cfg.prune, layers=own, comm=comm)
    model = loaded.model

    def windows():
        if text is not None:
            log.info("calib: %d x %d tokens from %s in %.1fs (before loading)", text.shape[0], text.shape[1],
                     cfg.calib.source, seconds["calib_windows"])
            return text
        with phase(seconds, "calib_windows"):
            cached, fields = (sampled_windows_file(cfg, device) if cfg.calib.source == "self" and cfg.calib.cache
                              else (None, {}))
            shape = ((cfg.calib.nsamples, cfg.calib.seqlen), torch.int64)
            found = cache.read(cached, fields, {"windows": shape}) if cached is not None else None
            hit = found is not None
            if hit:
                w = found["windows"]
            else:
                if cfg.calib.source == "self":
                    loaded.model.to(device)
                w = data.calibration_windows(cfg.calib.source, model, loaded.tokenizer, cfg.calib.nsamples,
                                             cfg.calib.seqlen, cfg.calib.seed)
                move(model, "cpu")  # block-wise onloading: only the current block goes to the device
                if cached is not None:
                    cache.write(cached, {"windows": w}, fields)
        log.info("calib: %d x %d tokens from %s in %.1fs%s", w.shape[0], w.shape[1], cfg.calib.source,
                 seconds["calib_windows"], f" (sampled before: {cached})" if hit else "")
        return w

    cache_file, fields = None, None
    if cfg.calib.cache and (cfg.prune.resolved_mode == "oneshot" or cfg.prune.allocation != "uniform"):
        fields = {"model": sources.fingerprint(cfg.model), "calib": calibration_source_fields(cfg),
                  "layers": [layer.name for layer in layers]}
        cache_file = cache.cache_dir() / "stats" / f"{stats.cache_key(fields)}.safetensors"
    move(model, "cpu")
    return calibrate_and_prune(model, cfg.prune, windows, device, layers, cfg.calib.batch_size,
                               cache_file, fields, comm, own=own, blocks_from=loaded.stream, moe_policy=cfg.calib.moe)


def from_owners(parts: list[list[PrunableLayer]], comm: Comm, delivered: set[str] = frozenset()
                ) -> Callable[[int], None] | None:
    """For a block-wise pass over the pruned model: before block i runs, every rank gets the
    pruned weights of block i's layers from the ranks that own them, except those whose
    tensors (``delivered``) the streamed model's block loads already bring from them."""
    if comm.world_size == 1:
        return None
    by_block: dict[int, list[tuple[PrunableLayer, int]]] = {}
    for rank, part in enumerate(parts):
        for layer in part:
            if layer.key not in delivered:
                by_block.setdefault(layer.block, []).append((layer, rank))

    def share(i: int) -> None:
        for layer, rank in by_block.get(i, []):
            broadcast_weight(comm, layer, rank)

    return share


def gather_layers(result: PruneResult, comm: Comm) -> None:
    """Every rank's per-layer results, in rank (= layer) order, into result."""
    if comm.world_size > 1:
        parts = comm.all_gather_objects(result.groups.layers)
        result.groups.layers = [r for part in parts for r in part]


def windows_used(cfg: Config) -> dict[str, int]:
    """The window lengths this job runs through the model."""
    used = {"calib.seqlen": cfg.calib.seqlen} if of(cfg.prune).calibrated else {}
    return {**used, **({"eval.seqlen": cfg.eval.seqlen} if cfg.eval.source else {})}


@dataclass
class Job:
    """One pruning job's state as it goes through its stages (``run``)."""

    cfg: Config
    comm: Comm
    shared: SweepModels | None
    out: Path  # the output directory (checked)
    device: str
    seconds: dict[str, float]  # each phase's
    calib_text: torch.Tensor | None  # the calibration windows of a text source, made before loading
    windows: torch.Tensor | None  # the evaluation windows
    disk_mark: int  # report.disk_read_bytes() before the load
    loaded: models.LoadedModel | None = None
    how: dict = field(default_factory=dict)  # how the model was loaded
    coverage: Coverage = field(default_factory=Coverage)
    layers: list[PrunableLayer] = field(default_factory=list)
    parts: list[list[PrunableLayer]] = field(default_factory=list)  # each rank's layers
    traffic_mark: tuple[int, int] = (0, 0)
    ppl: dict[str, float] = field(default_factory=dict)  # "dense", "pruned"
    scores: dict = field(default_factory=dict)  # zero-shot accuracies: "dense", "pruned"
    sent: int = 0  # bytes this rank sent in statistics and selection collectives
    result: PruneResult | None = None

    @property
    def resident(self) -> bool:
        """Whether every rank holds the whole model (not streamed)."""
        return not self.loaded.stream.streamed


def run(cfg: Config, comm: Comm = SINGLE, shared: SweepModels | None = None) -> dict:
    """Run one pruning job; returns the report. Raises ConfigError on bad input. Jobs of a
    sweep pass one SweepModels so that the model is loaded once."""
    job = check(cfg, comm, shared)
    build(job)
    evaluate_dense(job)
    prune_job(job)
    evaluate_pruned(job)
    result = report.build(job.cfg, job.comm, job.loaded, job.how, job.coverage, job.result, job.sent, job.ppl,
                          job.seconds, job.device, job.traffic_mark, job.disk_mark)
    save(job, result)
    return result


def check(cfg: Config, comm: Comm, shared: SweepModels | None) -> Job:
    """Every check that needs no weights (the settings, the input, the output location, the
    context), and the windows of the text sources: a job that cannot succeed stops here."""
    cfg.check()
    sources.check_source(cfg.model)
    zeroshot.check(cfg.eval.tasks, cfg.eval.task_path)
    if of(cfg.prune).calibrated:
        data.check_source(cfg.calib.source, "calib.source")
    if cfg.eval.source:
        data.check_source(cfg.eval.source, "eval.source")
    out = checkpoint.check_output(cfg.output_dir, cfg.overwrite, sources.input_dir(cfg.model),
                                  sources.output_bytes(cfg.model) if cfg.save else None)
    if not of(cfg.prune).calibrated and cfg.prune.mode != "auto":
        log.warning("prune.mode=%s has no effect with prune.method=%s: it calibrates nothing", cfg.prune.mode,
                    cfg.prune.method)
    device = dist.device_of(comm, resolve_device(cfg.device))
    seconds: dict[str, float] = {}
    sources.check_context(sources.model_config(cfg.model), windows_used(cfg))
    calib_text, windows = text_windows(cfg, seconds)
    return Job(cfg, comm, shared, out, device, seconds, calib_text, windows, report.disk_read_bytes())


def build(job: Job) -> None:
    """The model, its prunable layers and each rank's share of them."""
    cfg, comm = job.cfg, job.comm
    with phase(job.seconds, "load"):
        job.loaded, job.how = load_model(cfg, comm, job.shared)
        job.traffic_mark = job.loaded.stream.traffic()
        job.layers = prunable_layers(job.loaded.model, cfg.prune.include, cfg.prune.exclude, job.coverage)
        job.parts = plan.rank_parts(job.loaded.model, job.layers, comm.world_size,
                                    job.loaded.stream.streamed and forward_passes(cfg))
        if job.how["mode"] != "reused":  # a reused model is restored from weights checked before
            models.check_finite(job.loaded.model, cfg.model)
    log.info("load: %s from %s (%s) in %.1fs", describe(job.loaded.model, job.layers), job.loaded.source,
             job.how["mode"], job.seconds["load"])
    if comm.world_size > 1:
        log.info("ranks: %d, layers per rank %s", comm.world_size, [len(p) for p in job.parts])
    if cfg.eval.tasks and not job.resident and not cfg.save:
        raise ConfigError("eval.tasks on a streamed model evaluates the written checkpoint: drop save=false, or pass "
                          "model.stream=false to hold the model in memory")


def evaluate_dense(job: Job) -> None:
    """The dense model's perplexity and zero-shot accuracies (once per sweep)."""
    cfg, comm, loaded, shared, seconds = job.cfg, job.comm, job.loaded, job.shared, job.seconds
    if cfg.eval.source and cfg.eval.dense:
        def dense() -> float:
            with phase(seconds, "eval_dense"):
                return evaluate_ppl(cfg, loaded, job.windows, job.device, comm)

        job.ppl["dense"], reused = (shared.dense_result("perplexity", cfg.model, cfg.eval, dense) if shared
                                    else (dense(), False))
        if reused:
            log.info("eval: dense perplexity %.3f (from an earlier job of this sweep)", job.ppl["dense"])
        else:
            log.info("eval: dense perplexity %.3f on %s in %.1fs", job.ppl["dense"], cfg.eval.source,
                     seconds["eval_dense"])
    if cfg.eval.tasks and cfg.eval.dense:
        def dense_scores() -> dict:
            with phase(seconds, "zeroshot_dense"):
                return comm.on_main(lambda: zeroshot.on_device(loaded.model, loaded.tokenizer, cfg.eval, job.device)
                                    if job.resident else zeroshot.from_checkpoint(cfg.model, cfg.eval, job.device))

        job.scores["dense"], reused = (shared.dense_result("zeroshot", cfg.model, cfg.eval, dense_scores) if shared
                                       else (dense_scores(), False))
        if reused:
            log.info("zeroshot: dense accuracies from an earlier job of this sweep")


def prune_job(job: Job) -> None:
    """Calibrate (when the method needs statistics) and prune this rank's layers; every
    rank then holds every layer's result."""
    sent = job.comm.bytes_communicated  # count statistics and selection only: loading and evaluation gather too
    STAGE[0] = "calibrating and pruning"
    job.result = prune_model(job.cfg, job.loaded, job.layers, job.parts[job.comm.rank], job.device, job.comm,
                             job.seconds, job.calib_text)
    job.sent = job.comm.bytes_communicated - sent
    gather_layers(job.result, job.comm)
    report.record_pruning(job.cfg, job.result, job.seconds)


def evaluate_pruned(job: Job) -> None:
    """The pruned model's perplexity, and its zero-shot accuracies when it is in memory."""
    cfg, comm, loaded = job.cfg, job.comm, job.loaded
    if cfg.eval.source:
        with phase(job.seconds, "eval"):
            job.ppl["pruned"] = evaluate_ppl(cfg, loaded, job.windows, job.device, comm,
                                             from_owners(job.parts, comm, loaded.stream.delivered()))
        log.info("eval: pruned perplexity %.3f (dense %s) in %.1fs", job.ppl["pruned"],
                 f"{job.ppl['dense']:.3f}" if "dense" in job.ppl else "not evaluated", job.seconds["eval"])
    if cfg.eval.tasks and job.resident:
        # rank 0 needs every pruned weight; the perplexity pass above already brought each block's
        if comm.world_size > 1 and not cfg.eval.source:
            share = from_owners(job.parts, comm)
            for i in range(len(decoder_blocks(loaded.model))):
                share(i)
        with phase(job.seconds, "zeroshot"):
            job.scores["pruned"] = comm.on_main(lambda: zeroshot.on_device(loaded.model, loaded.tokenizer, cfg.eval,
                                                                           job.device))


def save(job: Job, result: dict) -> None:
    """The checkpoint and the report, published together (checkpoint.atomic_dir); zero-shot
    accuracies of a streamed model, from the checkpoint just written."""
    cfg, comm, loaded, seconds = job.cfg, job.comm, job.loaded, job.seconds
    with checkpoint.atomic_dir(job.out, comm, cfg.overwrite) as tmp:
        with phase(seconds, "save"):
            if cfg.save:
                if comm.world_size > 1:
                    plan.share_split(job.parts, comm)
                writer.write_checkpoint(tmp, loaded.model, loaded.tokenizer, cfg.max_shard_size,
                                        plan.writer_parts(job.parts), comm, loaded.stream.read)
        if cfg.eval.tasks and not job.resident:  # from the checkpoint just written
            comm.barrier()
            with phase(seconds, "zeroshot"):
                job.scores["pruned"] = comm.on_main(lambda: zeroshot.from_checkpoint(
                    ModelConfig(name=cfg.model.name, path=str(tmp), dtype=cfg.model.dtype), cfg.eval, job.device))
        if cfg.eval.tasks:
            zeroshot.log_scores(job.scores, seconds["zeroshot"] + seconds.get("zeroshot_dense", 0.0))
            result["zeroshot"] = zeroshot.report(job.scores)
        if comm.is_main:
            checkpoint.write_report(tmp, result)
            if report.varied(cfg):
                summarize.plot_allocation(result, tmp / ALLOCATION_PNG)
    log.info("save: %s in %.1fs", job.out if cfg.save else f"report only in {job.out}", seconds["save"])



def run_eval(cfg: Config) -> dict:
    """Perplexity (eval.source) and zero-shot accuracy (eval.tasks) of the model that cfg
    names; no pruning."""
    cfg.model.check()
    cfg.eval.check()
    dist.check_device(cfg.device)
    if not cfg.eval.source and not cfg.eval.tasks:
        raise ConfigError("eval.source is not set and eval.tasks is empty: pass eval=wikitext2-local (or "
                          "eval.source=FILE), eval.tasks=[...], or both")
    sources.check_source(cfg.model)
    zeroshot.check(cfg.eval.tasks, cfg.eval.task_path)
    if cfg.eval.source:
        data.check_source(cfg.eval.source, "eval.source")
    t0 = time.perf_counter()
    if cfg.eval.source:  # before the weights
        sources.check_context(sources.model_config(cfg.model), {"eval.seqlen": cfg.eval.seqlen})
    windows = eval_windows(cfg, models.load_tokenizer(cfg.model)) if cfg.eval.source else None
    # zero-shot runs the whole model: a streamed load holds only what perplexity needs at once
    found = models.load_streamed(cfg.model, outside_keys) if cfg.model.stream and not cfg.eval.tasks else None
    loaded = found[0] if found is not None else models.load(cfg.model, "cpu")
    models.check_finite(loaded.model, cfg.model)
    device = resolve_device(cfg.device)
    result = {"model": loaded.source}
    if cfg.eval.source:
        ppl = evaluate_ppl(cfg, loaded, windows, device)
        result.update({"eval_source": cfg.eval.source, "seqlen": cfg.eval.seqlen, "max_windows": cfg.eval.max_windows,
                       "perplexity": ppl})
        log.info("eval: perplexity %.3f of %s on %s", ppl, loaded.source, cfg.eval.source)
    if cfg.eval.tasks:
        t1 = time.perf_counter()
        scores = zeroshot.on_device(loaded.model, loaded.tokenizer, cfg.eval, device)
        zeroshot.log_scores({"model": scores}, time.perf_counter() - t1)
        result["zeroshot"] = scores
        result["mean_acc"] = zeroshot.mean_acc(scores)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result))
    return result


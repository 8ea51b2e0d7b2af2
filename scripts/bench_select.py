"""Global-threshold selection, side by side: sort (concatenate + topk), torch's
prune.global_unstructured, the seed report's search, and radix.

Synthetic bf16 weights shaped like a real model's decoder blocks, magnitude and wanda
scores. Every (score, method) runs in a fresh subprocess so that its peak memory is its
own: peak extra memory = peak RSS during the call minus RSS just before it.

    python scripts/bench_select.py --shapes smollm2-135m --repeat 5 --write docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from distprune.config import PruneConfig
from distprune.methods import METHODS as PRUNE_METHODS
from distprune.select import ScoreStream, TieBudget, select, target_count
from distprune.stats import LayerStats

# (out, in) shapes of one decoder block's linear layers, and the number of blocks.
SHAPES = {
    "smollm2-135m": (30, lambda h=576, i=1536, kv=192: [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]),
    "tinyllama-1.1b": (22, lambda h=2048, i=5632, kv=256: [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]),
    "llama-2-7b": (32, lambda h=4096, i=11008: [(h, h), (h, h), (h, h), (h, h), (i, h), (i, h), (h, i)]),
}
METHODS = ("sort", "global_unstructured", "search", "radix", "radix-layers")
# radix-layers: radix over whole layers' scores, as a GPU runs it and as the CPU did before
# row-wise scores streamed in pieces (select.ScoreStream); radix: what distprune runs here


def make_weights(shapes: str, blocks: int | None, seed: int = 0, device: str = "cpu"):
    count, block = SHAPES[shapes]
    g = torch.Generator(device=device).manual_seed(seed)
    weights, norms = [], []
    for _ in range(blocks or count):
        for out_f, in_f in block():
            w = torch.randn(out_f, in_f, generator=g, device=device).mul_(0.02).to(torch.bfloat16)
            weights.append(w)
            # per-input-channel activation norms: heavy-tailed, like real LLM activations
            norms.append(torch.randn(in_f, generator=g, device=device).mul_(1.5).exp_())
    return weights, norms


def score_fn(name: str):
    """(weight, activation norms) -> scores of the registered method ``name``."""
    method, cfg = PRUNE_METHODS[name], PruneConfig(method=name)
    return lambda w, norms: method.score(w, LayerStats.from_norms(norms), cfg)


def weight_count(shapes: str, blocks: int | None) -> int:
    """Number of weights make_weights builds, without building them."""
    count, block = SHAPES[shapes]
    return (blocks or count) * sum(o * i for o, i in block())


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def child(args) -> None:
    weights, norms = make_weights(args.shapes, args.blocks, device=args.device)
    fn = score_fn(args.score)

    def score(i):
        return fn(weights[i], norms[i])

    n = sum(w.numel() for w in weights)
    k = target_count(args.sparsity, n)
    cuda = args.device.startswith("cuda")
    # distprune.masks scores one layer at a time, a row-wise layer in pieces on CPU
    stream = make_stream(list(range(len(weights))), weights, norms, fn, args.workers,
                         args.method == "radix" and not cuda and PRUNE_METHODS[args.score].rowwise)
    method = "radix" if args.method == "radix-layers" else args.method
    times, peaks, passes, masks = [], [], 1, None
    for rep in range(args.repeat):
        if args.method == "global_unstructured":
            modules, importance = _prunable_modules(weights, score, args.score)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak()
            base = rss_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        if args.method == "global_unstructured":
            from torch.nn.utils import prune

            prune.global_unstructured([(m, "weight") for m in modules], prune.L1Unstructured, amount=k,
                                      importance_scores=importance)
        else:
            sel = select(method, stream, k, n, search_max_iter=args.max_iter)
            passes = sel.passes
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024) - base
        peaks.append(peak)
        if rep == 0:
            if args.method == "global_unstructured":
                masks = [m.weight_mask == 0 for m in modules]
            else:
                budget = TieBudget(sel)
                masks = [budget.mask(s) for _, s in stream]
            np.packbits(torch.cat([m.reshape(-1).cpu() for m in masks]).numpy()).tofile(args.mask_out)
            masks = None
        if args.method == "global_unstructured":
            del modules, importance
    print(json.dumps({"times": times, "peak_bytes": peaks[0], "passes": passes, "n": n, "k": k,
                      "copy": copy_floor(weights, args.repeat, cuda)}))


def make_stream(mine: list[int], weights, norms, fn, workers: int, pieces: bool) -> ScoreStream:
    """The scores of layers ``mine``, as distprune streams them: with ``pieces``, row by row
    in cache-sized pieces."""
    score = lambda j: fn(weights[mine[j]], norms[mine[j]])
    if not pieces:
        return ScoreStream([str(i) for i in mine], score, workers)
    return ScoreStream([str(i) for i in mine], score, rows=lambda j, a, b: fn(weights[mine[j]][a:b], norms[mine[j]]),
                       shapes=[tuple(weights[i].shape) for i in mine])


def copy_floor(weights: list[torch.Tensor], repeat: int, cuda: bool) -> float:
    """Median seconds of a plain copy of every weight's bytes into one reused buffer (the
    size of the largest layer): what one pass over the weights costs at memory speed, the
    floor each selection pass is compared with."""
    buf = torch.empty(max(w.numel() for w in weights), dtype=weights[0].dtype, device=weights[0].device)
    times = []
    for _ in range(max(repeat, 3)):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for w in weights:
            buf[:w.numel()].view_as(w).copy_(w)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dist_child(args) -> None:
    """One rank of a world-size run (under torchrun): score and select over this rank's
    contiguous shard of the layers, collectives over gloo."""
    from types import SimpleNamespace

    from distprune import dist
    from distprune.plan import partition

    comm = dist.init()
    weights, norms = make_weights(args.shapes, args.blocks)
    shards = partition([SimpleNamespace(numel=w.numel(), i=i) for i, w in enumerate(weights)], comm.world_size)
    mine = [layer.i for layer in shards[comm.rank]]
    fn = score_fn(args.score)
    stream = make_stream(mine, weights, norms, fn, 1, args.method == "radix" and PRUNE_METHODS[args.score].rowwise)
    method = "radix" if args.method == "radix-layers" else args.method
    n = sum(w.numel() for w in weights)
    times, sent = [], 0
    for _ in range(args.repeat):
        before = comm.bytes_communicated
        comm.barrier()
        t0 = time.perf_counter()
        sel = select(method, stream, target_count(args.sparsity, n), n, comm, search_max_iter=args.max_iter)
        comm.barrier()
        times.append(time.perf_counter() - t0)
        sent = comm.bytes_communicated - before
    if comm.is_main:
        print(json.dumps({"times": times, "bytes": sent, "passes": sel.passes, "n": n}))
    dist.shutdown()


def run_ranks(args, score: str, method: str, ranks: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), __file__,
           "--dist-child", "--score", score, "--method", method, "--shapes", args.shapes, "--repeat",
           str(args.repeat), "--sparsity", str(args.sparsity), "--max-iter", str(args.max_iter)]
    if args.blocks:
        cmd += ["--blocks", str(args.blocks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"failed": error_line(out.stderr)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def workers_table(args) -> str:
    """The same selection with 1, 2, ... layers scored at once in threads (ScoreStream)."""
    lines = ["| score | method | scoring threads | median s | time / 1 thread |", "|---|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for score in args.scores.split(","):
            for method in args.methods.split(","):
                base = None
                for workers in [int(w) for w in args.workers_axis.split(",")]:
                    args.workers = workers
                    r = run_one(args, score, method, os.path.join(tmp, "mask.bits"))
                    if "failed" in r:
                        lines.append(f"| {score} | {method} | {workers} | {r['failed']} | |")
                        continue
                    med = statistics.median(r["times"])
                    base = base or med
                    lines.append(f"| {score} | {method} | {workers} | {med:.3f} | {med / base:.2f} |")
    return "\n".join(lines)


def ranks_table(args) -> str:
    lines = ["| score | method | ranks | median s | passes | bytes sent per rank per selection |",
             "|---|---|---:|---:|---:|---:|"]
    for score in args.scores.split(","):
        for method in args.methods.split(","):
            for ranks in [int(r) for r in args.world_sizes.split(",")]:
                r = run_ranks(args, score, method, ranks)
                if "failed" in r:
                    lines.append(f"| {score} | {method} | {ranks} | {r['failed']} | | |")
                    continue
                lines.append(f"| {score} | {method} | {ranks} | {statistics.median(r['times']):.3f} | "
                             f"{r['passes']} | {r['bytes']:,} |")
                print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def _prunable_modules(weights, score, kind):
    """Fresh modules over copies of the weights (global_unstructured rewrites them)."""
    from torch import nn

    modules = []
    for w in weights:
        m = nn.Module()
        m.weight = nn.Parameter(w.clone(), requires_grad=False)
        modules.append(m)
    importance = None if kind == "magnitude" else {(m, "weight"): score(i) for i, m in enumerate(modules)}
    return modules, importance


def run_one(args, score: str, method: str, mask_path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--score", score, "--method", method, "--mask-out", mask_path,
           "--shapes", args.shapes, "--repeat", str(args.repeat), "--sparsity", str(args.sparsity),
           "--max-iter", str(args.max_iter), "--device", args.device, "--workers", str(args.workers)]
    if args.blocks:
        cmd += ["--blocks", str(args.blocks)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:  # killed by the kernel's OOM killer (-9), or a real error
        why = "killed: out of memory" if out.returncode == -9 else error_line(out.stderr)
        return {"failed": why}
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(a: str, b: str, n: int) -> float:
    x, y = np.fromfile(a, dtype=np.uint8), np.fromfile(b, dtype=np.uint8)
    diff = int(np.unpackbits(x ^ y)[:n].sum())
    return 1.0 - diff / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--blocks", type=int, default=None, help="use the first N blocks only")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--max-iter", type=int, default=20, help="search: counting passes at most")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--scores", default="magnitude,wanda")
    p.add_argument("--device", default="cpu")
    p.add_argument("--write", default=None, help="markdown file to update with the table")
    p.add_argument("--world-sizes", default=None,
                   help="e.g. 1,2,4: time selection under torchrun (gloo) at each world size instead")
    p.add_argument("--workers", type=int, default=1, help="layers scored at once in threads (distprune: 1)")
    p.add_argument("--workers-axis", default=None,
                   help="e.g. 1,2,4: time each method with that many scoring threads instead")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dist-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--score", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--mask-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.dist_child:
        return dist_child(args)
    for axis, values, make_table in (("scoring threads", args.workers_axis, workers_table),
                                     ("ranks", args.world_sizes, ranks_table)):
        if values:
            table = make_table(args)
            print(table)
            if args.write:
                write_section(Path(args.write), args, weight_count(args.shapes, args.blocks), table,
                              f"{axis} {values}")
            return exit_on_errors(table)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for score in args.scores.split(","):
            results = {}
            for method in args.methods.split(","):
                path = os.path.join(tmp, f"{score}-{method}.bits")
                results[method] = run_one(args, score, method, path) | {"mask": path}
                print(f"{score:9s} {method:20s} {results[method].get('failed') or results[method]['times']}",
                      file=sys.stderr)
            ok = {m: r for m, r in results.items() if "failed" not in r}
            ref = ok.get("sort")
            radix = statistics.median(ok["radix"]["times"]) if "radix" in ok else None
            for method, r in results.items():
                if "failed" in r:
                    rows.append({"score": score, "method": method, "failed": r["failed"]})
                    continue
                med = statistics.median(r["times"])
                rows.append({
                    "score": score, "method": method, "median_s": med, "peak_extra_mib": r["peak_bytes"] / 2**20,
                    "passes": r["passes"], "n": r["n"], "copy_s": r["copy"],
                    "agreement": agreement(ref["mask"], r["mask"], r["n"]) if ref else None,
                    "x_radix": med / radix if radix else None,
                })
    table = render(rows)
    print(table)
    if args.write and any("n" in r for r in rows):
        write_section(Path(args.write), args, next(r["n"] for r in rows if "n" in r), table)
    exit_on_errors(table)


def error_line(stderr: str) -> str:
    """What a failed child says: its last line naming an error (torchrun ends with a banner)."""
    lines = stderr.strip().splitlines() or ["no output"]
    return "error: " + next((x.strip() for x in reversed(lines) if "Error" in x), lines[-1].strip())


def exit_on_errors(table: str) -> None:
    """A measurement that failed for any reason but memory (a broken script, a bad
    argument) fails the run: the table alone would hide it."""
    broken = [line for line in table.splitlines() if line.startswith("|") and "| error: " in line]
    if broken:
        sys.exit(f"{len(broken)} measurement(s) failed:\n" + "\n".join(broken))


def render(rows: list[dict]) -> str:
    """The methods table; "per pass / copy" is a selection pass's time (median / passes) over
    a plain copy of the same bytes, measured in the same process (``copy_floor``)."""
    lines = ["| score | method | median s | peak extra MiB | passes | agreement with sort | time / radix | "
             "copy floor s | per pass / copy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['score']} | {r['method']} | {r['failed']} | | | | | | |")
            continue
        agree = f"{100 * r['agreement']:.4f}%" if r["agreement"] is not None else "-"
        ratio = f"{r['x_radix']:.1f}x" if r["x_radix"] is not None else "-"
        lines.append(f"| {r['score']} | {r['method']} | {r['median_s']:.3f} | {r['peak_extra_mib']:.0f} | "
                     f"{r['passes']} | {agree} | {ratio} | {r['copy_s']:.4f} | "
                     f"{r['median_s'] / r['passes'] / r['copy_s']:.1f}x |")
    return "\n".join(lines)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_section(path: Path, args, n: int, table: str, axis: str = "methods") -> None:
    """Replace (or append) this configuration's section of the benchmarks file."""
    key = f"bench_select {args.shapes} blocks={args.blocks} device={args.device} {axis}"
    replace_section(path, key, f"Selection{', ' + axis if axis != 'methods' else ''}: {args.shapes} shapes"
                    f"{f', first {args.blocks} blocks' if args.blocks else ''}, {n / 1e6:.0f}M bf16 weights, "
                    f"sparsity {args.sparsity}, {args.device}", machine(args.device), args.repeat, table)


def replace_section(path: Path, key: str, title: str, where: str, repeat: int, table: str) -> None:
    """Replace (or append) the section marked ``key`` of a markdown file: title, date,
    machine, the command that was run and its table."""
    command = "python " + " ".join(sys.argv)
    replace_marked(path, key, f"### {title}\n\n{date.today().isoformat()}, {where}, median of {repeat}.\n\n"
                   f"`{command}`\n\n{table}\n")


def replace_marked(path: Path, key: str, body: str, new_file: str = "# Benchmarks\n") -> None:
    """Put body between the markers ``<!-- key -->`` and ``<!-- end key -->`` of a markdown
    file, replacing what was there, or append it with its markers; other sections stay."""
    section = f"<!-- {key} -->\n{body}<!-- end {key} -->\n"
    text = path.read_text() if path.exists() else new_file
    pattern = re.compile(rf"<!-- {re.escape(key)} -->.*?<!-- end {re.escape(key)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()

"""Solves (sparsegpt, alps) split over ranks: solve and total time for 1, 2, 3 ranks, side by side.

Each row is one real job (`python -m distprune prune=sparsegpt ...`, or torchrun with N
ranks) on a random-weight Llama whose shapes make the solves dominate (few calibration
tokens, wide layers); the report gives every rank's solve seconds and bytes moved. Every
process runs one thread (torchrun's default per rank, set for one process too), so the
rows differ only in how many ranks share the solves.

    python scripts/bench_solve.py --ranks 1,2,3 --write docs/BENCHMARKS.md
    python scripts/bench_solve.py --method sparsegpt,alps --ranks 1,2 --write docs/BENCHMARKS.md
    python scripts/make_checkpoint.py /tmp/llama-7b-4 --layers 4
    python scripts/bench_solve.py --path /tmp/llama-7b-4 --ranks 1,2 --write docs/BENCHMARKS.md

--path takes a checkpoint (the first blocks of Llama-2-7B's shapes above) instead of the
random model, read block by block as distprune streams it. Each row also gives the solve time
per block and how the owners split the work: each rank's share of the cost model's units
(sparsegpt.solve_cost, what owners are balanced by) against its share of the measured seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_select import machine, replace_marked

from distprune import alps, sparsegpt

COSTS = {"sparsegpt": sparsegpt.solve_cost, "alps": alps.solve_cost}


def job(args, method: str, ranks: int, out: Path) -> dict:
    launcher = ([sys.executable] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)])
    h, i, blocks = args.hidden, args.intermediate, args.blocks
    model = (["model=hf", f"model.path={args.path}"] if args.path else
             ["model=tiny-llama", f"model.random.hidden_size={h}", f"model.random.intermediate_size={i}",
              f"model.random.num_hidden_layers={blocks}", f"model.random.num_attention_heads={h // 64}",
              f"model.random.num_key_value_heads={h // 64}"])
    cmd = [*launcher, "-m", "distprune", *model, f"prune.method={method}",
           *(["prune.scope=nm", "prune.m=4", "prune.sparsity=0.5"] if args.nm else ["prune.scope=layer"]),
           f"prune.mode={args.mode}", "calib.source=random", f"calib.nsamples={args.nsamples}",
           f"calib.seqlen={args.seqlen}", "calib.batch_size=1", "save=false", "device=cpu", f"output_dir={out}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{method} on {ranks} ranks failed: {p.stderr[-2000:]}")
    report = json.loads((out / "distprune_report.json").read_text())
    return {"wall": wall, "report": report}


def shares(report: dict, cost) -> tuple[list[float], list[float]]:
    """Each rank's share of the cost model's units and of the measured solve seconds, from the
    report's per-layer solves (shape, seconds, rank)."""
    model, seconds = [0.0] * report["world_size"], [0.0] * report["world_size"]
    for d in report["solve"]["layers"].values():
        model[d["rank"]] += cost(*d["shape"])
        seconds[d["rank"]] += d["seconds"]
    return [m / sum(model) for m in model], [s / sum(seconds) for s in seconds]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,3")
    p.add_argument("--method", default="sparsegpt", help="solve methods, comma-separated (sparsegpt, alps)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=6, help="calibration windows: whole batches of 1 per rank")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--mode", default="sequential")
    p.add_argument("--nm", action="store_true", help="2:4 instead of 50%% per layer")
    p.add_argument("--path", default=None, help="a checkpoint instead of the random model (e.g. 7B shapes)")
    p.add_argument("--write", default=None)
    args = p.parse_args()

    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.method.split(","):
            base = None
            for ranks in [int(r) for r in args.ranks.split(",")]:
                got = job(args, method, ranks, Path(tmp) / f"{method}-ws{ranks}")
                r = got["report"]
                solve = r["solve"]["seconds_per_rank"]
                moved = max(sum(b) for b in r["solve"]["bytes_per_block_per_rank"])
                base = base or (max(solve), got["wall"])
                first = first or base  # the first method's one-rank run: the other methods' times relative to it
                blocks = len({layer["block"] for layer in r["layers"]})
                model, measured = shares(r, COSTS[method])
                rows.append(f"| {method} | {ranks} | {got['wall']:.1f} | {r['seconds']['statistics']:.1f} | "
                            f"{max(solve):.1f} | {', '.join(f'{s:.1f}' for s in solve)} | "
                            f"{sum(solve) / blocks:.1f} | {', '.join(f'{x:.2f}' for x in model)} | "
                            f"{', '.join(f'{x:.2f}' for x in measured)} | "
                            f"{base[0] / max(solve):.2f} | {base[1] / got['wall']:.2f} | "
                            f"{max(solve) / first[0]:.2f} | {got['wall'] / first[1]:.2f} | {moved / 1e6:.1f} | "
                            f"{r['pruned_fraction']:.4f} |")
                print(rows[-1], file=sys.stderr)
    table = "\n".join(["| method | ranks | wall s | statistics s | solve s (slowest rank) | solve s per rank | "
                       "solve s per block (all ranks) | cost model share per rank | measured share per rank | "
                       "solve speedup | wall speedup | solve / first | wall / first | MB moved per rank | "
                       "pruned fraction |", "|---|---:|---:|---:|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
                       *rows])
    print(table)
    if args.write:
        h, i = args.hidden, args.intermediate
        marker = "bench_solve" if args.method == "sparsegpt" else f"bench_solve {args.method}"
        model = (f"Checkpoint {args.path} ({r['prunable_weights'] / 1e6:.1f}M prunable weights, {blocks} blocks)"
                 if args.path else f"Random Llama, hidden {h}, intermediate {i}, {args.blocks} blocks "
                 f"({args.blocks * (4 * h * h + 3 * h * i) / 1e6:.1f}M prunable weights)")
        marker = marker + (" path" if args.path else "")
        replace_marked(Path(args.write), marker, (
            f"### {args.method.replace(',', ' and ')} solves split over ranks{' (checkpoint)' if args.path else ''}\n\n"
            f"{time.strftime('%Y-%m-%d')}, {machine('cpu').rsplit(',', 1)[0]}, one thread per process. "
            f"{model}, "
            f"{'2:4' if args.nm else '50% per layer'}, {args.mode}, calibration {args.nsamples} x {args.seqlen} "
            f"random tokens.\n\n`python {' '.join(sys.argv)}`\n\n{table}\n"))


if __name__ == "__main__":
    main()

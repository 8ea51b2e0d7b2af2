"""Loading per rank, side by side: every rank loads the whole checkpoint (model.stream=false)
or streams it: only its own layers and the tensors outside the decoder blocks (what a job
with forward passes keeps; blocks are read when a pass needs them). Each load runs in a
fresh subprocess, then reads every tensor it loaded (as pruning or saving does); extra
memory is its peak RSS minus the RSS before the load.

    python scripts/bench_load.py --world-sizes 2,4 --repeat 3 --write docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_select import machine, replace_section, reset_peak, rss_kib

from distprune import layers, models, plan, writer
from distprune.config import ModelConfig


def child(args) -> None:
    cfg = ModelConfig(name=args.model, path=args.path)
    models.load_streamed(cfg, lambda m: set())  # warm up: conversion of a preset, imports, the meta model
    reset_peak()
    base = rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if args.mode == "full":
        loaded = models.load(cfg)
        nbytes = sum(t.numel() * t.element_size() for t in writer.unique_state_dict(loaded.model).values())
    else:
        loaded, nbytes = models.load_streamed(cfg, lambda m: plan.shard_keys(m, [], [], args.ws, False)[args.rank]
                                              | layers.outside_keys(m))
    for t in loaded.model.state_dict().values():  # page in what was loaded, as pruning or saving would
        if not t.is_meta:
            t.float().sum()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "read": nbytes, "extra": rss_kib("VmHWM") * 1024 - base}))


def measure(args, mode: str, ws: int, rank: int) -> dict:
    runs = []
    for _ in range(args.repeat):
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--ws", str(ws), "--rank", str(rank),
               "--model", args.model, *(["--path", args.path] if args.path else [])]
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="built-in preset name")
    p.add_argument("--path", default=None, help="a safetensors checkpoint directory instead")
    p.add_argument("--world-sizes", default="2,4")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--write", default=None, help="markdown file to update with the table")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    p.add_argument("--ws", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    full = measure(args, "full", 1, 0)
    rows = [f"| every rank, full | any | {full['read'] / 2**20:.0f} | {full['extra'] / 2**20:.0f} | "
            f"{full['seconds']:.2f} | 1.00 |"]
    for ws in [int(w) for w in args.world_sizes.split(",")]:
        for rank in range(ws):
            r = measure(args, "shard", ws, rank)
            rows.append(f"| {ws} ranks, streamed | {rank} | {r['read'] / 2**20:.0f} | {r['extra'] / 2**20:.0f} | "
                        f"{r['seconds']:.2f} | {full['extra'] / max(r['extra'], 1):.2f} |")
    table = ("| load | rank | MiB read | peak extra MiB | seconds (load + read) | memory saved (full / streamed) |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(table)
    if args.write:
        name = args.path or args.model
        replace_section(Path(args.write), f"bench_load {name}", f"Loading per rank: {name}", machine("cpu"),
                        args.repeat, table)


if __name__ == "__main__":
    main()

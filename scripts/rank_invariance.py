"""How far a job's result moves with the number of ranks: the same job as one plain process
(every core's threads) and as torchrun ranks (one thread each), side by side, then the share
of prunable weights whose mask agrees and the largest difference of a weight kept by both,
relative to its layer's max |W|.

    python scripts/make_checkpoint.py /tmp/llama-128m --shape llama-128m \
        --tokenizer ~/.cache/distprune/models/smollm2-135m
    DISTPRUNE_DATA=../shared/data python scripts/rank_invariance.py /tmp/llama-128m --ranks 2

The default job is issue 22's: sequential SparseGPT, layer scope, 50%, calibrated on 8 windows
of 128 WikiText-2 tokens, in the checkpoint's dtype. Extra key=value arguments replace or add
settings. Prints one line per rank count and writes nothing outside --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

JOB = ["prune=sparsegpt", "prune.scope=layer", "prune.mode=sequential", "prune.sparsity=0.5",
       "calib=wikitext2-local", "calib.nsamples=8", "calib.seqlen=128", "calib.cache=false", "eval=none"]


def run(ranks: int, ckpt: Path, out: Path, extra: list[str]) -> None:
    launcher = ([sys.executable] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"])
    cmd = [*launcher, "-m", "distprune", "model=hf", f"model.path={ckpt}", *JOB, *extra, f"output_dir={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a_dir: Path, b_dir: Path) -> tuple[float, float, int]:
    """(mask agreement over the pruned layers, largest kept-weight difference / max|W| of
    its layer, weights compared)."""
    layers = json.loads((a_dir / "distprune_report.json").read_text())["layers"]
    a, b = tensors(a_dir), tensors(b_dir)
    agree = total = 0
    worst = 0.0
    for name in {entry["name"] for entry in layers}:
        key = f"{name}.weight" if f"{name}.weight" in a else name
        x, y = a[key].float(), b[key].float()
        agree += int(((x == 0) == (y == 0)).sum())
        total += x.numel()
        both = (x != 0) & (y != 0)
        if both.any():
            worst = max(worst, float((x - y)[both].abs().max()) / float(x.abs().max()))
    return agree / total, worst, total


def solve_seconds(directory: Path) -> str:
    """Seconds each rank spent solving (solve methods), from the report."""
    solve = json.loads((directory / "distprune_report.json").read_text()).get("solve") or {}
    return ", ".join(f"{t:.1f}" for t in solve.get("seconds_per_rank", [])) or "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--ranks", default="2", help="comma-separated torchrun rank counts")
    p.add_argument("--work", type=Path, default=None, help="where the outputs go (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="key=value settings added to the job")
    args = p.parse_intermixed_args()
    with tempfile.TemporaryDirectory(prefix="rank-invariance-") as tmp:
        work = args.work or Path(tmp)
        run(1, args.checkpoint.resolve(), work / "ws1", args.overrides)
        for ranks in (int(r) for r in args.ranks.split(",")):
            run(ranks, args.checkpoint.resolve(), work / f"ws{ranks}", args.overrides)
            agree, worst, n = compare(work / "ws1", work / f"ws{ranks}")
            print(f"1 process vs {ranks} ranks: masks agree on {100 * agree:.4f}% of {n} weights; "
                  f"largest kept-weight difference {worst:.3g} of max|W|; solve seconds {solve_seconds(work / 'ws1')}"
                  f" (1 process), {solve_seconds(work / f'ws{ranks}')} ({ranks} ranks)")


if __name__ == "__main__":
    main()

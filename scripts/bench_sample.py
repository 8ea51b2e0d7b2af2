"""Sampling calibration text from the model (calib=self), side by side: Hugging Face's
generate against distprune's sampler, OpenMP threads spinning (torch's default) against
waiting passively (distprune's default), on a quiet machine and beside busy processes.

Each wait policy and machine load runs in a fresh process (the OpenMP wait policy is read
once, when torch loads), which measures both samplers, each after a warm-up run; "busy"
starts --busy processes that spin in pure Python for the duration.

    python scripts/bench_sample.py --tokens 32 --busy 2 --write docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SAMPLERS = ("generate", "distprune")
WAITS = ("spin", "passive")


def child(args) -> None:
    # torch first: distprune would otherwise set OMP_WAIT_POLICY=PASSIVE for the spin rows;
    # the parent sets the policy of each row in the environment
    import torch

    from distprune.config import ModelConfig
    from distprune.data import self_windows
    from distprune.models import load

    model = load(ModelConfig(name=args.model, path=args.path)).model
    bos = model.config.bos_token_id if isinstance(model.config.bos_token_id, int) else 0

    def generate():
        prompt = torch.full((args.nsamples, 1), bos, dtype=torch.long)
        torch.manual_seed(0)
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                              pad_token_id=bos, eos_token_id=None)

    out = {}
    for sampler in SAMPLERS:
        run = generate if sampler == "generate" else lambda: self_windows(model, args.nsamples, args.tokens + 1, 0,
                                                                          show=False)
        run()  # warm-up (and a check that it runs)
        t0 = time.perf_counter()
        ids = run()
        seconds = time.perf_counter() - t0
        assert ids.shape == (args.nsamples, args.tokens + 1)
        out[sampler] = {"ms_per_token": 1000 * seconds / args.tokens, "threads": torch.get_num_threads(),
                        "policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    print(json.dumps(out))


def measure(args, wait: str, busy: int) -> dict[str, dict]:
    """Each sampler's result ({"ms_per_token": ...} or {"failed": the error line}) in one
    process with this wait policy, beside ``busy`` spinning processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if wait == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        cmd = [sys.executable, __file__, "--child", "--wait", wait, "--tokens", str(args.tokens), "--nsamples",
               str(args.nsamples), "--model", args.model, *(["--path", args.path] if args.path else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["no output"]
        failed = {"failed": "error: " + next((x for x in reversed(lines) if "Error" in x), lines[-1])}
        return dict.fromkeys(SAMPLERS, failed)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="built-in preset name")
    p.add_argument("--path", default=None, help="a Hugging Face model directory instead")
    p.add_argument("--tokens", type=int, default=32, help="tokens sampled per sequence (after a warm-up run)")
    p.add_argument("--nsamples", type=int, default=32, help="sequences sampled at once (the default calib.nsamples)")
    p.add_argument("--busy", type=int, default=2, help="busy processes beside the measurement in the busy rows")
    p.add_argument("--write", default=None, help="markdown file to update with the table")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--wait", choices=WAITS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from bench_select import machine, replace_section

    lines = ["| machine | sampler | OpenMP threads wait | ms per token (batch of "
             f"{args.nsamples}) | time / distprune, passive |", "|---|---|---|---:|---:|"]
    for busy in (0, args.busy):
        load = "quiet" if busy == 0 else f"{busy} busy processes"
        measured = {w: measure(args, w, busy) for w in WAITS}
        rows = {(s, w): measured[w][s] for s in SAMPLERS for w in WAITS}
        ref = rows[("distprune", "passive")].get("ms_per_token")
        for (sampler, wait), r in rows.items():
            if "failed" in r:
                lines.append(f"| {load} | {sampler} | {wait} | {r['failed']} | |")
                continue
            ratio = f"{r['ms_per_token'] / ref:.2f}" if ref else "-"
            lines.append(f"| {load} | {sampler} | {wait} | {r['ms_per_token']:.0f} | {ratio} |")
            print(lines[-1], file=sys.stderr)
    table = "\n".join(lines)
    print(table)
    if args.write:
        name = args.path or args.model
        replace_section(Path(args.write), f"bench_sample {name}", f"Sampling calibration text (calib=self): {name}",
                        machine("cpu"), 1, table)
    if "| error: " in table:
        sys.exit("a measurement failed")


if __name__ == "__main__":
    main()

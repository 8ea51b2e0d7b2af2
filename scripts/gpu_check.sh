#!/usr/bin/env bash
# One prepared check for a machine with one NVIDIA GPU, torch/transformers/accelerate/
# safetensors installed and no network (Hydra and the rest travel as wheels in .whl/).
# Prepare here (pure-Python wheels, any Python 3 platform; hypothesis ships compiled wheels,
# so tests/test_select.py needs it on the machine), then run it with carry [".whl"]:
#   pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
#       pytest pluggy iniconfig
# Under 8 minutes on an H100/H200: the test suite, bench_select at Llama-2-7B shapes, and an
# end-to-end oneshot Wanda prune of a random-weight 7B Llama with 128 x 2048 calibration
# tokens. Everything it prints also lands in $OUT (or ./gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

echo "== tests (device auto: cuda where the code picks it) =="
timeout 180 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -5 | tee "$OUT/tests.txt"

echo "== radix vs sort on CUDA scores: identical masks =="
timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/cuda_select.txt"
import torch
from distprune.select import ScoreStream, TieBudget, select
g = torch.Generator(device="cuda").manual_seed(0)
for dtype in (torch.bfloat16, torch.float32):
    layers = [(torch.randn(512, 777, device="cuda", generator=g) * 0.02).to(dtype).abs() for _ in range(5)]
    n = sum(x.numel() for x in layers); k = n // 2
    masks = {}
    for sel_name in ("radix", "sort"):
        sel = select(sel_name, ScoreStream.of(layers), k, n)
        budget = TieBudget(sel)
        masks[sel_name] = torch.cat([budget.mask(s).flatten() for s in layers])
    same = torch.equal(masks["radix"], masks["sort"])
    print(dtype, "pruned", int(masks["radix"].sum()), "of", n, "identical:", same)
PY

echo "== bench_select, Llama-2-7B shapes, bf16, cuda =="
timeout 240 python3 scripts/bench_select.py --shapes llama-2-7b --device cuda --repeat 3 \
  --methods sort,search,radix --write "$OUT/BENCHMARKS.md" 2>&1 | tail -12 | tee "$OUT/bench.txt"

echo "== end to end: oneshot wanda, random 7B Llama, 128 x 2048 calibration tokens =="
timeout 300 python3 -m distprune model=llama-2-7b-random calib.source=random calib.nsamples=128 \
  calib.seqlen=2048 calib.batch_size=8 calib.cache=false prune.scope=global device=cuda save=false \
  output_dir="$OUT/e2e" overwrite=true 2>&1 | grep -v "it/s" | tail -8 | tee "$OUT/e2e.txt"
python3 -c "import json; r = json.load(open('$OUT/e2e/distprune_report.json')); print('seconds', r['seconds']); print('peak_gpu_gib', r.get('peak_gpu_gib'))" 2>&1 | tee -a "$OUT/e2e.txt"

#!/usr/bin/env bash
# One prepared check for a machine with one NVIDIA GPU, torch/transformers/accelerate/
# safetensors installed and no network (Hydra and the rest travel as wheels in .whl/).
# Prepare here (pure-Python wheels, any Python 3 platform; hypothesis ships compiled wheels,
# so tests/test_select.py needs it on the machine), then run it with carry [".whl"]:
#   pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
#       pytest pluggy iniconfig
# Under 10 minutes on an H100/H200: the test suite, bench_select at Llama-2-7B shapes, an
# end-to-end oneshot Wanda prune of a random-weight 7B Llama with 128 x 2048 calibration
# tokens, and SparseGPT 2:4 on its first 4 blocks with 32 x 2048 tokens. Everything it prints also lands in $OUT (or ./gpu_check_out).
# SMOKE=1 runs the same steps on the CPU at tiny shapes, without the test suite (the test
# suite runs it that way: tests/test_scripts.py), so that the script cannot rot unseen.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu SHAPES="--shapes smollm2-135m --blocks 1" REPEAT=1 MODEL=tiny-llama NSAMPLES=4 SEQLEN=64 BATCH=2
  NSAMPLES_SOLVE=2
else
  DEVICE=cuda SHAPES="--shapes llama-2-7b" REPEAT=3 MODEL=llama-2-7b-random NSAMPLES=128 SEQLEN=2048 BATCH=8
  NSAMPLES_SOLVE=32
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
fail=0  # a step that fails makes the script exit 1, after the other steps have run

if [ "${SMOKE:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
  echo "== tests (device auto: cuda where the code picks it) =="
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/test_scripts.py 2>&1 | tail -5 | tee "$OUT/tests.txt" || fail=1
fi

echo "== radix vs sort on $DEVICE scores: identical masks =="
DEVICE=$DEVICE timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/cuda_select.txt"
import os
import torch
from distprune.select import ScoreStream, TieBudget, select
device = os.environ["DEVICE"]
g = torch.Generator(device=device).manual_seed(0)
for dtype in (torch.bfloat16, torch.float32):
    layers = [(torch.randn(512, 777, device=device, generator=g) * 0.02).to(dtype).abs() for _ in range(5)]
    n = sum(x.numel() for x in layers); k = n // 2
    masks = {}
    for sel_name in ("radix", "sort"):
        sel = select(sel_name, ScoreStream.of(layers), k, n)
        budget = TieBudget(sel)
        masks[sel_name] = torch.cat([budget.mask(s).flatten() for s in layers])
    same = torch.equal(masks["radix"], masks["sort"])
    print(dtype, "pruned", int(masks["radix"].sum()), "of", n, "identical:", same)
    assert same, "radix and sort masks differ"
PY
[ "${PIPESTATUS[0]}" = 0 ] || fail=1

echo "== bench_select, $SHAPES, bf16, $DEVICE =="
timeout 240 python3 scripts/bench_select.py $SHAPES --device $DEVICE --repeat $REPEAT \
  --methods sort,search,radix --write "$OUT/BENCHMARKS.md" 2>&1 | tail -12 | tee "$OUT/bench.txt" || fail=1

echo "== end to end: oneshot wanda, $MODEL, $NSAMPLES x $SEQLEN calibration tokens =="
timeout 300 python3 -m distprune model=$MODEL calib.source=random calib.nsamples=$NSAMPLES \
  calib.seqlen=$SEQLEN calib.batch_size=$BATCH calib.cache=false prune.scope=global device=$DEVICE save=false \
  output_dir="$OUT/e2e" overwrite=true 2>&1 | grep -v "it/s" | tail -8 | tee "$OUT/e2e.txt" || fail=1
python3 -c "import json; r = json.load(open('$OUT/e2e/distprune_report.json')); print('seconds', r['seconds']); print('peak_gpu_gib', r.get('peak_gpu_gib'))" 2>&1 | tee -a "$OUT/e2e.txt" || fail=1
echo "== end to end: sparsegpt 2:4, sequential, the first 4 blocks of $MODEL, $NSAMPLES_SOLVE x $SEQLEN tokens =="
timeout 300 python3 -m distprune model=$MODEL calib.source=random calib.nsamples=$NSAMPLES_SOLVE \
  calib.seqlen=$SEQLEN calib.batch_size=$BATCH prune=sparsegpt-2of4 "prune.include=['model.layers.[0-3].*']" \
  device=$DEVICE save=false output_dir="$OUT/e2e_sparsegpt" overwrite=true 2>&1 | grep -v "it/s" | tail -6 \
  | tee "$OUT/e2e_sparsegpt.txt" || fail=1
python3 -c "import json; r = json.load(open('$OUT/e2e_sparsegpt/distprune_report.json')); print('seconds', r['seconds']); print('pruned', r['pruned_fraction'], 'raised percdamp', r['solve']['raised_percdamp']); print('peak_gpu_gib', r.get('peak_gpu_gib'))" 2>&1 | tee -a "$OUT/e2e_sparsegpt.txt" || fail=1
exit $fail

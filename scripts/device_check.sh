#!/usr/bin/env bash
# Run on a lent GPU machine (the session's device tool), from the repo root: the parity tests on
# CUDA (the engine's decode graphs among them), one decode step replayed from a CUDA graph
# (benchmarks/probe_decode_graph.py), profiled decode steps, and the multi-LoRA benchmark with
# --device cuda on the time left; logs and JSON land in $OUT (at most 8 files come back). Each
# stage has its own time limit and runs even when one before it failed, so that one call inside
# the device's 10-minute limit brings back whatever could be measured.
#
#     bash scripts/device_check.sh                  # all stages: tests graph profile bench
#     BUDGET_S=150 bash scripts/device_check.sh tests profile
#     BENCH_ARGS="--only engine_multi_lora hf_generate_base" bash scripts/device_check.sh bench
#
# That machine's image has torch (CUDA) but no bitsandbytes, an older transformers and none of
# pydantic, google-re2 or llguidance, and it cannot download: carry Python 3.12 wheels in .whl/
# first (scripts/device_wheels.sh). They are unpacked into a folder on PYTHONPATH, ahead of the
# image's own packages; the checkout's server/ and clients/python/ are imported in place.
set -uo pipefail
OUT=${OUT:-/tmp/loraserve-device}
BUDGET_S=${BUDGET_S:-580}  # the whole script's seconds; the device call's limit is 600
SITE=/tmp/loraserve-site
mkdir -p "$OUT" "$SITE"
for wheel in .whl/*; do python3 -m zipfile -e "$wheel" "$SITE"; done
export PYTHONPATH="$SITE:$PWD/server:$PWD/clients/python" PYTHONUNBUFFERED=1
export LORASERVE_KERNELS=off  # no CUDA path calls the CPU kernels: a fresh machine need not build them

STAGES=" ${*:-tests graph profile bench} "
left() { echo $((BUDGET_S - SECONDS - $1)); }  # seconds left, keeping $1 for what follows

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  lscpu | grep -E "^Model name|^CPU\(s\)"
  python3 -c "import sys, torch, transformers, bitsandbytes, peft
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__,
      'peft', peft.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

if [[ $STAGES == *" tests "* ]]; then
  timeout 150 python3 -m pytest tests/model/test_decode_graphs.py tests/engine/test_parity.py -q \
    -p no:cacheprovider -k cuda 2>&1 | tee "$OUT/gpu_tests.log"
fi

if [[ $STAGES == *" graph "* ]]; then
  timeout 120 python3 benchmarks/probe_decode_graph.py --compute-dtype bf16 2>&1 \
    | tee "$OUT/graph_cuda_bf16.log"
fi

if [[ $STAGES == *" profile "* ]]; then
  timeout 100 python3 benchmarks/profile_step.py --device cuda --compute-dtype bf16 \
    --new-tokens 32 --rows 15 2>&1 | tee "$OUT/profile_cuda_bf16.log"
  timeout 100 python3 benchmarks/profile_step.py --device cuda --compute-dtype bf16 \
    --new-tokens 32 --rows 15 --adapters 2>&1 | tee "$OUT/profile_cuda_bf16_adapters.log"
fi

if [[ $STAGES == *" bench "* ]]; then  # a .partial.json holds the rounds if the rest is cut off
  timeout "$(left 0)" python3 benchmarks/bench_multi_lora.py --device cuda --compute-dtype bf16 \
    --repeats "${REPEATS:-2}" ${BENCH_ARGS:-} --out "$OUT/multi_lora_cuda_bf16.json" 2>&1 \
    | tee "$OUT/bench.log"
fi
exit 0

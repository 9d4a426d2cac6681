#!/usr/bin/env bash
# Run on a lent GPU machine (the session's device tool), from the repo root: the parity tests on
# CUDA and the multi-LoRA benchmark with --device cuda; logs and JSON land in $OUT.
#
# That machine's image has torch (CUDA) but no bitsandbytes and an older transformers, and it
# cannot download: carry wheels for Python 3.12 in .whl/ first (see docs/gpu.md).
set -euo pipefail
OUT=${OUT:-/tmp/loraserve-device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --find-links .whl/ \
  bitsandbytes transformers peft accelerate grpcio grpcio-health-checking grpcio-reflection \
  grpcio-status protobuf prometheus-client pytest-asyncio llguidance jsonschema
python3 -m pip install -q --no-deps --no-build-isolation -e ./clients/python  # the stubs
python3 -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -m pytest tests/engine/test_parity.py tests/engine/test_logprob_parity.py \
  tests/engine/test_constrained.py -q -p no:cacheprovider -k cuda 2>&1 \
  | tee "$OUT/gpu_tests.log"
python3 benchmarks/bench_multi_lora.py --device cuda --compute-dtype bf16 --repeats 3 \
  --out "$OUT/multi_lora_cuda_bf16.json" 2>&1 | tee "$OUT/bench.log"

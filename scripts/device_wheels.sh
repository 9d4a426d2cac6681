#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the Python 3.12 wheels that a lent GPU machine lacks, for
# scripts/device_check.sh to unpack there. Its image has no network; `image_has` names the
# runtime dependencies it holds in a version this project runs on, `carried` pins the rest (and
# newer grpcio, which the generated stubs require). tests/test_distribution.py checks that every
# runtime dependency in pyproject.toml is in one list or the other. bitsandbytes' wheel holds a
# library for every CUDA and ROCm version (43 MB of the 64 MiB a device call may carry); only
# the CPU and CUDA 13 ones are kept. Run from anywhere; needs PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
image_has=(torch tokenizers safetensors accelerate prometheus-client)
carried=(
  bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2 regex
  grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.3
  googleapis-common-protos==1.76.0 protobuf==7.36.2
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  annotated-types typing-inspection typing_extensions
  google-re2==1.1.20251105 llguidance==1.9.1 starlette==1.10.0 uvicorn==0.54.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
)
mkdir -p .git/info
grep -qsx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
rm -rf .whl
platforms=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
  manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${carried[@]}"
python3 - <<'EOF'
import re
import zipfile
from pathlib import Path

(wheel,) = Path(".whl").glob("bitsandbytes-*.whl")
pruned = wheel.with_name("bitsandbytes-pruned.zip")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(pruned, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if not re.search(r"libbitsandbytes_(cuda1[0-2]\d|rocm|xpu)", info.filename):
            dst.writestr(info, src.read(info.filename))
wheel.unlink()
EOF
du -sh .whl

#!/usr/bin/env bash
# llama.cpp's CPU tools for benchmarks/bench_llama_cpp.py (llama-batched-bench, llama-quantize,
# llama-server) and its LoRA converter, built for this CPU (GGML_NATIVE) from the llama.cpp that
# llama-cpp-python 0.3.36 vendors (commit 0c1e570 of 2026-10-01): its source distribution on
# PyPI, the one registry this project's machines reach. About 15 minutes on 2 cores. The tools
# land in ~/.cache/loraserve/llama.cpp/0.3.36/bin (or $1/bin), the converter in .../convert.
#
# LLAMA_CPP_NO_AMX=1 builds without AMX (its tile buffer type): on the 2-core Intel Xeon with AMX
# of 2026-12-05, tools built with it crash at start with repacked weights (their default).
set -euo pipefail

version=0.3.36
dest=${1:-$HOME/.cache/loraserve/llama.cpp/$version}
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --no-deps --no-binary :all: \
  "llama-cpp-python==$version" -d "$work"
tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
source_dir="$work/llama_cpp_python-$version/vendor/llama.cpp"
isa_flags=()
if [[ "${LLAMA_CPP_NO_AMX:-0}" == 1 ]]; then  # GCC keeps explicit -mno-* over -march=native's
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  isa_flags=(-DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx")
fi

cmake -S "$source_dir" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DBUILD_SHARED_LIBS=OFF "${isa_flags[@]}" > "$work/cmake.log"
tools=(llama-batched-bench llama-quantize llama-server)
cmake --build "$work/build" -j"$(nproc)" --target "${tools[@]}" > "$work/build.log"
mkdir -p "$dest/bin" "$dest/convert"
for tool in "${tools[@]}"; do cp "$work/build/bin/$tool" "$dest/bin/"; done
cp -r "$source_dir/convert_lora_to_gguf.py" "$source_dir/conversion" "$source_dir/gguf-py" \
  "$dest/convert/"
echo "llama.cpp tools in $dest/bin"

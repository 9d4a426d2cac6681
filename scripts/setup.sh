#!/usr/bin/env bash
# Set up a development or CI machine from the repo root: the system tools the tests use
# (Prometheus, promtool and openssl from Debian, the buf CLI from npm), a virtual environment
# in .venv with torch installed first (a bare torch requirement would pull a multi-GB CUDA
# build onto a CPU machine; on a GPU machine this same pin installs the CUDA wheel), then the
# client distribution from clients/python (the server depends on it; installed from the checkout
# first, so nothing looks for it on an index), then the project (with Ray Serve, the `ray` extra;
# the libraries whose internals it relies on at the versions in constraints.txt) and its compiled
# CPU kernels. Both are editable: edits in the checkout take effect.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  missing+=(prometheus)
fi
command -v openssl >/dev/null || missing+=(openssl)  # the TLS tests make their certificates
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "setup: install ${missing[*]} (the metrics and TLS tests use them)" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ./clients/python
.venv/bin/pip install -q -c constraints.txt -e '.[dev,bench,ray]'  # the tested versions
.venv/bin/python -m loraserve.model.kernels  # the C++ CPU kernels for this CPU
npm install --silent --no-save --prefix .tools @bufbuild/buf

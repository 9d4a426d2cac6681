PY ?= .venv/bin/python
BUF ?= .tools/node_modules/.bin/buf

.PHONY: proto lint format test bench

proto:  ## regenerate clients/python/loraserve_client/v1 from protos/
	$(PY) protos/generate.py

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy
	cd protos && ../$(BUF) lint

format:
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

test:
	$(PY) -m pytest -q

bench:
	$(PY) benchmarks/bench_multi_lora.py --out benchmarks/results/latest.json
	$(PY) benchmarks/bench_adapter_sweep.py --out benchmarks/results/sweep_latest.json \
		--plot benchmarks/results/adapter_sweep_latest.png

# mlxd — every target sets up what it needs from nothing (a fresh clone and a bare Python 3.10+).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TS := client/typescript
TS_STAMP := $(TS)/node_modules/.installed
BUF := $(TS)/node_modules/.bin/buf

.PHONY: setup setup-gpu blas proto proto-check proto-lint lint format typecheck test ts-test check demo bench clean

$(STAMP): pyproject.toml
	@$(MAKE) -s blas
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the local CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q -e ".[daemon,dev]"
	touch $(STAMP)

setup: $(STAMP)

# On a Linux machine with an NVIDIA GPU (CUDA 13): swap MLX's CPU backend for the CUDA one.
setup-gpu: $(STAMP)
	$(PY) -m pip uninstall -q -y mlx-cpu
	$(PY) -m pip install -q "mlx[cuda13]==0.32.4"
	$(PY) -c "import mlx.core as mx; print('MLX device:', mx.default_device())"

# MLX's Linux wheel uses a reference BLAS (~30x slower matmul); workers preload OpenBLAS when it is installed.
blas:
	@if [ "$$(uname)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing libopenblas0-pthread (optimized BLAS for MLX)"; \
			(apt-get install -y -qq libopenblas0-pthread || (apt-get update -qq && \
				apt-get install -y -qq libopenblas0-pthread)) >/dev/null 2>&1 || \
				echo "warning: could not install libopenblas0-pthread; MLX matmul will be ~30x slower"; \
		else \
			echo "warning: no OpenBLAS found; install libopenblas0-pthread (or set MLXD_BLAS) for ~30x faster MLX"; \
		fi; \
	fi

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=client --grpc_python_out=client --pyi_out=client \
		proto/mlxd/v1/mlxd.proto

# Fails when the committed stubs differ from what `make proto` generates now.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -I proto --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp \
		proto/mlxd/v1/mlxd.proto; \
	for f in mlxd_pb2.py mlxd_pb2_grpc.py mlxd_pb2.pyi; do \
		cmp -s $$tmp/mlxd/v1/$$f client/mlxd/v1/$$f || { echo "stale stub client/mlxd/v1/$$f: run make proto"; exit 1; }; \
	done; rm -rf $$tmp; echo "proto stubs are fresh"

# TypeScript client and buf need Node >= 20 with npm; make test runs the TypeScript tests, so fail clearly without.
# --ignore-scripts: buf and protobufjs work without their postinstall steps.
$(TS_STAMP): $(TS)/package.json $(TS)/package-lock.json
	@node -e 'process.exit(parseInt(process.versions.node) < 20 ? 1 : 0)' 2>/dev/null && command -v npm >/dev/null || \
		{ echo "error: Node.js >= 20 with npm is required (TypeScript client tests, buf): install it and rerun"; exit 1; }
	cd $(TS) && npm ci --no-audit --no-fund --ignore-scripts
	touch $(TS_STAMP)

# buf lint (buf.yaml), then no breaking change in proto/ against the last commit.
proto-lint: $(TS_STAMP)
	$(BUF) lint
	$(BUF) breaking --against '.git#subdir=proto,ref=HEAD'

lint: $(STAMP)
	$(VENV)/bin/ruff check client daemon tests bench
	$(VENV)/bin/ruff format --check client daemon tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format client daemon tests bench
	$(VENV)/bin/ruff check --fix client daemon tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy client/mlxd_client daemon/mlxd_daemon

test: $(STAMP) proto-check
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory ts-test

# The TypeScript client and extension commands against a live daemon (client/typescript/README.md).
ts-test: $(STAMP) $(TS_STAMP)
	cd $(TS) && MLXD_PYTHON=$(CURDIR)/$(PY) npm test

check: lint typecheck proto-lint test

demo: $(STAMP)
	$(PY) bench/demo.py

bench: $(STAMP)
	$(PY) bench/convert.py
	$(PY) bench/infer.py
	$(PY) bench/http_vs_grpc.py
	$(PY) bench/sd.py
	$(PY) bench/generate.py
	$(PY) bench/tensor_parallel.py
	$(PY) bench/export_programs.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .demo $(TS)/node_modules $(TS)/dist

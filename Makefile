# mlxd — every target sets up what it needs from nothing (a fresh clone and a bare Python 3.10+).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup blas proto proto-check lint format typecheck test check demo bench clean

$(STAMP): pyproject.toml
	@$(MAKE) -s blas
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the local CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q -e ".[daemon,dev]"
	touch $(STAMP)

setup: $(STAMP)

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

check: lint typecheck test

demo: $(STAMP)
	$(PY) bench/demo.py

bench: $(STAMP)
	$(PY) bench/convert.py
	$(PY) bench/infer.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .demo

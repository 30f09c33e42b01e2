# GeoBind: the two commands of the Quickstart.
#   make demo   create .venv, install, run the embedded default end to end
#   make test   create .venv if needed, install with test extras, run the suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On machines without CUDA the CPU wheel is installed. GPU users: install your own CUDA
# build of torch into .venv first (see README); it is kept.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,world
DEMO_ARGS ?=

.PHONY: demo test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH_SPEC)"; \
		$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/geobind demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

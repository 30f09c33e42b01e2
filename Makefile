# GeoBind: the two commands of the Quickstart.
#   make demo   create .venv, install, run the embedded default end to end
#   make test   create .venv if needed, install with test extras, run the suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is installed when .venv has no torch; GPU users install their own CUDA build
# of torch into .venv first (see README), and it is kept. TORCH_INDEX picks the wheel index:
# PyPI's Linux torch is a CUDA build, so on a machine without a GPU and with PyPI as the index
# use TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= test,world
DEMO_ARGS ?=

.PHONY: demo test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per set of extras: `make install EXTRAS=serve` installs what it names.
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(STAMP): $(BIN)/python pyproject.toml
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH_SPEC)"; \
		$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

install: $(STAMP)

demo: install
	$(BIN)/geobind demo $(DEMO_ARGS)

test: install
	GEOBIND_STRICT_SKIPS=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

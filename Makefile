# Two entry points on a fresh machine: `make run` (the main job on the shipped defaults) and `make test`.
# Both create .venv on first use. The CPU torch wheel is pinned first so that no multi-GB CUDA build is pulled.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sparvar-installed
TORCH  ?= torch==2.13.0

.PHONY: run test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/sparvar-compile --model infinity-8b --gpu h100

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

# Two entry points on a fresh machine: `make run` (the main job on the shipped defaults) and `make test`.
# Both create .venv on first use. The CPU torch wheel is pinned first so that no multi-GB CUDA build is pulled.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sparvar-installed
TORCH  ?= torch==2.13.0

.PHONY: run test setup clean

$(STAMP): pyproject.toml
	@# The PostgreSQL tests start a private server; install the server binaries where they are missing.
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "note: PostgreSQL server binaries not found; its tests will be skipped"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/sparvar-compile --model infinity-8b --gpu h100

# In CI (CI=true) the PostgreSQL tests must run, never skip.
test: $(STAMP)
	SPARVAR_REQUIRE_POSTGRES=$(if $(CI),1,0) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

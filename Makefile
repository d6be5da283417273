# Two entry points on a fresh machine: `make run` (the main job on the shipped defaults) and `make test`.
# Both create .venv on first use. The CPU torch wheel is pinned first so that no multi-GB CUDA build is pulled.
# `make run` installs the core package only and never touches the system; `make test` adds every extra and the
# test tools, and installs the PostgreSQL server binaries where it may (root with apt-get) for the PostgreSQL tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sparvar-installed
TEST_STAMP := $(VENV)/.sparvar-test-installed
TORCH  ?= torch==2.13.0

.PHONY: run test setup postgres-server wheel clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[all,test]'
	touch $(TEST_STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/sparvar-compile --model infinity-8b --gpu h100

# The PostgreSQL tests start a private server; install the server binaries where they are missing (test/CI only).
postgres-server:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "note: PostgreSQL server binaries not found; its tests will be skipped"

# In CI (CI=true) the PostgreSQL tests must run, never skip.
test: $(TEST_STAMP) postgres-server
	SPARVAR_REQUIRE_POSTGRES=$(if $(CI),1,0) $(BIN)/python -m pytest -q

# The installable wheel, in dist/ (.ci/wheel_smoke.sh installs it into a fresh venv and runs every verb).
wheel: $(STAMP)
	$(BIN)/python -m pip wheel -q --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info

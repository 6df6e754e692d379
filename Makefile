# Two entry points for a fresh machine: `make run` (the service) and `make test` (the suite).
# Both create the virtualenv in .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean browser

# the compiled hot path is rebuilt when its source changes (a stale .so fails test_fastavl)
$(STAMP): pyproject.toml setup.py teltonika_ingest/codec/_fastavl.c
	# systemd-analyze checks the shipped unit files (tests/test_deploy.py)
	command -v systemd-analyze >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# compat mode: Twisted's plugin scan must see twisted/plugins (see OPERATIONS.md)
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $(STAMP)

# The whole local pipeline: the ingest (with the embedded Redis) and the processor (with the
# embedded PostgreSQL) sharing that Redis. Ctrl-C stops both (each drains first).
# ARGS go to the ingest, PROCESSOR_ARGS to the processor; set REDIS_URL to use another Redis.
PROCESSOR_ARGS ?=
run: $(STAMP)
	mkdir -p var
	$(BIN)/twistd -n --pidfile=var/processor.pid teltonika-processor \
	    --redis-url "$${REDIS_URL:-unix://$(CURDIR)/var/redis.sock}" $(PROCESSOR_ARGS) & processor=$$!; \
	trap 'kill -TERM $$processor 2>/dev/null; wait $$processor' EXIT; \
	$(BIN)/twistd -n --pidfile=var/ingest.pid teltonika-ingest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check teltonika_ingest tests bench twisted
	$(BIN)/mypy

# the live page's browser test (tests/test_live_page.py) drives Debian's chromium through
# chromium-driver; only the test path installs them, never `make run`
browser:
	command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

test: lint browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info var

# Two entry points for a fresh machine: `make run` (the service) and `make test` (the suite).
# Both create the virtualenv in .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TOOLS  := $(VENV)/.test-tools

.PHONY: run test lint bench bench-scale bench-100k clean browser image-test

# The run path installs nothing outside .venv (no apt-get; works as any user). The compiled
# hot path is rebuilt when its source changes (a stale .so fails test_fastavl).
$(STAMP): pyproject.toml setup.py teltonika_ingest/codec/_fastavl.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# editable: a .pth naming the project root (pyproject's package-dir), so Twisted's plugin
	# scan sees twisted/plugins (OPERATIONS.md)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $(STAMP)

# The whole local pipeline: the ingest (with the embedded Redis) and the processor (with the
# embedded PostgreSQL) sharing that Redis. Ctrl-C stops both (each drains first).
# ARGS go to the ingest, PROCESSOR_ARGS to the processor; set REDIS_URL to use another Redis.
PROCESSOR_ARGS ?=
# The live page is on in the local pipeline (127.0.0.1:9091), with a random token made once
# in var/live-tokens.
LIVE_ARGS ?= --live tcp:9091:interface=127.0.0.1 --live-tokens var/live-tokens
# A command started with & by a non-interactive shell ignores SIGINT, and Python (twistd) keeps
# an ignored SIGINT ignored: restore the default before exec, so the terminal's Ctrl-C reaches
# the processor too (both drain at once; the trap covers the ingest exiting by itself, and on
# Ctrl-C it waits for the processor to finish draining before make returns).
export SIGINT_DEFAULT := import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])
run: $(STAMP)
	mkdir -p var
	test -s var/live-tokens || { umask 077; echo "dev-$$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n') *" > var/live-tokens; }
	@echo "live page: http://127.0.0.1:9091/?token=$$(cut -d' ' -f1 var/live-tokens)"
	{ test -n "$${REDIS_URL:-}" || for i in $$(seq 300); do test -S var/redis.sock && break; sleep 0.1; done; \
	  exec $(BIN)/python -c "$$SIGINT_DEFAULT" $(BIN)/twistd -n --pidfile=var/processor.pid teltonika-processor \
	    --redis-url "$${REDIS_URL:-unix://$(CURDIR)/var/redis.sock}" $(LIVE_ARGS) $(PROCESSOR_ARGS); } & processor=$$!; \
	trap 'kill -TERM $$processor 2>/dev/null; wait $$processor' EXIT INT TERM; \
	$(BIN)/twistd -n --pidfile=var/ingest.pid teltonika-ingest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check teltonika_ingest tests bench twisted
	$(BIN)/mypy
	# the test fakes type-check against the protocols they stand in for
	$(BIN)/mypy tests/support.py

# the live page's browser test (tests/test_live_page.py) drives Debian's chromium through
# chromium-driver; only the test path installs them, never `make run`
browser:
	command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# Tools only the tests need, from Debian packages, on the test path only (never `make run`):
# systemd-analyze (unit files), docker-compose (compose.yaml: `docker-compose config`), and
# promtool (alert rules), taken out of the `prometheus` package into .venv/bin so that no
# Prometheus server is installed or started. Each is fetched only when missing.
$(TOOLS): $(STAMP)
	@need=""; promtool=""; \
	command -v systemd-analyze >/dev/null 2>&1 || need="$$need systemd"; \
	command -v docker-compose >/dev/null 2>&1 || need="$$need docker-compose"; \
	test -x $(BIN)/promtool || command -v promtool >/dev/null 2>&1 || promtool=yes; \
	if [ -n "$$need$$promtool" ]; then apt-get update -qq; fi; \
	if [ -n "$$need" ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need >/dev/null; \
	fi; \
	if [ -n "$$promtool" ]; then \
	    d=$$(mktemp -d) && chmod 777 $$d && (cd $$d && apt-get download -qq prometheus) && \
	    dpkg-deb -x $$d/prometheus_*.deb $$d/x && install -m 755 $$d/x/usr/bin/promtool $(BIN)/promtool && \
	    rm -rf $$d; \
	fi
	touch $@

test: lint browser $(TOOLS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Build the container image for real and run it (deploy/image_test.py): a base image made
# from Debian packages, a wheelhouse built here, the container on the host network against a
# loopback Redis. Minutes, root and a Docker daemon (started if none answers): not part of
# `make test` / CI.
image-test: $(STAMP)
	$(BIN)/python deploy/image_test.py

bench: $(STAMP)
	$(BIN)/python -m bench.run_all
	$(MAKE) bench-scale

# issue 18: tail latency after saturation vs the ACK-only sink, 1 vs 2 workers, 10k and 30k
# devices, the disconnect storm (~16 min); the JSON keeps the raw figures
bench-scale: $(STAMP)
	mkdir -p var
	$(BIN)/python -m bench.scale tail workers fleet --json var/bench-scale.json > /dev/null
	# a mass disconnect: one worker's memory while 15,000 devices close at once (~45 s)
	$(BIN)/python -m bench.disconnect_storm --json var/bench-storm.json > /dev/null

# 100,000 devices: 6 workers, 6 simulator processes, 400 new connections/s, ~7 min, stops by
# itself
bench-100k: $(STAMP)
	mkdir -p var
	$(BIN)/python -m bench.scale fleet --sizes 100000 --connect-rate 400 --json var/bench-100k.json > /dev/null

clean:
	rm -rf $(VENV) build *.egg-info var

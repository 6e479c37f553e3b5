# edgeferry — the two commands: `make demo` and `make test` (ruff and mypy, then pytest).
# Both create .venv when missing, install the project with its dev extra (editable: the C
# accelerator edge/_cparse.c is built in place, or skipped without a C compiler), and make
# sure the mosquitto binary exists (from the Debian package, when running as root).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgeferry-installed

.PHONY: demo test bench lint setup mosquitto cloud-brokers chromium postgresql clean

setup: $(STAMP) mosquitto cloud-brokers

$(STAMP): pyproject.toml setup.py edge/_cparse.c
	@if ! $(PYTHON) -m venv $(VENV) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing python3-venv (Debian package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
	    rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	  else echo "error: '$(PYTHON) -m venv' failed: run 'sudo apt-get install python3-venv'"; exit 1; fi; \
	fi
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

mosquitto:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing mosquitto (Debian package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	  else echo "error: mosquitto is missing: run 'sudo apt-get install mosquitto'"; exit 1; fi; \
	fi

# NATS and RabbitMQ as the cloud broker in tests/test_cloud_brokers.py (Debian packages;
# the tests start their own instances on free ports, and skip, saying why, without them)
cloud-brokers:
	@missing=""; \
	command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing="$$missing nats-server"; \
	[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing="$$missing rabbitmq-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (Debian packages)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "warning: could not install$$missing: their tests will be skipped"; \
	  else echo "warning:$$missing missing: their tests will be skipped"; fi; \
	fi

# The PostgreSQL sink's tests use the machine's server (127.0.0.1:5432, tests/postgres.py):
# started here when it is installed but stopped (as root); without one they are skipped
postgresql:
	@if [ "$$(id -u)" = 0 ] && command -v pg_lsclusters >/dev/null; then \
	  pg_lsclusters -h | awk '$$4 != "online" {print $$1, $$2}' | while read v c; do \
	    echo "starting PostgreSQL $$v/$$c"; \
	    pg_ctlcluster "$$v" "$$c" start || echo "warning: PostgreSQL $$v/$$c did not start: its tests will be skipped"; \
	  done; \
	fi

# headless Chromium opens the demo's HTML report and tmux drives its dashboard in
# tests/test_demo.py (Debian packages; each check is skipped, saying why, without them)
chromium:
	@missing=""; \
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing="$$missing chromium"; \
	command -v tmux >/dev/null || missing="$$missing tmux"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (Debian packages)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "warning: could not install$$missing: the report screenshot or dashboard test will be skipped"; \
	  else echo "warning:$$missing missing: the report screenshot or dashboard test will be skipped"; fi; \
	fi

# lint first: a lint or type error fails `make test` like a failing test does
test: setup chromium lint postgresql
	$(PY) -m pytest -n 2 --dist loadfile

# the demo's data (brokers, store, cloud.db, manifest, logs) and report stay in demo-data/
DEMO_DATA ?= demo-data
demo: setup
	$(VENV)/bin/edgeferry demo --data $(DEMO_DATA) --report $(DEMO_DATA)/report.html

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check edge gateway firmware_sim edgeferry tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache

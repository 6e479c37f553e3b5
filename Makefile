# edgeferry — the two commands: `make demo` and `make test` (ruff and mypy, then pytest).
# Both create .venv when missing, install the project with its dev extra, and make sure
# the mosquitto binary exists (from the Debian package, when running as root).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgeferry-installed

.PHONY: demo test bench lint setup mosquitto clean

setup: $(STAMP) mosquitto

$(STAMP): pyproject.toml
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

# lint first: a lint or type error fails `make test` like a failing test does
test: setup lint
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/edgeferry demo

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check edge gateway firmware_sim edgeferry tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache

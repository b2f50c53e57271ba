# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each (re)creates .venv only when pyproject.toml or requirements.lock changed since the last install.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip config points at local mirrors that warn once per package; keep the log readable.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.capfilt-installed
export SPARK_LOCAL_IP ?= 127.0.0.1
export NO_ALBUMENTATIONS_UPDATE ?= 1
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1
# Bytecode caches let each test run, CLI subprocess and Spark Python worker skip recompiling capfilt's
# modules and pytest's rewritten tests (a shell with PYTHONDONTWRITEBYTECODE=1 paid ~3 s per pytest start).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test check venv check-java clean
venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || \
	  { echo "capfilt needs Python 3.11 (found: $$($(PYTHON) --version 2>&1)). Set PYTHON=/path/to/python3.11."; exit 1; }
	@echo "Setting up $(VENV) (first time ~3 min, ~7 GB: torch, Spark, open_clip)..."
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | { $(QUIET_PIP); }
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { $(QUIET_PIP); }
	@touch $(STAMP)

check-java:
	@java=$${JAVA_HOME:+$$JAVA_HOME/bin/}java; command -v $$java >/dev/null || { echo "capfilt needs Java 17 or newer for Spark 4 (none found). Install it, e.g. 'apt-get install openjdk-17-jre-headless', or set JAVA_HOME."; exit 1; }; \
	  v=$$($$java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -1); \
	  [ "$${v:-0}" -ge 17 ] || { echo "capfilt needs Java 17 or newer for Spark 4 (found Java $$v). Install openjdk-17-jre-headless or set JAVA_HOME."; exit 1; }

demo: check-java venv
	$(VENV)/bin/capfilt demo --out demo-output

test: check-java venv
	$(VENV)/bin/python -m pytest -q

# The fast tier for the edit loop: every test not marked slow (pyproject.toml: markers).
check: check-java venv
	$(VENV)/bin/python -m pytest -q -m "not slow"

clean:
	rm -rf demo-output demo-output-report.html demo-output-webdataset .pytest_cache spark-warehouse

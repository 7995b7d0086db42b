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

SERVE_PORT ?= 8000
PROMETHEUS_PORT ?= 9090
# The local Kafka-protocol broker (Tansu, memory only) and the partitions of each stream topic it gets; serve_config.yaml's
# stream.bootstrap_servers names the same port.
STREAM_PORT ?= 9092
STREAM_PARTITIONS ?= 4
SERVE_URL := http://127.0.0.1:$(SERVE_PORT)

.PHONY: help venv run up serve replay monitor stream drift-demo loop loop-stop prometheus repro stop test lint lock \
  clean tiny-model cluster-up cluster-down

help:
	@echo "make run    - venv, install, start Ray head + MLflow server, submit the pipeline with ray job submit"
	@echo "make serve  - serve deploy serve_config.yaml on the running head, wait for /ready, show a request"
	@echo "make replay - send the champion's test split through the served app (prediction log + labels file)"
	@echo "make monitor - Evidently drift + feedback accuracy of the served champion -> MLflow, Prometheus gauges"
	@echo "make stream - a few requests through the broker's input topic; prints their results and a dead letter"
	@echo "make drift-demo - send shifted traffic (titles only) and watch the monitor report the breach"
	@echo "make loop   - the closed loop on the running head: drift check, retrain, shadow, canary, gate (make loop-stop)"
	@echo "make prometheus - Prometheus on 127.0.0.1:$(PROMETHEUS_PORT) scraping the running head, with the alert rules"
	@echo "make repro  - dvc repro: the DVC pipeline (dvc.yaml: data, train, register, evaluate) on the running head"
	@echo "make test   - the test suite (starts its own Ray heads and MLflow servers on free ports)"
	@echo "make lint   - ruff"
	@echo "make stop   - stop the Ray head, MLflow server and broker that make run started"
	@echo "make cluster-up / cluster-down - a head + worker node(s) on this machine, S3 API, MLflow (docs/cluster.md)"
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
	  --ray-port $(RAY_PORT) --dashboard-port $(DASHBOARD_PORT) --mlflow-port $(MLFLOW_PORT) \
	  --prometheus-port $(PROMETHEUS_PORT)
	$(BIN)/python -m ray_app.broker up --state $(STATE) --root $(RUN_DIR) --port $(STREAM_PORT) \
	  --serve-config serve_config.yaml --partitions $(STREAM_PARTITIONS)

run: up
	@echo "== submitting the pipeline ($(CONFIG)) to the Ray head; logs stream below =="
	$(BIN)/ray job submit --address http://127.0.0.1:$(DASHBOARD_PORT) --working-dir . \
	  --submission-id "pipeline-$$(date +%Y%m%d-%H%M%S)" \
	  --runtime-env-json '{"env_vars": {"RAY_APP_GIT_COMMIT": "$(shell git rev-parse HEAD 2>/dev/null || echo unknown)"}}' \
	  -- ray-app pipeline --config $(CONFIG) --results-dir $(CURDIR)/results \
	     --set mlflow.tracking_uri=http://127.0.0.1:$(MLFLOW_PORT)
	@echo "results JSON:   $$(ls -t results/pipeline-*.json | head -1)"
	@$(MAKE) --no-print-directory serve
	@$(MAKE) --no-print-directory replay
	@$(MAKE) --no-print-directory monitor
	@$(MAKE) --no-print-directory stream
	@echo "MLflow UI:      http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "Ray dashboard:  http://127.0.0.1:$(DASHBOARD_PORT)  (Serve tab: replicas, logs; Jobs tab: this pipeline)"
	@echo "                it asks for a token: paste the output of  $(BIN)/ray get-auth-token"
	@echo "Metrics:        http://127.0.0.1:8080/metrics  (ray_app_* series; \`make prometheus\` scrapes them with the alerts)"
	@echo "Stream:         broker 127.0.0.1:$(STREAM_PORT), topics predict-requests -> predictions (docs/streaming.md)"

# What a user does on any cluster: serve deploy the config; the package is already installed in the cluster's env.
serve: up
	@echo "== serve deploy serve_config.yaml =="
	$(BIN)/serve deploy serve_config.yaml --address http://127.0.0.1:$(DASHBOARD_PORT)
	$(BIN)/python -m ray_app.local wait --url $(SERVE_URL)/ready --timeout 300
	@echo "== a request (curl) =="
	curl -sS -X POST $(SERVE_URL)/predict -H 'Content-Type: application/json' \
	  -d '{"title": "Fine-tuning BERT for sentiment", "description": "Transformers on movie reviews"}'
	@echo
	@echo "API docs:       $(SERVE_URL)/docs    models: $(SERVE_URL)/models"

# The champion's frozen test rows through the served app: a real prediction log to monitor, and its labels file.
replay: up
	@echo "== replaying the champion's test split through $(SERVE_URL) =="
	$(BIN)/ray-app replay --url $(SERVE_URL) --labels-out results/replay-labels.csv \
	  --set mlflow.tracking_uri=http://127.0.0.1:$(MLFLOW_PORT)

# Requests through the broker (serve_config.yaml's stream section): the app's StreamConsumer answers them on the output
# topic; one message that is not JSON lands in the dead-letter topic.
stream: up
	$(BIN)/python -m ray_app.broker demo --serve-config serve_config.yaml

# Drift of the replayed traffic against the champion's own reference, and its accuracy on the replay's labels.
# Exit 1 is a reported breach (the MLflow run is tagged and the results JSON says why): shown, not a failed `make`.
monitor: up
	@echo "== ray-app monitor: drift and feedback accuracy of the served champion =="
	rc=0; $(BIN)/ray-app monitor --labels results/replay-labels.csv \
	  --set mlflow.tracking_uri=http://127.0.0.1:$(MLFLOW_PORT) --set ray.address=127.0.0.1:$(RAY_PORT) || rc=$$?; \
	  if [ $$rc -eq 1 ]; then echo "monitor: SLA breach reported (see above and the MLflow 'monitoring' run)"; fi; \
	  test $$rc -le 1

# A drift to see: clients start sending titles without descriptions. The monitor's window is exactly those requests
# (--last-n: how many the replay sent); drift in length, vocabulary and embeddings breaches monitor.drift_share.
drift-demo: up
	@echo "== drift demo: the champion's test rows again, titles only, through $(SERVE_URL) =="
	$(BIN)/ray-app replay --url $(SERVE_URL) --shift titles-only --labels-out results/drift-labels.csv \
	  --results-file results/drift-replay.json --set mlflow.tracking_uri=http://127.0.0.1:$(MLFLOW_PORT)
	rc=0; $(BIN)/ray-app monitor --labels results/drift-labels.csv \
	  --last-n $$($(BIN)/python -c "import json; print(json.load(open('results/drift-replay.json'))['sent'])") \
	  --set mlflow.tracking_uri=http://127.0.0.1:$(MLFLOW_PORT) --set ray.address=127.0.0.1:$(RAY_PORT) || rc=$$?; \
	  if [ $$rc -eq 1 ]; then echo "drift-demo: breach reported, as it should be. Look at: the MLflow 'monitoring'" \
	    "experiment (newest run: tag breach=true, monitoring/drift_report.html), ray_app_drift_share on the" \
	    "metrics endpoint, and results/monitor-*.json. With --set monitor.on_breach=retrain the same check also" \
	    "submits the training pipeline as a Ray job."; \
	  elif [ $$rc -eq 0 ]; then echo "drift-demo: no breach this time; the MLflow run shows each column's drift"; fi; \
	  test $$rc -le 1

# The closed loop (docs/loop.md): a controller actor on the head checks the champion every LOOP_CHECK_S and takes a
# breach through retrain, shadow, the canary ramp and the gate. `make drift-demo` gives it a breach to act on.
LOOP_CHECK_S ?= 300
LOOP_SETS = --set mlflow.tracking_uri=http://127.0.0.1:$(MLFLOW_PORT) --set ray.address=127.0.0.1:$(RAY_PORT) \
  --set loop.dashboard_address=http://127.0.0.1:$(DASHBOARD_PORT)
loop: up
	$(BIN)/ray-app loop start -c $(CONFIG) $(LOOP_SETS) --set loop.check_every_s=$(LOOP_CHECK_S)
	@echo "loop: running; state in $(SERVE_URL)/models (field loop), the MLflow 'loop' experiment, ray-app loop status"

loop-stop:
	$(BIN)/ray-app loop stop -c $(CONFIG) $(LOOP_SETS)

# Prometheus (Debian's package) against the running head: its service-discovery file in this head's temp dir, the
# alert rules of monitoring/prometheus/; recorded in the services state, so `make stop` stops it.
prometheus: up
	$(BIN)/python -m ray_app.local prometheus --state $(STATE) --root $(RUN_DIR) --prometheus-port $(PROMETHEUS_PORT)

# The DVC pipeline (dvc.yaml) on the head and MLflow server of `make up`; ray-app must be on PATH for its stages.
# Another config: set `config:` in params.yaml, or `dvc exp run -S config=configs/smoke.yaml`.
repro: up
	PATH="$(CURDIR)/$(BIN):$$PATH" RAY_ADDRESS=127.0.0.1:$(RAY_PORT) \
	  MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) $(BIN)/dvc repro
	$(BIN)/dvc metrics show

# A head and CLUSTER_WORKERS worker nodes on this machine, each its own `ray start` and node IP (docs/cluster.md, "A
# multi-node cluster on one machine"): network namespaces as root, CLUSTER_NETNS=--no-netns for loopback aliases.
CLUSTER_WORKERS ?= 1
CLUSTER_NETNS ?=
cluster-up: venv tiny-model
	$(BIN)/python -m ray_app.cluster up --state $(RUN_DIR)/cluster.json --root $(RUN_DIR)/cluster \
	  --workers $(CLUSTER_WORKERS) $(CLUSTER_NETNS)

cluster-down:
	@test -x $(BIN)/python && $(BIN)/python -m ray_app.cluster down --state $(RUN_DIR)/cluster.json || echo "nothing to stop"

stop:
	@test -x $(BIN)/python && $(BIN)/python -m ray_app.local down --state $(STATE) || echo "nothing to stop"

test: venv
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check ray_app tests bench

lock: venv
	{ $(BIN)/pip freeze --exclude-editable | grep -v '^torch=='; echo "$(TORCH)"; \
	  grep -E '^psycopg2-binary==' constraints.txt; } > constraints.txt.new
	mv constraints.txt.new constraints.txt  # the cluster extra's pin is kept: it is not installed here (boto3 is, by moto)

clean: stop
	rm -rf $(VENV) results $(RUN_DIR) artifacts .pytest_cache .ruff_cache

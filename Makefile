# Everything runs inside .venv; `make` with no target sets up and runs the pipeline.
PY      := python3.11
VENV    := .venv
BIN     := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
PORT    ?= 5000

.PHONY: all setup repro smoke test params ui server plots clean
all: repro

$(BIN)/dvc: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	touch $@

FASHION := /usr/share/datasets/fashion-mnist
CHROMIUM := /usr/bin/chromium

POSTGRES := /usr/lib/postgresql

VEGA := .cache/vega/versions.json

setup: $(BIN)/dvc $(FASHION) $(CHROMIUM) $(POSTGRES) $(VEGA)  ## create .venv, install the project (torch is the big one: ~10 min on a fresh machine)

# The offline Fashion-MNIST copy (Debian package); without it the download stage needs the network or a mirror.
$(FASHION):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	else echo "note: no $(FASHION): run 'sudo apt-get install dataset-fashion-mnist', or set AELAB_MIRROR"; fi

# Headless Chromium (Debian package) for the browser tests of the report and the MLflow UI; they skip without it.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "note: no $(CHROMIUM): run 'sudo apt-get install chromium chromium-driver' for the browser tests"; fi

# PostgreSQL (Debian package) for `make server`, the tracking server for many writers, and its tests.
$(POSTGRES):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	else echo "note: no $(POSTGRES): run 'sudo apt-get install postgresql' for make server and its tests"; fi

# Vega, Vega-Lite and Vega-Embed from the npm registry (npm pack), for `make plots` and its browser test.
$(VEGA): | $(BIN)/dvc
	@python -m aelab.offline_plots --fetch-only || echo "note: no Vega bundles in .cache/vega/: make plots fetches them (needs npm and the npm registry)"

repro: setup  ## run the pipeline on the default config
	dvc repro

smoke: setup  ## the whole spine on a small subset (params.yaml composed with profile=smoke)
	dvc exp run -S profile=smoke

test: setup  ## the test suite
	pytest -q

params: setup  ## recompose params.yaml from conf/ (what `dvc exp run` does)
	python -m aelab.compose

ui: setup  ## the MLflow UI on http://127.0.0.1:$(PORT)
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

SERVER_PORT ?= 5001
server: setup  ## mlflow server on PostgreSQL for parallel jobs and teams (then: export MLFLOW_TRACKING_URI=http://127.0.0.1:$(SERVER_PORT))
	python -m aelab.server --port $(SERVER_PORT)

plots: setup  ## dvc plots show, rendered offline: Vega from the npm registry, inlined (prints dvc_plots/index.html)
	python -m aelab.offline_plots

clean:  ## remove run outputs (keeps .venv)
	rm -rf data/raw data/features models reports/figures mlflow.db mlruns outputs multirun

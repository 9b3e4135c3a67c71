# The study in two commands: `make reproduce` (runs everything, setting itself up) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PROFILE ?= default
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-done
# Steps to force re-running, e.g. `make reproduce FORCE=1`.
FORCE   ?=
ifneq ($(strip $(FORCE)),)
FORCE_FLAG := --force
endif
# How the steps run: local (in order, in one process) or dask (independent steps in parallel on a Dask cluster:
# SCHEDULER=tcp://host:8786 for a running one, else a cluster of this machine bound to 127.0.0.1; TIMINGS=run.json:
# an earlier run whose step seconds start the longest steps first, else the profile's own last record).
EXECUTOR ?= local
SCHEDULER ?=
TIMINGS ?=
EXECUTOR_FLAGS := --executor $(EXECUTOR) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(if $(TIMINGS),--timings $(TIMINGS))

# Remote locations pass through to every step (empty = the default, see README).
export CXR_MIRROR CXR_GITHUB_API

.PHONY: help setup reproduce data test unit html readme lab bench bench-executor evaluate predict lint clean clean-data

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with the pinned environment, Jupyter kernel and nbdime git drivers

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	@touch $@

reproduce: $(STAMP) ## run every notebook with papermill: make reproduce [PROFILE=smoke|default|full] [FORCE=1] [EXECUTOR=dask [SCHEDULER=tcp://host:8786]]
	$(PY) -m cxrstudy.pipeline reproduce --profile $(PROFILE) $(FORCE_FLAG) $(EXECUTOR_FLAGS)

data: $(STAMP) ## build data/processed from the upstream sources (CXR_MIRROR=path to read a local mirror)
	$(PY) -m cxrstudy.data.build

test: $(STAMP) ## unit tests, then the smoke profile end to end
	$(PY) -m pytest

unit: $(STAMP) ## unit tests only
	$(PY) -m pytest -m "not e2e"

html: $(STAMP) ## re-render reports/<profile>/html and index.html from the executed notebooks
	$(PY) -m cxrstudy.pipeline html --profile $(PROFILE)

readme: $(STAMP) ## put the latest PROFILE=default results into README.md
	$(PY) -m cxrstudy.reporting --profile $(PROFILE)

lab: $(STAMP) ## open JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP) ## throughput benchmark -> reports/bench.json
	$(PY) scripts/bench.py

bench-executor: $(STAMP) ## PROFILE's wall time, local vs Dask on this machine -> reports/bench_executor_PROFILE.json
	$(PY) scripts/bench_executor.py --profile $(PROFILE) --cold

evaluate: $(STAMP) ## evaluate every configuration (fold ensemble; SINGLE=1: every run) of PROFILE on EXTERNAL=labels.csv
	@test -n "$(EXTERNAL)" || { echo "usage: make evaluate EXTERNAL=path/to/labels.csv [PROFILE=default] [SINGLE=1]" >&2; exit 2; }
	$(PY) -m cxrstudy.evaluation.external --csv "$(EXTERNAL)" --profile $(PROFILE) $(if $(SINGLE),--single-runs)

predict: $(STAMP) ## probabilities, lung QC + Grad-CAM: make predict IMAGES="a.png b.jpg" [RUN=config_or_run_id] [PROFILE=default] [OUT=dir]
	@test -n "$(IMAGES)" || { echo 'usage: make predict IMAGES="a.png b.jpg" [RUN=config_or_run_id] [PROFILE=default] [OUT=dir]' >&2; exit 2; }
	$(VENV)/bin/cxrstudy predict $(IMAGES) --profile $(PROFILE) $(if $(RUN),--run $(RUN)) $(if $(OUT),--out $(OUT))

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check src tests scripts notebooks

clean: ## remove reports (keeps data and .venv)
	rm -rf reports/*/ reports/*.json

clean-data: ## remove downloaded and processed data
	rm -rf data/raw data/processed data/cache

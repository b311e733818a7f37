# The workbook's commands. Each target creates (or reuses) the virtual environment and installs what it
# needs first, so on a fresh machine nothing else is typed before `make reproduce` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install when the dependencies or the checkout's location change (the install is editable).
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)-$(shell echo $(CURDIR) | sha1sum | cut -c1-8)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PYTEST_NB := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: install test test-units test-notebooks test-paper reproduce lab clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

## The whole test suite: unit tests and the notebooks (smoke mode, under nbval). The notebooks run in the
## `ci` budget (TBPS_BUDGET=ci, tbps_lib.config.BUDGETS: 2 seeds, runs of a few steps) so that the suite
## stays within CI's time with five method notebooks; `make reproduce` runs the `full` budget. The notebooks'
## figures go to a scratch folder (TBPS_FIGURES), so a test run leaves the committed full-budget figures/ alone.
TEST_FIGURES ?= $(or $(TBPS_FIGURES),/tmp/tbps-test-figures)
test: $(STAMP)
	TBPS_MODE=smoke TBPS_BUDGET=ci TBPS_PROGRESS=0 TBPS_FIGURES=$(TEST_FIGURES) OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadscope $(PYTEST_NB) tests $(wildcard notebooks)

test-units: $(STAMP)
	$(PY) -m pytest -n 2 tests

## The paper path's smoke test: every notebook with TBPS_MODE=paper (the papers' backbones at random init, a
## tiny synthetic set, the `check` budget: one step per run); tests/test_notebooks_paper.py (`make test` runs
## only its quick-start notebook: the whole takes longer than CI's budget).
test-paper: $(STAMP)
	TBPS_TEST_PAPER=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 tests/test_notebooks_paper.py

test-notebooks: $(STAMP)
	TBPS_MODE=smoke TBPS_BUDGET=ci TBPS_PROGRESS=0 TBPS_FIGURES=$(TEST_FIGURES) $(PY) -m pytest $(PYTEST_NB) notebooks

## The main job: train every run the notebooks need, two processes at a time (`tbps reproduce`: the
## pretrained smoke backbones, each method's default run and its notebook's tables with 3 seeds, the `full`
## budget), then execute every notebook headless (they only load runs), regenerating figures/ and tables.
## `make reproduce BUDGET=all` trains every ablation row of every table instead (hours on a laptop).
JOBS ?= 2
BUDGET ?= full
reproduce: $(STAMP)
	TBPS_MODE=$${TBPS_MODE:-smoke} TBPS_BUDGET=$(BUDGET) $(VENV)/bin/tbps reproduce --jobs $(JOBS)
	cd notebooks && for nb in $(notdir $(NOTEBOOKS)); do \
	  echo "== $$nb"; TBPS_MODE=$${TBPS_MODE:-smoke} TBPS_BUDGET=$(BUDGET) $(abspath $(VENV))/bin/jupyter nbconvert --to notebook \
	    --execute --inplace --ExecutePreprocessor.timeout=3600 $$nb || exit 1; done
	$(VENV)/bin/tbps tables --out results/ --preset $${TBPS_MODE:-smoke} --readme README.md
	$(VENV)/bin/tbps figures --mode $${TBPS_MODE:-smoke} --quiet

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:
	rm -rf runs/

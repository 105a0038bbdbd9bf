# Two commands set everything up on a fresh machine (run from the repository root, which is
# where python finds the deepscale_jax package and configs/):
#   make run    create .venv if missing, install, train the default model (the main job)
#   make test   same set-up, then the test suite (CPU, 8 simulated devices)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/lm
CONFIG ?= configs/lm.py
# pytest-xdist workers: XLA compiles on one core, so 2 workers keep both of a 2-core machine busy.
TEST_WORKERS ?= 2

.PHONY: run test test-all lint format clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

run: $(STAMP)
	mkdir -p $(dir $(WORKDIR))
	$(PY) -m deepscale_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

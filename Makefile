# Two commands do all set-up on a fresh machine (see README):
#   make demo   - installs into .venv, then runs the main job end to end on an embedded local Ray
#   make test   - installs into .venv, then runs the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

# torch is pinned to the CPU wheel: an unpinned torch pulls several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python jobs/main.py --out $(DEMO_OUT) $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two commands: `make demo` and `make test`. Each builds the venv it needs by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bnfold-installed
TORCH_PIP_ARGS ?=

.PHONY: test demo lint bench clean

# Pinned torch first. On this project's machines pip finds the CPU build of 2.13.0 on disk;
# elsewhere pass TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2

demo: $(STAMP)
	$(VENV)/bin/bnfold demo

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info

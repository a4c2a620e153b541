# Two commands for a fresh machine: `make serve` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so pip keeps the local CPU build instead of
# resolving `torch` from the project's dependencies to a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: install serve demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(PY) -m pagedserve serve

demo: install
	$(PY) -m pagedserve.demo configs/tiny-cpu.yaml

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/prefix.py
	$(PY) benchmarks/dispatch.py

clean:
	rm -rf $(VENV) build *.egg-info

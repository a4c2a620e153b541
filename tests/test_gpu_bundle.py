"""`make gpu-bundle` and `make gpu-check` rehearsed here, for this machine's Python.

The GPU machine's image has torch, Triton and transformers but not all of
pagedserve's dependencies, and reaches no package index: `make gpu-bundle`
brings the rest as wheels (benchmarks/gpu-bundle.txt). Here the same list is
downloaded for this interpreter (PyPI must answer: no network fails the test),
installed as `make gpu-site` does, and run in processes whose imports are
limited to the image's packages (benchmarks/gpu-image.txt) and the bundle's
(tests/gpu_image/sitecustomize.py). A bundle that lacks something the engine,
the GPU tests or the benchmarks import fails here, not on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.tags import sys_tags

ROOT = Path(__file__).resolve().parent.parent
IMAGE_LIST = ROOT / "benchmarks/gpu-image.txt"
BUNDLE_LIST = ROOT / "benchmarks/gpu-bundle.txt"
# The wheels for this interpreter, kept between runs (ignored by git).
BUNDLE = ROOT / ".gpu-bundle-cache" / f"cp{sys.version_info.major}{sys.version_info.minor}"


def _make(target: str, **variables: object) -> None:
    args = [f"{name}={value}" for name, value in variables.items()]
    done = subprocess.run(["make", "-s", "-C", str(ROOT), target, *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"make {target} failed:\n{done.stdout}\n{done.stderr}"


def _install(site: Path, requirements: Path) -> None:
    """What `make gpu-site` does, for any list of pins: from the bundle alone."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--find-links", str(BUNDLE), "--target", str(site), "-r", str(requirements)],
                   check=True, capture_output=True, timeout=120)


def _restricted(site: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python args...` with imports limited to the GPU image's packages and the bundle's."""
    env = dict(os.environ, PAGEDSERVE_GPU_IMAGE=str(IMAGE_LIST), PAGEDSERVE_GPU_SITE=str(site),
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests/gpu_image"), str(site), str(ROOT)]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gpu_site(tmp_path_factory) -> Path:
    """The bundle for this Python, downloaded by `make gpu-bundle`, installed by `make gpu-site`."""
    platforms = list(dict.fromkeys(tag.platform for tag in sys_tags()))
    _make("gpu-bundle", GPU_BUNDLE=BUNDLE, BUNDLE_PIP=f"{sys.executable} -m pip",
          GPU_PYTHON_VERSION=f"{sys.version_info.major}.{sys.version_info.minor}",
          GPU_PLATFORMS=" ".join(platforms))
    site = tmp_path_factory.mktemp("gpu") / "site"
    _make("gpu-site", PYTHON=sys.executable, GPU_BUNDLE=BUNDLE, GPU_SITE=site)
    return site


PRELUDE = """
import sys
assert type(sys.meta_path[0]).__name__ == "GPUImageFinder", sys.meta_path
"""


def test_imports_are_limited_to_the_image_and_the_bundle(gpu_site):
    assert importlib.util.find_spec("ray") is not None  # this venv has Ray and FastAPI
    code = PRELUDE + textwrap.dedent(f"""
        for name in ("ray", "fastapi", "openai"):
            try:
                __import__(name)
            except ModuleNotFoundError as error:
                assert "benchmarks/gpu-image.txt" in str(error), error
            else:
                raise AssertionError(name + " imported")
        import gguf
        import pydantic
        assert pydantic.__file__.startswith({str(gpu_site)!r}), pydantic.__file__
        assert gguf.__file__.startswith({str(gpu_site)!r}), gguf.__file__
        print("refused", sys.meta_path[0].refused)
    """)
    done = _restricted(gpu_site, "-c", code)
    assert done.returncode == 0, done.stderr
    assert "refused ['ray', 'fastapi', 'openai']" in done.stdout


def test_offline_engine_runs_on_cpu_with_the_image_and_bundle(gpu_site, tmp_path):
    """`from pagedserve import LLM` and AsyncLLMEngine without Ray, FastAPI or gRPC; a
    random-weight model, from its directory and from a GGUF file, generates."""
    code = PRELUDE + textwrap.dedent(f"""
        from pathlib import Path
        from pagedserve import LLM, AsyncLLMEngine, SamplingParams
        from pagedserve.worker.executor import LocalExecutor
        from pagedserve.testing import build_random_model
        from pagedserve.testing.gguf_model import write_gguf

        model_dir = build_random_model(Path({str(tmp_path)!r}) / "llama", arch="llama")
        gguf_file = write_gguf(model_dir, Path({str(tmp_path)!r}) / "llama.gguf")
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        tokens = []
        for model in (model_dir, gguf_file):
            llm = LLM(str(model), device="cpu", dtype="float32", max_model_len=64)
            assert isinstance(llm.engine.executor, LocalExecutor), llm.engine.executor
            out, = llm.generate([{{"prompt_token_ids": [7, 8, 9]}}], params, use_tqdm=False)
            tokens.append(list(out.outputs[0].token_ids))
        assert len(tokens[0]) == 4 and tokens[0] == tokens[1], tokens
        loaded = [name for name in ("ray", "fastapi", "grpc") if name in sys.modules]
        assert not loaded, loaded
        print("refused", sys.meta_path[0].refused)
    """)
    done = _restricted(gpu_site, "-c", code)
    assert done.returncode == 0, done.stderr


def test_gpu_check_dry_run_passes_every_step(gpu_site, tmp_path):
    """Every step's script imports and runs its cheapest form: the tests are collected,
    the greedy check and the benchmarks' smoke modes run on the CPU (the kernels'
    interpreted), and their figures are checked here."""
    done = _restricted(gpu_site, "benchmarks/gpu_check.py", "--dry-run", "--results",
                       str(tmp_path), timeout=300)
    log = (tmp_path / "gpu-check.log").read_text()
    assert done.returncode == 0, done.stdout + log[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("kernel-tests", "passed"), ("greedy", "passed"), ("gpu-e2e", "passed"),
        ("speculative", "passed"), ("attention-kernels", "passed"), ("lora-kernels", "passed")]
    assert "5 of 5 prompts give HF's tokens" in log
    # The smoke runs' figures: every kernel checked and timed, every request equal to HF's,
    # no KV block held at the end.
    attention = json.loads((tmp_path / "attention_kernels.json").read_text())
    assert len(attention["decode"]) == 4 and attention["smoke"]
    assert all(row["bytes"] > 0 and row["paged_ms"] > 0 for row in attention["decode"])
    assert attention["prefill"]["paged_tflops"] > 0
    lora = json.loads((tmp_path / "lora_kernels.json").read_text())["rows"]
    assert [row["kernel"] for row in lora] == ["bgmv", "sgmv"]
    assert all(row["lora_ms"] > 0 and row["segments"] >= 1 for row in lora)
    e2e = json.loads((tmp_path / "gpu_e2e.json").read_text())
    assert e2e["blocks_in_use_at_end"] == 0
    assert all(row["match_static"] == row["requests"] for row in e2e["throughput"])
    # Speculative decoding: every method runs, leaks nothing, and the self-draft (the
    # same dummy weights) has nearly every draft kept.
    spec = {row["method"]: row for row in
            json.loads((tmp_path / "speculative.json").read_text())["rows"]}
    assert sorted(spec) == ["draft_model", "eagle", "eagle3", "ngram"]
    assert all(row["blocks_in_use_at_end"] == 0 for row in spec.values())
    assert spec["draft_model"]["acceptance_rate"] > 0.9, spec["draft_model"]
    # What comes back from the GPU machine: at most 8 files.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attention_kernels.json", "gpu-check.log", "gpu_e2e.json", "lora_kernels.json",
        "speculative.json", "summary.json"]


def test_a_bundle_without_pydantic_fails(gpu_site, tmp_path):
    pins = [line for line in BUNDLE_LIST.read_text().splitlines()
            if not line.startswith("pydantic==")]
    assert len(pins) < len(BUNDLE_LIST.read_text().splitlines())
    (tmp_path / "pins.txt").write_text("\n".join(pins) + "\n")
    _install(tmp_path / "site", tmp_path / "pins.txt")
    done = _restricted(tmp_path / "site", "-c", PRELUDE + "from pagedserve import LLM")
    assert done.returncode != 0
    assert "No module named 'pydantic' on the GPU machine" in done.stderr, done.stderr

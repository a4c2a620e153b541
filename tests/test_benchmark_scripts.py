"""Every benchmark script runs as the documentation shows it, from the repository root.

`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script or
folder there named like an installed top-level module hides that module from
everything the script imports (benchmarks/kernels.py once hid the `kernels`
package that transformers imports, and every script importing transformers
failed). The names are checked against the environment, then each script is
started in a process of its own, as a user would start it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.machinery import PathFinder
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py"))


def _importable_names() -> list[str]:
    """What `import NAME` could mean inside benchmarks/: its modules and its folders."""
    folders = [path.name for path in BENCHMARKS.iterdir() if path.is_dir()
               and path.name.isidentifier() and not path.name.startswith(("_", "."))]
    return sorted([name.removesuffix(".py") for name in SCRIPTS] + folders)


def _outside_benchmarks(spec) -> bool:
    locations = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    return any(BENCHMARKS not in Path(location).resolve().parents for location in locations)


def test_no_benchmark_name_shadows_an_installed_module():
    path = [entry for entry in sys.path
            if entry and Path(entry).resolve() != BENCHMARKS]
    shadowed = {}
    for name in _importable_names():
        if name in sys.stdlib_module_names:
            shadowed[name] = "the standard library"
            continue
        spec = PathFinder.find_spec(name, path)
        if spec is not None and _outside_benchmarks(spec):
            shadowed[name] = spec.origin or list(spec.submodule_search_locations)
    assert not shadowed, f"benchmarks/ names that hide another module: {shadowed}"


def test_the_shadow_check_can_fail(monkeypatch, tmp_path):
    """Names taken by an installed package and by the standard library are reported."""
    for name in ("pytest.py", "json.py", "throughput_ok.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "yaml").mkdir()  # a folder is a namespace package: it hides PyYAML too
    monkeypatch.setattr(sys.modules[__name__], "BENCHMARKS", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "SCRIPTS", ["json.py", "pytest.py",
                                                           "throughput_ok.py"])
    with pytest.raises(AssertionError) as info:
        test_no_benchmark_name_shadows_an_installed_module()
    message = str(info.value)
    assert all(f"'{name}'" in message for name in ("json", "pytest", "yaml"))
    assert "throughput_ok" not in message


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def help_runs() -> dict[str, subprocess.CompletedProcess]:
    """`python benchmarks/X.py --help` for every script, two at a time (two cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = pool.map(lambda name: _run([f"benchmarks/{name}", "--help"]), SCRIPTS)
        return dict(zip(SCRIPTS, runs, strict=True))


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_runs_from_the_repository_root(help_runs, name):
    run = help_runs[name]
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith(f"usage: {name}"), run.stdout[:500]


def test_throughput_quick_run_compares_every_system(tmp_path):
    """The smallest real run: transformers, both HF baselines and pagedserve, in seconds."""
    out = tmp_path / "throughput.json"
    run = _run(["benchmarks/throughput.py", "--quick", "--scenarios", "mixed", "--out", str(out)])
    assert run.returncode == 0, run.stderr[-3000:]
    (scenario,) = json.loads(out.read_text())["results"]
    systems = scenario["systems"]
    assert set(systems) == {"pagedserve b16", "HF static", "HF generate_batch"}
    assert all(system["tok_s"] > 0 for system in systems.values())
    # Greedy tokens of every request equal the HF systems' (the pagedserve row counts itself).
    assert all(system["match"] == scenario["requests"] for system in systems.values())

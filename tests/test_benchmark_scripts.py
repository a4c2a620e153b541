"""Every benchmark script runs as the documentation shows it, from the repository root.

`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script or
folder there named like an installed top-level module hides that module from
everything the script imports (benchmarks/kernels.py once hid the `kernels`
package that transformers imports, and every script importing transformers
failed). The names are checked against the environment, then every script's
`--help` runs as `python benchmarks/X.py --help` runs it (benchmarks/ first on
sys.path, the script as `__main__`, from the repository root), one after another
in one fresh process, so that torch and transformers are imported once.
"""

from __future__ import annotations

import json
import subprocess
import sys
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


# Each script as `python benchmarks/NAME --help` starts it: its folder first on sys.path,
# run as __main__; its exit code and output are written to argv[1], a JSON line a script.
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys, traceback
results, folder, names = open(sys.argv[1], "w"), sys.argv[2], sys.argv[3:]
for name in names:
    sys.path[0], sys.argv = folder, [f"benchmarks/{name}", "--help"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(f"{folder}/{name}", run_name="__main__")
            code = 0
        except SystemExit as done:  # as Python ends: None is 0, a message is printed and 1
            code = 0 if done.code is None else done.code
            if not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.write(json.dumps([name, code, stdout.getvalue(), stderr.getvalue()]) + "\n")
    results.flush()
"""


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`--help` of every script, in one process: a script that ends it early fails with the
    rest, the process's error as theirs."""
    lines = tmp_path_factory.mktemp("help") / "runs.jsonl"
    runner = _run(["-c", HELP_RUNNER, str(lines), str(BENCHMARKS), *SCRIPTS])
    runs = {}
    for line in lines.read_text().splitlines() if lines.exists() else []:
        name, code, stdout, stderr = json.loads(line)
        runs[name] = subprocess.CompletedProcess([f"benchmarks/{name}", "--help"], code,
                                                 stdout, stderr)
    stopped_in = next((name for name in SCRIPTS if name not in runs), None)
    lost = subprocess.CompletedProcess(runner.args, runner.returncode or 1, runner.stdout,
                                       f"the process stopped in {stopped_in}:\n{runner.stderr}")
    return {name: runs.get(name, lost) for name in SCRIPTS}


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

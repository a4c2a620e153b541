"""The import graph keeps its layers: no upward import, no cycle.

    entry points (llm, cli, demo, planner, testing)
      -> cluster -> engine -> worker -> model -> scheduler -> base (config, sampling_params, ...)
    kernels: imports nothing of pagedserve's; worker uses it

README.md ("How it works") draws the same layers, in the same order; a test
here holds the drawing to RANKS.

`model` (where a model comes from, its shape, and the memory rules) sits
below the worker, so the engine, the workers, the simulated GPU and the
planner all read one copy of each rule.

Every `import` in the package counts, those inside functions too: a lazy
import still ties two modules together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pagedserve"
# Higher imports lower; a module may import its own layer and any below it.
RANKS = {"entry": 7, "cluster": 6, "engine": 5, "worker": 4, "model": 3, "scheduler": 2,
         "base": 1}
ENTRY = {"pagedserve", "pagedserve.__main__", "pagedserve.cli", "pagedserve.demo",
         "pagedserve.llm", "pagedserve.planner"}
SUBPACKAGES = ("cluster", "engine", "worker", "model", "scheduler", "kernels", "testing")
GENERATED = ("pagedserve.cluster.proto",)


def layer(module: str) -> str:
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return "entry" if parts[1] == "testing" else parts[1]
    return "base"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The pagedserve modules `path` imports (`from a import b` counts a.b if it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "pagedserve":
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports(path, modules) - {name} for name, path in files.items()
            if not name.startswith(GENERATED)}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    problems = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if target.startswith(GENERATED):
                continue
            low, high = layer(source), layer(target)
            if low == high:
                continue
            if low == "kernels":
                problems.append(f"{source} -> {target}: kernels import nothing of pagedserve's")
            elif high == "kernels":
                if low not in ("worker", "entry"):
                    problems.append(f"{source} -> {target}: only the worker uses the kernels")
            elif high == "entry" and low != "entry":
                problems.append(f"{source} -> {target}: product code imports an entry point "
                                "or pagedserve.testing")
            elif RANKS[high] > RANKS[low]:
                problems.append(f"{source} ({low}) -> {target} ({high}): an upward import")
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_a_higher_layer():
    assert upward_imports(graph()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_scheduler_imports_no_torch():
    for path in (PACKAGE / "scheduler").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "torch" for n in names), path


# What the API processes must not load: the engine, its replica and the model stack.
ENGINE_SIDE = ("pagedserve.engine.core", "pagedserve.engine.async_engine",
               "pagedserve.cluster.server", "pagedserve.worker")


def loaded_after(statement: str) -> list[str]:
    """The modules of ENGINE_SIDE, torch and transformers a fresh interpreter holds after
    `statement` (torch only if it loaded: a hidden one sits in sys.modules as None)."""
    probe = (f"import sys\n{statement}\n"
             f"print(' '.join(m for m in {ENGINE_SIDE + ('torch', 'transformers')!r}"
             " if sys.modules.get(m) is not None))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_grpc_service_loads_no_engine_torch_or_transformers():
    assert loaded_after("import pagedserve.cluster.grpc_service") == []


def test_the_ingress_loads_no_engine_and_no_torch_of_its_own():
    """The HTTP ingress tokenizes, so it loads transformers, and transformers loads
    torch when it is installed (`from transformers import AutoTokenizer` reaches
    transformers.modeling_rope_utils). With torch hidden, the ingress still imports:
    nothing of ours on its path needs torch, and the engine stays out."""
    assert loaded_after("import pagedserve.cluster.ingress") == ["torch", "transformers"]
    assert loaded_after("sys.modules['torch'] = None  # import torch raises ImportError\n"
                        "import pagedserve.cluster.ingress") == ["transformers"]


def test_a_replica_starts_its_ranks_before_it_loads_torch():
    """The LLMServer replica's module, and the module its ranks' actor class comes from,
    load no torch: a replica's ranks start importing it at the same time as it does."""
    loaded = loaded_after("import pagedserve.cluster.server, pagedserve.worker.ray_worker")
    assert not {"torch", "transformers", "pagedserve.engine.core"} & set(loaded), loaded


def test_the_check_sees_an_upward_import_and_a_cycle():
    edges = graph()
    edges["pagedserve.scheduler.scheduler"] = edges["pagedserve.scheduler.scheduler"] | {
        "pagedserve.engine.core"}
    assert upward_imports(edges) == ["pagedserve.scheduler.scheduler (scheduler) -> "
                                     "pagedserve.engine.core (engine): an upward import"]
    assert ["pagedserve.engine.core", "pagedserve.scheduler.scheduler"] in cycles(edges)


def readme_layers() -> list[str]:
    """The layers README.md's drawing names, top to bottom (its fenced block after
    "The tree has")."""
    text = (PACKAGE.parent / "README.md").read_text()
    block = text[text.index("The tree has"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    names = []
    for line in block.splitlines():
        first = line.split()[0].rstrip(",")
        if first.endswith("/"):
            name = first.rstrip("/")
        elif first.removesuffix(".py") in {m.rpartition(".")[2] for m in ENTRY}:
            name = "entry"
        else:
            name = "base"
        if not names or names[-1] != name:
            names.append(name)
    return names


def test_readme_draws_these_layers():
    drawn = readme_layers()
    assert [name for name in drawn if name != "kernels"] == sorted(RANKS, key=RANKS.get,
                                                                   reverse=True), drawn
    assert "kernels" in drawn


"""The module layering, read from the source: every `import` counts, at the top of a module or
inside a function, and importing `a.b.c` also imports the package `a.b` (as Python does)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "launcher"
# Stages: they read and write a run dir, and never know who runs them or what comes next.
STAGES = {
    "launcher.worker",
    "launcher.merge",
    "launcher.streaming_merge",
    "launcher.evaluate",
    "launcher.report",
    "launcher.combine",
    "launcher.data",
    "launcher.models",
    "launcher.preflight",
    "launcher.checkpoints",
    "launcher.scores",
    "launcher.rendezvous",
    "launcher.quirks",
    "launcher.remote_code",
    "launcher.decoding",
    "launcher.methods",
    "launcher.recipe",
    "launcher.runs",
    "launcher.render",
    "launcher.hardware",
    "launcher.batching",
    "launcher.packing",
    "launcher.knobs",
    "launcher.tracking",
    "launcher.benchmarks",
    "launcher.vllm_backend",
    "launcher.errors",
    "launcher.assets",
}
# Executors know the run dir's records, the recipe's [slurm] section and the user-error type: no stage.
EXECUTOR_MAY_IMPORT = {"launcher.errors", "launcher.recipe", "launcher.runs", "launcher.methods"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def run_time_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from run_time_nodes(node)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every launcher module `path` imports anywhere in its body, with the packages that implies."""
    found = set()
    for node in run_time_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:end]) for end in range(2, len(parts) + 1)} & known
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                return path[path.index(other) :] + [other] if other in path else [node, other]
            if other not in state:
                cycle = visit(other, path + [other])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and graph["launcher.pipeline"] >= {"launcher.jobs", "launcher.executors.factory"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():  # the test above cannot pass by accident
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_imports_the_cli():
    importers = [name for name, imports in import_graph().items() if "launcher.cli" in imports]
    assert importers == []


def test_stages_never_import_an_executor_the_jobs_or_the_pipeline():
    graph = import_graph()
    for stage in sorted(STAGES):
        forbidden = {m for m in graph[stage] if m.startswith(("launcher.executors", "launcher.pipeline", "launcher.jobs"))}
        assert not forbidden, f"{stage} imports {forbidden}"


def test_executors_never_import_a_stage():
    graph = import_graph()
    for name, imports in graph.items():
        if name.startswith("launcher.executors"):
            outside = {m for m in imports if not m.startswith("launcher.executors")} - EXECUTOR_MAY_IMPORT
            assert not outside, f"{name} imports {outside}"


def test_only_the_factory_picks_an_executor_by_name():
    """No module outside executors/ compares anything with the executors' names."""
    for path in PACKAGE.rglob("*.py"):
        if "executors" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not {"local", "slurm"} & set(constants), f"{path.name}:{node.lineno} branches on an executor name"

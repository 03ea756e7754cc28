"""The run directory: its layout, its manifest, and the rule that nothing in it is overwritten silently."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from launcher.recipe import Recipe, RecipeError

TRACKED_PACKAGES = ("torch", "transformers", "peft", "deepspeed", "accelerate", "datasets")


@dataclass(frozen=True)
class RunDir:
    root: Path

    recipe = property(lambda self: self.root / "recipe.toml")
    accelerate_config = property(lambda self: self.root / "accelerate.yaml")
    deepspeed_config = property(lambda self: self.root / "deepspeed.json")
    manifest_path = property(lambda self: self.root / "manifest.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter")
    merged = property(lambda self: self.root / "merged")
    eval = property(lambda self: self.root / "eval")
    logs = property(lambda self: self.root / "logs")
    cache = property(lambda self: self.root / "cache")
    metrics_log = property(lambda self: self.root / "logs" / "train_metrics.jsonl")

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        return json.loads(self.manifest_path.read_text())

    def update_manifest(self, **changes: Any) -> dict[str, Any]:
        manifest = self.read_manifest() | changes
        write_atomic(self.manifest_path, json.dumps(manifest, indent=2) + "\n")
        return manifest

    def set_state(self, state: str) -> None:
        self.update_manifest(state=state, updated=now())


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def write_atomic(path: Path, text: str) -> None:
    """Write-to-temp, fsync, rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def claim_run_dir(run: RunDir, recipe: Recipe) -> bool:
    """Create the run dir for `recipe`, or accept it when it already holds the same recipe.

    Returns True when the run dir already existed (the run resumes). A run dir holding a
    different recipe, or files that are not a run of ours, is refused: never overwritten.
    """
    if not run.root.exists() or not any(run.root.iterdir()):
        run.root.mkdir(parents=True, exist_ok=True)
        return False
    recorded = run.read_manifest().get("recipe_hash")
    if recorded is None:
        raise RecipeError([f"{run.root}: exists and is not a run dir of this launcher; choose another --run-dir"])
    if recorded != recipe.fingerprint():
        raise RecipeError([
            f"{run.root}: holds a run of a different recipe (hash {recorded}, now {recipe.fingerprint()}); "
            f"to start a new run pass --run-dir NEW_DIR, or restore the recipe in {run.recipe} to resume"
        ])
    return True


def new_manifest(recipe: Recipe) -> dict[str, Any]:
    return {
        "name": recipe.name,
        "recipe_hash": recipe.fingerprint(),
        "launcher_version": package_version("peft-launcher"),
        "git_sha": git_sha(),
        "versions": {"python": platform.python_version()} | {p: package_version(p) for p in TRACKED_PACKAGES},
        "created": now(),
        "state": "rendered",
        "jobs": [],
    }


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    """The launcher's own commit, so a run records which code produced it."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None

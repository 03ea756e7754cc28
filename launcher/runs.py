"""The run directory: its layout, its manifest, and the rule that nothing in it is overwritten silently."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import tomllib
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

    def last_metrics_row(self) -> dict | None:
        """The newest row of logs/train_metrics.jsonl (None before the first logged step)."""
        if not self.metrics_log.exists():
            return None
        lines = self.metrics_log.read_text().splitlines()
        return json.loads(lines[-1]) if lines else None


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


def claim_run_dir(run: RunDir, recipe: Recipe) -> list[str]:
    """Create the run dir for `recipe`, or accept it for a resume.

    Returns the recipe changes a resume accepted (empty for a new run or the same recipe).
    A run dir of a recipe that cannot resume into this one, or files that are not a run of
    ours, is refused: never overwritten.
    """
    if not run.root.exists() or not any(run.root.iterdir()):
        run.root.mkdir(parents=True, exist_ok=True)
        return []
    recorded = run.read_manifest().get("recipe_hash")
    if recorded is None or not run.recipe.is_file():
        raise RecipeError([f"{run.root}: exists and is not a run dir of this launcher; choose another --run-dir"])
    if recorded == recipe.fingerprint():
        return []
    changes = reconcile(tomllib.loads(run.recipe.read_text()), recipe.to_dict(), run.root)
    archive(run, [run.recipe, run.root / "sbatch.sh"])
    manifest = run.read_manifest()
    run.update_manifest(recipe_hash=recipe.fingerprint(), recipe_changes=manifest.get("recipe_changes", []) + changes)
    return changes


# Keys a resume may change: they alter neither the checkpoint's shapes and sharding nor the data order.
RESUMABLE = ("train.max_steps", "train.epochs", "train.save_steps", "train.save_total_limit",
             "train.logging_steps", "eval.", "merge.", "slurm.")
WHY_NOT = {"model.": "the checkpoint holds an adapter for that base model",
           "peft.": "the checkpoint's adapter shapes and target modules come from it",
           "distributed.": "the ZeRO checkpoint is sharded for the recorded ranks and stage",
           "data.": "the data order and position would no longer match the checkpoint",
           "train.": "the optimizer, schedule or data order in the checkpoint were made with the old value",
           "name": "it names the run"}


def reconcile(old: dict, new: dict, where: Path) -> list[str]:
    """Which keys changed since the run's recipe; refuse those a resume cannot honour."""
    changed = [(key, a, b) for key, a, b in differences(old, new)]
    refused = [(k, a, b) for k, a, b in changed if not k.startswith(RESUMABLE) and k not in RESUMABLE]
    if refused:
        raise RecipeError([
            f"{key}: {json.dumps(a)} -> {json.dumps(b)} cannot change when resuming {where} "
            f"({next(v for p, v in WHY_NOT.items() if key.startswith(p))}); restore it, or start a new run with --run-dir"
            for key, a, b in refused])
    return [f"{key}: {json.dumps(a)} -> {json.dumps(b)} (the new value wins)" for key, a, b in changed]


def differences(old: dict, new: dict, prefix: str = ""):
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "deepspeed_overrides":
            yield from differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b


def archive(run: RunDir, paths: list[Path]) -> None:
    """Move superseded rendered files to history/ (kept, never overwritten)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in paths:
        if path.exists():
            (run.root / "history").mkdir(exist_ok=True)
            path.rename(run.root / "history" / f"{stamp}-{path.name}")


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


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

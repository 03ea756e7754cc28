"""The one place that picks an executor implementation by name (local.py, slurm.py; the interface is base.py)."""

from __future__ import annotations

from pathlib import Path

from launcher.config.recipe import Recipe
from launcher.errors import UserError
from launcher.launch.executors.base import Executor, Job
from launcher.launch.executors.local import LocalExecutor, LocalJob
from launcher.launch.executors.slurm import SlurmExecutor, SlurmJob, default_partition, require_slurm, slurm_available
from launcher.rundir.runs import JobRecord

NAMES = ("local", "slurm")


def make_executor(name: str, recipe: Recipe, logs: Path) -> Executor:
    """The executor `name`, writing its job files and task logs under logs/<name>/."""
    if name == "slurm":
        return SlurmExecutor(recipe.slurm, Path(logs) / "slurm")

    return LocalExecutor(Path(logs) / "local")


def queues_jobs(name: str) -> bool:
    """The executor `name` submits to a cluster's scheduler (whose job asks for its own resources)."""
    return name == "slurm"


def job_of(record: JobRecord, logs: Path) -> Job:
    """The handle of a job recorded in a manifest, whichever executor ran it."""
    if record.executor == "slurm":
        return SlurmJob(record, Path(logs) / "slurm")

    return LocalJob(record, Path(logs) / "local")


def choose_executor(asked: str, recipe: Recipe, rendering_only: bool = False) -> str:
    """local or slurm for `--executor asked` (auto: SLURM when sbatch answers and a partition is known)."""

    nodes = recipe.distributed.nodes
    if asked == "local":
        if nodes > 1:
            raise UserError(f"--executor local: distributed.nodes={nodes} needs SLURM; use --executor slurm")
        return "local"
    if asked == "slurm" or nodes > 1:
        if not rendering_only:  # a dry run renders sbatch.sh without a cluster
            require_slurm("--executor slurm" if asked == "slurm" else f"distributed.nodes={nodes} (several nodes)")
        return "slurm"
    return "slurm" if slurm_available() and (recipe.slurm.partition or default_partition()) else "local"

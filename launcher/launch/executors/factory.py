"""The one place that picks an executor implementation by name (local.py, slurm.py; the interface is base.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.config.recipe import Recipe
from launcher.errors import UserError
from launcher.launch.executors.base import Executor, Job
from launcher.launch.executors.local import LocalExecutor, LocalJob
from launcher.launch.executors.slurm import SlurmExecutor, SlurmJob, default_partition, require_slurm, slurm_available
from launcher.rundir.runs import JobRecord


@dataclass(frozen=True)
class Kind:
    """One executor implementation: how it is made, how a recorded job of it is found again."""

    job: Callable[[JobRecord, Path], Job]
    queues: bool
    """It submits to a cluster's scheduler, whose job asks for its own resources."""
    make: Callable[[Recipe, Path], Executor]


REGISTRY: dict[str, Kind] = {
    "local": Kind(LocalJob, queues=False, make=lambda recipe, folder: LocalExecutor(folder)),
    "slurm": Kind(SlurmJob, queues=True, make=lambda recipe, folder: SlurmExecutor(recipe.slurm, folder)),
}
NAMES = tuple(REGISTRY)  # the CLI's --executor choices (and "auto")


def make_executor(name: str, recipe: Recipe, logs: Path) -> Executor:
    """The executor `name`, writing its job files and task logs under logs/<name>/."""
    return REGISTRY[name].make(recipe, Path(logs) / name)


def queues_jobs(name: str) -> bool:
    """The executor `name` submits to a cluster's scheduler (whose job asks for its own resources)."""
    return REGISTRY[name].queues


def job_of(record: JobRecord, logs: Path) -> Job:
    """The handle of a job recorded in a manifest, whichever executor ran it."""
    return REGISTRY[record.executor].job(record, Path(record.folder) if record.folder else Path(logs) / record.executor)


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

"""The executor interface (shaped like submitit's `Executor.submit -> Job`): submit a job body with
its resources and the job it must wait for; get a handle that answers state, cancel and logs.

A job body is a small picklable callable that runs once in every task of the job. Each task
finds the torch.distributed variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) set, whichever executor started it; a body that needs none ignores
them. Executors never import a stage: the caller hands them the body.
"""

from __future__ import annotations

import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.rundir.runs import JobRecord

# Job states, in SLURM's words; every executor answers with these.
PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, UNKNOWN = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "UNKNOWN")
# The signal SLURM sends before a time limit (submitit's --signal=USR2@lead): a training rank saves a
# checkpoint at its next step and ends. The local executor sends it to stop a job the same way.
STOP_SIGNAL = signal.SIGUSR2
TERMINAL_STATES = frozenset(
    {COMPLETED, FAILED, CANCELLED, "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", UNKNOWN}
)


@dataclass(frozen=True)
class Resources:
    """What one job asks for: the same names for every executor (a local one uses what applies)."""

    name: str
    stage: str
    """train, merge or eval: recorded with the job."""
    nodes: int = 1
    tasks_per_node: int = 1
    time_minutes: int = 60
    cpus_per_task: int | None = None
    mem: str | None = None
    gpus_per_node: int | None = None
    gpus_per_task: int | None = None
    all_or_nothing: bool = False
    """The tasks are ranks of one world: when one fails, the others are ended (they would wait in a collective)."""
    requeue_run: str | None = None
    """A training run dir (an array's: its members file, one run dir per element): on SLURM a crashed or
    stopped job is requeued to resume it (slurm.max_restarts)."""


class Job(ABC):
    """A submitted job: answers its state, ends it, and names its log files."""

    def __init__(self, record: JobRecord):
        self.record = record

    @property
    def id(self) -> str:
        return self.record.id

    @abstractmethod
    def state(self) -> str:
        """One of the states above (SLURM may answer others, e.g. TIMEOUT, REQUEUED)."""

    def active(self) -> bool:
        return self.state() not in TERMINAL_STATES

    @abstractmethod
    def cancel(self) -> None:
        """End the job (or take it out of the queue) and whatever waits on it."""

    def stop(self, grace_s: float) -> None:
        """Ask the job to save and end, as before a time limit; cancel it if it has not ended in grace_s.
        Executors that cannot ask simply cancel."""
        self.cancel()

    @abstractmethod
    def log(self, task: int = 0) -> Path:
        """The file holding task `task`'s stdout and stderr."""

    def waiting(self) -> str | None:
        """Why a pending job waits, and when it is expected to start, when the scheduler says (SLURM)."""
        return None

    def describe(self) -> str:
        """One line for `launch status`."""
        size = f", {self.record.nodes} nodes, {self.record.ranks} ranks" if self.record.nodes else ""
        state = self.state()
        why = self.waiting() if state == PENDING else None
        return f"{self.kind} job {self.id} {state.lower()}{f' ({why})' if why else ''}{size}, submitted {self.record.submitted}"

    kind = "job"
    poll_interval_s = 2.0


class Executor(ABC):
    name: str
    detachable = False
    """Its jobs go on without the process that submitted them (a detached launch is possible)."""
    on_other_machines = False
    """Its jobs run on other machines than the submitting one (a server there listens on every address)."""

    @abstractmethod
    def submit(self, body: Callable[[], object], resources: Resources, after: Job | None = None) -> Job:
        """Queue `body` to run in every task of a job of `resources`, once `after` has completed
        successfully (a failed `after` ends this job unrun)."""

    @abstractmethod
    def job(self, record: JobRecord) -> Job:
        """The handle of a job recorded earlier (maybe by another process)."""

    def submission_script(self, resources: Resources) -> str | None:
        """The script this executor would submit for `resources`, when it submits one (SLURM)."""
        return None

    def refusal(self, resources: Resources) -> str | None:
        """Why the scheduler would never run a job of `resources` (None: it would, or there is no scheduler)."""
        return None

    runs_arrays = False
    """It submits many jobs of one shape as one array (a sweep's variants): the methods below work."""

    def submit_array(self, bodies: list, resources: Resources, parallel: int, after: str | None = None) -> list[Job]:
        """One array, element i running bodies[i], at most `parallel` at once, each after element i of
        the array `after`."""
        raise NotImplementedError(f"{self.name} runs no job arrays")

    def array_script(self, resources: Resources, count: int, parallel: int, after: str | None = None) -> str | None:
        return None

    def array_limit(self) -> int:
        """The most elements one array may have."""
        return 1

    def array_states(self, array_ids: list[str]) -> dict[str, tuple[str, str]]:
        """Element id -> (state, why it waits) of every element the scheduler still knows, in one query."""
        return {}

    def cancel_arrays(self, array_ids: list[str]) -> None:
        """End every element of these arrays."""
        raise NotImplementedError(f"{self.name} runs no job arrays")


def task_index() -> int:
    """This task's number within its job (0 .. tasks-1): every executor sets RANK for it."""
    return int(os.environ.get("RANK", "0"))


def task_threads(tasks_on_node: int) -> int:
    """Cores per task when `tasks_on_node` tasks share this machine, so they do not oversubscribe it."""
    return max(1, (os.cpu_count() or 1) // max(tasks_on_node, 1))


# What every task's environment holds besides the distributed variables (both executors).
# TRL's trainers ping the hub for telemetry when made: on offline nodes that would hang or warn per rank.
TASK_ENVIRONMENT = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}

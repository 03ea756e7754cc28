"""Local executor: a job's tasks are processes on this machine, in one process group of their own.

Each task runs `python -m launcher.executors.local BODY.pkl` with the torch.distributed variables
set (as torchrun would), its output in FOLDER/ID_TASK.log. A job that waits for another starts
when its follower (the `launch` process) sees that one complete. When one task fails, the others
get a few seconds to end on their own (and write their errors), then the group is stopped: a rank
left waiting in a collective would otherwise sit there for 30 minutes.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from launcher.executors.base import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    TASK_ENVIRONMENT,
    TERMINAL_STATES,
    UNKNOWN,
    Executor,
    Job,
    Resources,
    task_threads,
)
from launcher.runs import JobRecord, now

GRACE_S = 5.0  # after a task failed, before the others are stopped


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalJob(Job):
    kind = "local"
    poll_interval_s = 0.2  # polling is what starts a waiting job and stops the rest of a failed one

    def __init__(
        self,
        record: JobRecord,
        folder: Path,
        tasks: int = 1,
        after: Job | None = None,
        owned: bool = False,
        all_or_nothing: bool = False,
    ):
        super().__init__(record)
        self.all_or_nothing = all_or_nothing
        self.folder, self.tasks, self.after, self.owned = Path(folder), tasks, after, owned
        self.processes: list[subprocess.Popen] | None = None
        self.final: str | None = None
        self.failed_at: float | None = None

    body_file = property(lambda self: self.folder / f"{self.id}.pkl")
    group_file = property(lambda self: self.folder / f"{self.id}.pgid")
    cancel_file = property(lambda self: self.folder / f"{self.id}.cancelled")

    def log(self, task: int = 0) -> Path:
        return self.folder / f"{self.id}_{task}.log"

    def group(self) -> int | None:
        return int(self.group_file.read_text()) if self.group_file.exists() else None

    def state(self) -> str:
        if self.final:
            return self.final
        if self.processes is None:
            return self._before_start()
        codes = [p.poll() for p in self.processes]
        if all(code == 0 for code in codes):
            self.final = COMPLETED
        elif all(code is not None for code in codes):
            self.final = FAILED
        elif self.all_or_nothing and any(code not in (None, 0) for code in codes):
            self._stop_the_rest()
        return self.final or RUNNING

    def _before_start(self) -> str:
        """Known only from a manifest record (another process started it), or waiting to start."""
        if not self.owned:  # known from a record: ask the process group
            group = self.group()
            return RUNNING if group and alive(group) else (CANCELLED if self.cancel_file.exists() else UNKNOWN)
        if self.cancel_file.exists():
            self.final = CANCELLED
            return self.final
        waited = self.after.state() if self.after else COMPLETED
        if waited == COMPLETED:
            self._start()
            return RUNNING
        if waited in TERMINAL_STATES:
            self.final = CANCELLED  # as SLURM's kill_on_invalid_dep does
            return self.final
        return PENDING

    def _start(self) -> None:
        environment = (
            os.environ
            | TASK_ENVIRONMENT
            | {
                "OMP_NUM_THREADS": str(task_threads(self.tasks)),
                "WORLD_SIZE": str(self.tasks),
                "LOCAL_WORLD_SIZE": str(self.tasks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
            }
        )
        self.processes = []
        for task in range(self.tasks):
            group = {"process_group": 0 if task == 0 else self.processes[0].pid}  # one group of its own
            with open(self.log(task), "ab") as log:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "launcher.executors.local", str(self.body_file)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        **group,
                        env=environment | {"RANK": str(task), "LOCAL_RANK": str(task)},
                    )
                )
        self.group_file.write_text(str(self.processes[0].pid))

    def _stop_the_rest(self) -> None:
        self.failed_at = self.failed_at or time.time()
        waited = time.time() - self.failed_at
        if waited > GRACE_S:
            signal_group(self.processes[0].pid, signal.SIGTERM if waited < GRACE_S + 10 else signal.SIGKILL)

    def cancel(self) -> None:
        self.cancel_file.write_text(now())
        group = self.processes[0].pid if self.processes else self.group()
        if group:
            signal_group(group, signal.SIGTERM)
        if self.processes:
            for process in self.processes:
                process.wait()
            self.final = CANCELLED

    def describe(self) -> str:
        return (
            f"local process group {self.group() or '-'} {'running' if self.active() else 'ended'}, "
            f"started {self.record.submitted}"
        )


def alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def signal_group(group: int, number: int) -> None:
    try:
        os.killpg(group, number)
    except ProcessLookupError:
        pass  # already gone


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def submit(self, body, resources: Resources, after: Job | None = None) -> LocalJob:
        if resources.nodes > 1:
            raise ValueError(f"the local executor runs one node, not {resources.nodes}")
        self.folder.mkdir(parents=True, exist_ok=True)
        record = JobRecord(
            executor=self.name,
            id=f"{resources.stage}-{time.time_ns()}",
            stage=resources.stage,
            submitted=now(),
            nodes=1,
            ranks=resources.tasks_per_node,
            after=after.id if after else None,
        )
        job = LocalJob(record, self.folder, resources.tasks_per_node, after, owned=True, all_or_nothing=resources.all_or_nothing)
        job.body_file.write_bytes(pickle.dumps(body))
        job.state()  # starts it unless it waits
        return job

    def job(self, record: JobRecord) -> LocalJob:
        return LocalJob(record, self.folder)


def run_task(body_file: str) -> int:
    """One task: unpickle the body and call it; a user error is one line and exit code 2."""
    from launcher.errors import UserError

    body = pickle.loads(Path(body_file).read_bytes())
    try:
        result = body()
    except UserError as err:
        for line in err.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(run_task(sys.argv[1]))

"""Local executor: a job's tasks are processes on this machine, in one process group of their own.

Each task runs `python -m launcher.launch.executors.local BODY.pkl` with the torch.distributed variables
set (as torchrun would), its output in FOLDER/ID_TASK.log. A job that waits for another starts
when its follower (the `launch` process) sees that one complete. When one task fails, the others
get a few seconds to end on their own (and write their errors), then the group is stopped: a rank
left waiting in a collective would otherwise sit there for 30 minutes.

The tasks never outlive the process that started them: each watches its parent, and when the
parent is gone (killed, even with SIGKILL) it gets the stop signal (training saves a checkpoint
at its next step) and ends for good ORPHAN_GRACE_S later. A job known only from its record is
found by its processes' command line (which names the job's unique body file), never by a
process or group id alone: ids are reused.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

from launcher.errors import UserError
from launcher.launch.executors.base import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    STOP_SIGNAL,
    TASK_ENVIRONMENT,
    TERMINAL_STATES,
    UNKNOWN,
    Executor,
    Job,
    Resources,
    task_threads,
)
from launcher.rundir.runs import MASTER_FD_VARIABLE, START_TOKEN_VARIABLE, JobRecord, now

GRACE_S = 5.0  # after a task failed, before the others are stopped
TERM_GRACE_S = 10.0  # after SIGTERM, before SIGKILL
ORPHAN_GRACE_S = 60.0  # a task whose parent is gone: time to save a checkpoint before it ends regardless
PARENT_VARIABLE = "LAUNCHER_PARENT_PID"


def held_listener() -> socket.socket:
    """A socket listening on a free loopback port, for task 0's rendezvous store: bound here and
    passed on open, so no other process can take the port between its choice and its use."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # a rank connecting before task 0's store takes it over waits in the backlog
    return sock


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

    body_file = property(lambda self: self.folder.resolve() / f"{self.id}.pkl")  # absolute: it identifies the tasks
    cancel_file = property(lambda self: self.folder / f"{self.id}.cancelled")

    def log(self, task: int = 0) -> Path:
        return self.folder / f"{self.id}_{task}.log"

    def state(self) -> str:
        if self.final:
            return self.final
        if self.processes is None:
            return self._before_start()
        codes = [p.poll() for p in self.processes]
        if all(code == 0 for code in codes):
            self.final = COMPLETED
        elif all(code is not None for code in codes):
            self.final = CANCELLED if self.cancel_file.exists() else FAILED
        elif self.all_or_nothing and any(code not in (None, 0) for code in codes):
            self._stop_the_rest()
        return self.final or RUNNING

    def _before_start(self) -> str:
        """Known only from a manifest record (another process started it), or waiting to start."""
        if not self.owned:  # known from a record: look for its processes
            return RUNNING if self.members() else (CANCELLED if self.cancel_file.exists() else UNKNOWN)
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

    def members(self) -> list[int]:
        """Process ids of this job's tasks still running: their command line names its body file."""
        return processes_running(str(self.body_file))

    def _start(self) -> None:
        listener = held_listener()
        environment = (
            os.environ
            | TASK_ENVIRONMENT
            | {
                "OMP_NUM_THREADS": str(task_threads(self.tasks)),
                "WORLD_SIZE": str(self.tasks),
                "LOCAL_WORLD_SIZE": str(self.tasks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(listener.getsockname()[1]),
                START_TOKEN_VARIABLE: self.id,
                PARENT_VARIABLE: str(os.getpid()),
            }
        )
        self.processes = []
        with listener:  # task 0 holds its own copy; this process's closes once it started
            for task in range(self.tasks):
                group = {"process_group": 0 if task == 0 else self.processes[0].pid}  # one group of its own
                held = {"pass_fds": [listener.fileno()]} if task == 0 else {}
                variables = {"RANK": str(task), "LOCAL_RANK": str(task)}
                variables |= {MASTER_FD_VARIABLE: str(listener.fileno())} if task == 0 else {}
                with open(self.log(task), "ab") as log:
                    self.processes.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "launcher.launch.executors.local", str(self.body_file)],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            **group,
                            **held,
                            env=environment | variables,
                        )
                    )

    def _stop_the_rest(self) -> None:
        self.failed_at = self.failed_at or time.time()
        waited = time.time() - self.failed_at
        if waited > GRACE_S:
            self._signal(signal.SIGTERM if waited < GRACE_S + TERM_GRACE_S else signal.SIGKILL)

    def cancel(self) -> None:
        """End the tasks now (SIGTERM, SIGKILL after TERM_GRACE_S); a waiting job never starts."""
        self.cancel_file.write_text(now())
        self._signal(signal.SIGTERM)
        if not self._wait(TERM_GRACE_S):
            self._signal(signal.SIGKILL)
            self._wait(TERM_GRACE_S)
        if self.owned:
            self.final = CANCELLED

    def stop(self, grace_s: float) -> None:
        """Ask the tasks to save and end (the stop signal, as SLURM sends before a time limit); those
        still running after grace_s are cancelled."""
        if self.processes is None and self.owned:
            self.cancel()  # still waiting for its predecessor: it never starts
            return
        self._signal(STOP_SIGNAL)
        if not self._wait(grace_s):
            self.cancel()

    def _signal(self, number: int) -> None:
        pids = [p.pid for p in self.processes if p.poll() is None] if self.processes else self.members()
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, number)

    def _wait(self, timeout_s: float) -> bool:
        """True once no task of the job runs (within timeout_s)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            running = [p for p in self.processes if p.poll() is None] if self.processes else self.members()
            if not running:
                return True
            time.sleep(0.1)
        return False

    def describe(self) -> str:
        running = self.members()
        where = f"running (pids {' '.join(map(str, running))})" if running else "ended"
        return f"local job {self.id} {where}, started {self.record.submitted}"


def processes_running(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` as one of its arguments (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if marker.encode() in arguments:
            found.append(int(entry.name))
    return found


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


def watch_parent(parent: int) -> None:
    """When `parent` (the process that started this task) is gone, send this process the stop signal
    (training saves at its next step and ends), and end it for good ORPHAN_GRACE_S later."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"the process that started this task ({parent}) is gone: stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), STOP_SIGNAL)
        time.sleep(ORPHAN_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_task(body_file: str) -> int:
    """One task: unpickle the body and call it; a user error is one line and exit code 2."""

    if os.environ.get(PARENT_VARIABLE):
        watch_parent(int(os.environ[PARENT_VARIABLE]))
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

"""SLURM executor: each job is one submitit job (an sbatch script of nodes x tasks), its state read
with scontrol/squeue.

There may be no slurmdbd (small clusters, the dev cluster), so nothing here uses sacct.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launcher.config.recipe import SlurmSection
from launcher.errors import UserError
from launcher.launch.executors.base import TASK_ENVIRONMENT, UNKNOWN, Executor, Job, Resources
from launcher.rundir.runs import JobRecord, now

SBATCH_SAFE_PATH = r"^[A-Za-z0-9/._+@,=:-]+$"


@functools.cache
def slurm_available() -> bool:
    """True when sbatch exists and the controller answers (asked once per process)."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def default_partition() -> str | None:
    """The cluster's default partition (marked * by sinfo), or None."""
    if not slurm_available():
        return None
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=15).stdout
    return next((p.rstrip("*") for p in out.split() if p.endswith("*")), None)


SCHEDULER_TIMEOUT_S = 30.0
SCHEDULER_TRIES = 4  # waits of 2, 4 and 8 s between them: a controller busy for about two minutes is ridden out


def scheduler(command: list[str], timeout_s: float | None = None, tries: int | None = None) -> subprocess.CompletedProcess:
    """A SLURM command (scontrol, squeue, scancel), retried with back-off when the controller is slow
    to answer; when it never answers in time, one line (UserError) saying the job itself is unaffected."""
    timeout_s, tries = timeout_s or SCHEDULER_TIMEOUT_S, tries or SCHEDULER_TRIES
    for attempt in range(tries):
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            if attempt + 1 < tries:
                time.sleep(2 ** (attempt + 1))
    raise UserError(
        [
            f"SLURM did not answer `{' '.join(command)}` within {timeout_s:g} s, {tries} times: the controller is "
            f"overloaded or down; jobs already queued are unaffected (see them later with `launch status`)"
        ]
    )


# SLURM's pending reasons a first-time user meets, in words (squeue --help lists them all)
PENDING_REASONS = {
    "PartitionConfig": "the partition cannot give what the job asks (more nodes, CPUs, memory or time than it "
    "has): it will never start; cancel it and ask for less",
    "Resources": "waiting for nodes to free up",
    "Priority": "jobs of higher priority are ahead in the queue",
    "Dependency": "waiting for the job before it",
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved",
    "QOSMaxJobsPerUserLimit": "you have as many jobs running as your QOS allows",
    "AssocGrpCpuLimit": "your account's CPU limit is reached",
    "AssocGrpGRES": "your account's GPU limit is reached",
    "BeginTime": "it was asked to start later",
    "JobHeldUser": "held (scontrol release to let it start)",
    "JobHeldAdmin": "held by an administrator",
}


def job_fields(job_id: str) -> dict[str, str]:
    """scontrol's key=value fields of the job ({} once SLURM forgot it)."""
    out = scheduler(["scontrol", "show", "job", "-o", job_id])
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def job_state(job_id: str) -> str:
    """The job's state from scontrol (squeue as a fallback); UNKNOWN once SLURM forgot the job."""
    state = job_fields(job_id).get("JobState")
    if state:
        return state
    out = scheduler(["squeue", "-h", "-j", job_id, "-o", "%T"])
    return out.stdout.strip() or UNKNOWN


def waiting_reason(fields: dict[str, str]) -> str | None:
    """ "<Reason>: <in words>; expected start <StartTime>" of a pending job, from scontrol's fields."""
    reason, start = fields.get("Reason", "None"), fields.get("StartTime", "Unknown")
    parts = [] if reason in ("None", "") else [f"{reason}: {PENDING_REASONS[reason]}" if reason in PENDING_REASONS else reason]
    parts += [] if start in ("Unknown", "None", "") else [f"expected start {start}"]
    return "; ".join(parts) or None


class SlurmJob(Job):
    kind = "SLURM"

    def __init__(self, record: JobRecord, folder: Path):
        super().__init__(record)
        self.folder = Path(folder)

    def state(self) -> str:
        return job_state(self.id)

    def waiting(self) -> str | None:
        return waiting_reason(job_fields(self.id))

    def cancel(self) -> None:
        done = scheduler(["scancel", self.id])
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)

    def log(self, task: int = 0) -> Path:
        return self.folder / f"{self.id}_{task}_log.out"


class SlurmTask:
    """What every SLURM task runs: the torch.distributed variables from SLURM, then the body."""

    def __init__(self, body):
        self.body = body

    def __call__(self):
        import signal

        import submitit

        # submitit's SIGTERM handler would requeue; a SIGTERM (srun --kill-on-bad-exit, scancel)
        # must end this task at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Every rank sees all of its node's GPUs and picks LOCAL_RANK's, as torchrun does.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return self.body()


class SlurmExecutor(Executor):
    name = "slurm"
    detachable = True
    on_other_machines = True

    def __init__(self, cluster: SlurmSection, folder: Path):
        self.cluster, self.folder = cluster, Path(folder)
        where = str(self.folder.resolve())
        if not re.match(SBATCH_SAFE_PATH, where):
            raise UserError(
                f"{where}: the job's log folder goes on #SBATCH lines, which allow no spaces, quotes, '#' or '%' "
                f"in a path; choose a --run-dir of letters, digits and / . _ - + @ , = :"
            )

    def parameters(self, resources: Resources) -> dict:
        """submitit parameters; submitit shell-quotes every #SBATCH value."""
        c, r = self.cluster, resources
        exports = TASK_ENVIRONMENT | c.environment
        # One thread per allocated core, so ranks sharing a node do not oversubscribe it.
        setup = ['export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"']
        setup += [f"export {name}={shlex.quote(value)}" for name, value in exports.items()] + list(c.setup)
        optional = {
            "partition": c.partition,
            "account": c.account,
            "qos": c.qos,
            "constraint": c.constraint,
            "gpus_per_node": r.gpus_per_node,
            "gpus_per_task": r.gpus_per_task,
            "cpus_per_task": r.cpus_per_task,
            "mem": r.mem,
        }
        parameters = {
            "job_name": r.name,
            "nodes": r.nodes,
            "ntasks_per_node": r.tasks_per_node,
            "time": r.time_minutes,
            "setup": setup,
            "stderr_to_stdout": True,
            "signal_delay_s": c.signal_lead_s,
            "additional_parameters": {},
        }
        if r.all_or_nothing:  # one failed rank ends the step at once, not after a 30-minute collective timeout
            parameters["srun_args"] = ["--kill-on-bad-exit=1"]
        if r.requeue_run:
            parameters["additional_parameters"]["requeue"] = True
            # After the ranks: a crashed step is requeued (up to slurm.max_restarts) to resume.
            parameters["teardown"] = [
                "launcher_rc=$?",
                " ".join(shlex.quote(part) for part in [sys.executable, "-m", "launcher.launch.executors.requeue", r.requeue_run])
                + ' "$launcher_rc"',
                'exit "$launcher_rc"',
            ]
        return parameters | {key: value for key, value in optional.items() if value is not None}

    def submitit_executor(self, resources: Resources, after: Job | None = None):
        import submitit

        if not shutil.which("srun"):  # submitit's own check would be a traceback
            raise UserError(
                "--executor slurm: srun is not on PATH here, and the job script is made with it; "
                "submit from a cluster's login node (a --dry-run renders the script anywhere), or use --executor local"
            )
        executor = submitit.SlurmExecutor(folder=str(self.folder.resolve()))
        executor.update_parameters(**self.job_parameters(resources, after and f"afterok:{after.id}"))
        return executor

    def job_parameters(self, resources: Resources, dependency: str | None = None) -> dict:
        parameters = self.parameters(resources)
        if dependency is not None:
            parameters["dependency"] = dependency
            # When the job it waits for fails for good, this one ends at once instead of waiting forever.
            parameters["additional_parameters"]["kill_on_invalid_dep"] = "yes"
        return parameters

    def submit(self, body, resources: Resources, after: Job | None = None) -> SlurmJob:
        job = self.submitit_executor(resources, after).submit(SlurmTask(body))
        return SlurmJob(self.record(str(job.job_id), resources, after.id if after else None), self.folder)

    def record(self, job_id: str, resources: Resources, after: str | None, folder: Path | None = None) -> JobRecord:
        return JobRecord(
            executor=self.name,
            id=job_id,
            stage=resources.stage,
            submitted=now(),
            nodes=resources.nodes,
            ranks=resources.nodes * resources.tasks_per_node,
            after=after,
            folder=str(folder) if folder else None,
        )

    def submit_array(self, bodies: list, resources: Resources, parallel: int, after: str | None = None) -> list[SlurmJob]:
        """One job array, element i running bodies[i] on `resources` (a whole multi-node job each), at
        most `parallel` at once; with `after` (an array's id) element i waits for that array's element i
        to succeed (aftercorr). Callers keep len(bodies) within max_array_size()."""
        import submitit

        executor = self.submitit_executor(resources)
        executor.update_parameters(array_parallelism=parallel)
        if after is not None:
            executor.update_parameters(**self.job_parameters(resources, f"aftercorr:{after}"))
        jobs: list[submitit.Job] = []
        with executor.batch():
            for body in bodies:
                jobs.append(executor.submit(SlurmTask(body)))
        return [
            SlurmJob(
                self.record(str(job.job_id), resources, f"{after}_{i}" if after else None, self.folder.resolve()), self.folder
            )
            for i, job in enumerate(jobs)
        ]

    runs_arrays = True

    def array_limit(self) -> int:
        return max_array_size()

    def array_states(self, array_ids: list[str]) -> dict[str, tuple[str, str]]:
        if not array_ids:
            return {}
        out = scheduler(["squeue", "-h", "-r", "-j", ",".join(array_ids), "-o", "%i|%T|%r"])
        states = {}
        for line in out.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                states[parts[0]] = (parts[1], parts[2])
        return states

    def cancel_arrays(self, array_ids: list[str]) -> None:
        if array_ids:
            done = scheduler(["scancel", *array_ids])
            if done.returncode != 0:
                raise UserError(f"scancel {' '.join(array_ids)} failed: {done.stderr.strip()}")

    def array_script(self, resources: Resources, count: int, parallel: int, after: str | None = None) -> str:
        """The sbatch script of a `count`-element array (what submit_array submits), rendered anywhere."""
        parameters = self.job_parameters(resources, after and f"aftercorr:{after}")
        return sbatch_text(self.folder, parameters | {"map_count": count, "array_parallelism": parallel})

    def job(self, record: JobRecord) -> SlurmJob:
        return SlurmJob(record, self.folder)

    def submission_script(self, resources: Resources) -> str:
        """The training job's sbatch script, as the login node would submit it (no srun needed to render it)."""
        return sbatch_text(self.folder, self.job_parameters(resources))

    def refusal(self, resources: Resources) -> str | None:
        """sbatch --test-only on the job's script: SLURM's own verdict in a second, nothing queued."""
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="launcher-test-only-") as script:
            script.write(self.submission_script(resources))
            script.flush()
            result = scheduler(["sbatch", "--test-only", script.name])
        if result.returncode == 0:
            return None
        errors = [line.split("error:", 1)[1].strip() for line in result.stderr.splitlines() if "error:" in line]
        return errors[-1] if errors else (result.stderr.strip().splitlines() or ["no reason given"])[-1]


def sbatch_text(folder: Path, parameters: dict) -> str:
    """The sbatch script submitit submits for these parameters, with %j (%A_%a in an array) for the id.

    submitit has no public call for it; this is the one place that uses its private renderer
    (tests/test_executors.py checks it against the installed submitit)."""
    from submitit.slurm.slurm import _make_sbatch_string

    where = Path(folder).resolve()
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(where))])
    return _make_sbatch_string(command=command, folder=where, **parameters)


@functools.cache
def max_array_size() -> int:
    """The cluster's MaxArraySize (an array's indices stay below it); SLURM's default 1001 when unknown."""
    if slurm_available():
        out = scheduler(["scontrol", "show", "config"]).stdout
        found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
        if found:
            return int(found.group(1))
    return 1001


def require_slurm(why: str) -> None:
    if not slurm_available():
        raise UserError(
            f"{why} needs a SLURM cluster, and sbatch/sinfo do not answer here; run on a cluster's "
            'login node, or try one on this machine: eval "$(slurm/dev-cluster up)"'
        )

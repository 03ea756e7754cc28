"""SLURM executor: one submitit job of nodes x procs_per_node tasks, followed with squeue/scontrol.

There may be no slurmdbd (small clusters, the dev cluster), so nothing here uses sacct.
"""
from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from launcher.progress import follow_training, report_failure
from launcher.recipe import Recipe, RecipeError
from launcher.runs import RunDir, now, write_atomic

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@functools.cache
def slurm_available() -> bool:
    """True when sbatch exists and the controller answers (asked once per process)."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def slurm_parameters(recipe: Recipe, run: RunDir) -> dict:
    """submitit parameters from the recipe; submitit shell-quotes every #SBATCH value."""
    s = recipe.slurm
    exports = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"} | s.environment
    # One thread per allocated core, so ranks sharing a node do not oversubscribe it.
    setup = ['export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"']
    setup += [f"export {name}={shlex.quote(value)}" for name, value in exports.items()] + list(s.setup)
    optional = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint,
                "gpus_per_node": s.gpus_per_node, "cpus_per_task": s.cpus_per_task, "mem": s.mem}
    return {
        "job_name": recipe.name,
        "nodes": recipe.distributed.nodes,
        "ntasks_per_node": recipe.distributed.procs_per_node,
        "time": s.time_minutes(),
        "setup": setup,
        "stderr_to_stdout": True,
        "signal_delay_s": s.signal_lead_s,
        "additional_parameters": {"requeue": True},
        # After the ranks: a crashed step is requeued (up to slurm.max_restarts) to resume.
        "teardown": ["launcher_rc=$?", " ".join(shlex.quote(part) for part in [
            sys.executable, "-m", "launcher.executors.requeue", str(run.root.resolve())]) + ' "$launcher_rc"',
            'exit "$launcher_rc"'],
        # One failed rank ends the step at once; the others would wait in a collective for 30 min.
        "srun_args": ["--kill-on-bad-exit=1"],
        **{key: value for key, value in optional.items() if value is not None},
    }


def make_executor(recipe: Recipe, run: RunDir):
    import submitit

    executor = submitit.SlurmExecutor(folder=str((run.logs / "slurm").resolve()))
    executor.update_parameters(**slurm_parameters(recipe, run))
    return executor


def sbatch_text(recipe: Recipe, run: RunDir) -> str:
    """The script submitit submits for this recipe (the same renderer submitit uses)."""
    executor = make_executor(recipe, run)
    return executor._make_submission_file_text(executor._submitit_command_str, "%j")


class SlurmTask:
    """What every SLURM task runs: the torch.distributed env from SLURM, then the worker."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> int:
        import signal

        import submitit

        from launcher.checkpoints import stop_flag

        # submitit's handlers expect its own checkpoint-and-requeue. Ours: USR2 only sets the stop
        # flag (from now on: a signal during start-up is not lost), and SIGTERM (srun
        # --kill-on-bad-exit, scancel) ends a rank at once, as it should.
        stop_flag()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Every rank sees all of its node's GPUs and picks LOCAL_RANK's, as torchrun does.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from launcher.worker import main

        code = main([self.run_dir])
        # A stop signal after the last step has nothing left to save. Python resets its own handlers
        # to the default (terminate) while shutting down, so ignore it: a late signal must not turn
        # a finished rank into a "crash" that requeues the job.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if code != 0:
            # Exit (no second traceback): the rank's log already ends with the real error, and
            # srun --kill-on-bad-exit stops the other ranks.
            raise SystemExit(code)
        return code


def submit(recipe: Recipe, run: RunDir) -> str:
    executor = make_executor(recipe, run)
    job = executor.submit(SlurmTask(str(run.root.resolve())))
    jobs = run.read_manifest().get("jobs", [])
    jobs.append({"executor": "slurm", "id": job.job_id, "submitted": now(),
                 "nodes": recipe.distributed.nodes, "ranks": recipe.world_size()})
    run.update_manifest(jobs=jobs)
    return job.job_id


def job_state(job_id: str) -> str:
    """The job's state from scontrol (squeue as a fallback); UNKNOWN once SLURM forgot the job."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or "UNKNOWN"


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], check=True, capture_output=True, timeout=30)


def train_slurm(recipe: Recipe, run: RunDir, console: Console, detach: bool = False) -> bool:
    """Submit the training job; unless detached, follow it to its end. True on success."""
    write_sbatch(recipe, run)
    job_id = submit(recipe, run)
    console.print(f"submitted SLURM job {job_id} ({recipe.distributed.nodes} nodes x "
                  f"{recipe.distributed.procs_per_node} ranks); sbatch script: {run.root / 'sbatch.sh'}")
    if detach:
        console.print(f"detached; follow it with: launch status {run.root}  /  launch logs {run.root} -f")
        return True
    states = StateWatcher(job_id, console)
    follow_training(run, states.poll, console)
    if states.state != "COMPLETED":
        console.print(f"[red]SLURM job {job_id} ended {states.state}[/red]")
        report_failure(run, console, fallback_log=newest_file(run.logs / "slurm"))
        return False
    return True


class StateWatcher:
    """Polls the job state; prints each change (pending, running, requeued, ...)."""

    def __init__(self, job_id: str, console: Console, every_s: float = 2.0):
        self.job_id, self.console, self.every_s = job_id, console, every_s
        self.state, self.checked = "SUBMITTED", 0.0

    def poll(self) -> str | None:
        if time.time() - self.checked >= self.every_s:
            self.checked = time.time()
            state = job_state(self.job_id).split()[0]
            if state != self.state:
                self.console.print(f"job {self.job_id}: {state.lower()}")
                self.state = state
        return None if self.state in TERMINAL_STATES or self.state == "UNKNOWN" else self.state.lower()


def write_sbatch(recipe: Recipe, run: RunDir) -> Path:
    path = run.root / "sbatch.sh"
    text = sbatch_text(recipe, run)
    if path.exists() and path.read_text() != text:
        raise RecipeError([f"{path}: differs from what this recipe renders now; restore it or use a new --run-dir"])
    if not path.exists():
        write_atomic(path, text)
    return path


def newest_file(folder: Path) -> Path | None:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def require_slurm_for(recipe: Recipe, asked: bool) -> None:
    if slurm_available():
        return
    why = "--executor slurm" if asked else f"distributed.nodes={recipe.distributed.nodes} (several nodes)"
    raise RecipeError([f"{why} needs a SLURM cluster, and sbatch/sinfo do not answer here; run on a cluster's "
                       "login node, or try one on this machine: eval \"$(slurm/dev-cluster up)\""])


def default_partition() -> str | None:
    """The cluster's default partition (marked * by sinfo), or None."""
    if not slurm_available():
        return None
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=15).stdout
    return next((p.rstrip("*") for p in out.split() if p.endswith("*")), None)

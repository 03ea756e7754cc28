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
from launcher.recipe import Recipe, RecipeError, minutes
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


class StageTask:
    """What a chained job's SLURM tasks run: the merge, or eval shard number SLURM_PROCID."""

    def __init__(self, run_dir: str, stage: str):
        self.run_dir, self.stage = run_dir, stage

    def __call__(self) -> None:
        import os

        from launcher.pipeline import run_stage

        run_stage(Path(self.run_dir), self.stage, shard=int(os.environ.get("SLURM_PROCID", "0")))


class ShardTask:
    """`launch eval --executor slurm`: task i evaluates shards[i] of an evaluation already planned."""

    def __init__(self, out: str, shards: list[int]):
        self.out, self.shards = out, shards

    def __call__(self) -> None:
        import os

        from launcher.evaluate import run_shard

        run_shard(Path(self.out), self.shards[int(os.environ.get("SLURM_PROCID", "0"))])


def stage_parameters(recipe: Recipe, run: RunDir, stage: str, tasks: int = 1) -> dict:
    """A smaller job than training's: one node, [merge] or [eval]'s own time, CPUs, memory and GPUs;
    the cluster settings (partition, account, qos, constraint, environment, setup) are training's."""
    common = slurm_parameters(recipe, run)
    section = recipe.merge if stage == "merge" else recipe.eval
    own = {"cpus_per_task": section.cpus_per_task, "mem": section.mem,
           "gpus_per_task": getattr(section, "gpus_per_task", None)}
    return {
        **{key: common[key] for key in ("setup", "stderr_to_stdout", "partition", "account", "qos", "constraint")
           if key in common},
        "job_name": f"{recipe.name}-{stage}", "nodes": 1, "ntasks_per_node": tasks, "time": minutes(section.time),
        # When training fails for good, the chained jobs end at once instead of waiting forever.
        "additional_parameters": {"kill_on_invalid_dep": "yes"},
        **{key: value for key, value in own.items() if value is not None},
    }


def submit_chain(recipe: Recipe, run: RunDir, after: str, stages: list[str]) -> list[dict]:
    """Queue each stage as a job that starts once the previous one succeeded (afterok)."""
    import submitit

    chain = []
    for stage in stages:
        tasks = recipe.eval.shards if stage == "eval" else 1
        executor = submitit.SlurmExecutor(folder=str((run.logs / "slurm").resolve()))
        executor.update_parameters(**stage_parameters(recipe, run, stage, tasks), dependency=f"afterok:{after}")
        job = executor.submit(StageTask(str(run.root.resolve()), stage))
        chain.append({"executor": "slurm", "stage": stage, "id": job.job_id, "after": after, "submitted": now()})
        after = job.job_id
    run.update_manifest(chain=chain)
    return chain


def run_eval_job(out: Path, plan: dict, shards: list[int], console: Console | None = None) -> None:
    """`launch eval --executor slurm`: one job, one task per unfinished shard; follow it to its end."""
    import submitit

    from launcher.recipe import validate_recipe

    recipe = validate_recipe(plan["recipe"], source=str(out / "plan.json"))
    executor = submitit.SlurmExecutor(folder=str((Path(out) / "logs" / "slurm").resolve()))
    parameters = stage_parameters(recipe, RunDir(Path(out)), "eval", len(shards))
    parameters.pop("additional_parameters")
    executor.update_parameters(**parameters)
    job = executor.submit(ShardTask(str(Path(out).resolve()), shards))
    console = console or Console(highlight=False)
    console.print(f"submitted SLURM eval job {job.job_id} ({len(shards)} tasks)", highlight=False)
    if not follow_job(job.job_id, console):
        raise RecipeError([f"SLURM eval job {job.job_id} did not complete; see {Path(out) / 'logs' / 'slurm'}"])


def follow_job(job_id: str, console: Console) -> bool:
    """Print the job's state changes until it ends; True when it COMPLETED."""
    states = StateWatcher(job_id, console)
    while states.poll():
        time.sleep(1)
    return states.state == "COMPLETED"


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
    """Submit the training job and, after it, merge and eval as dependent jobs (afterok); unless
    detached, follow them to their end. True on success."""
    from launcher.pipeline import chained_stages

    write_sbatch(recipe, run)
    stages = chained_stages(recipe)
    run.update_manifest(chained=stages)  # before the ranks start: they leave these stages to the chain
    job_id = submit(recipe, run)
    console.print(f"submitted SLURM job {job_id} ({recipe.distributed.nodes} nodes x "
                  f"{recipe.distributed.procs_per_node} ranks); sbatch script: {run.root / 'sbatch.sh'}")
    chain = submit_chain(recipe, run, job_id, stages)
    for job in chain:
        console.print(f"queued {job['stage']} as SLURM job {job['id']} (after {job['after']} succeeds)", highlight=False)
    if detach:
        console.print(f"detached; follow it with: launch status {run.root}  /  launch logs {run.root} -f")
        return True
    states = StateWatcher(job_id, console)
    follow_training(run, states.poll, console)
    if states.state != "COMPLETED":
        console.print(f"[red]SLURM job {job_id} ended {states.state}[/red]")
        report_failure(run, console, fallback_log=newest_file(run.logs / "slurm"))
        cancel_chain(chain)
        return False
    return follow_chain(run, chain, console)


def follow_chain(run: RunDir, chain: list[dict], console: Console) -> bool:
    for job in chain:
        with console.status(f"{job['stage']}: SLURM job {job['id']}"):
            ok = follow_job(job["id"], console)
        if not ok:
            log = next((run.logs / "slurm").glob(f"{job['id']}_0_log.out"), None)
            console.print(f"[red]{job['stage']} job {job['id']} did not complete[/red]; its log: {log}", highlight=False)
            cancel_chain(chain)
            return False
    return True


def cancel_chain(chain: list[dict]) -> None:
    """Cancel the chained jobs still waiting (a finished one is left as it is)."""
    for job in chain:
        if job_state(job["id"]).split()[0] not in TERMINAL_STATES | {"UNKNOWN"}:
            cancel(job["id"])


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

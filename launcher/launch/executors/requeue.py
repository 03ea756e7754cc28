"""Requeueing a SLURM job from inside it: after a stop signal (the worker saved a checkpoint) or,
from the batch script's teardown, after a crash, up to slurm.max_restarts times.

    python -m launcher.launch.executors.requeue RUN_DIR EXIT_CODE     (the sbatch teardown runs this)
    python -m launcher.launch.executors.requeue MEMBERS_FILE EXIT_CODE (an array: the element's run dir is line
                                                                         $SLURM_ARRAY_TASK_ID of the file)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launcher.rundir import lifecycle
from launcher.rundir.runs import RunDir, State, allocation
from launcher.rundir.sweepdir import member_of_array


def requeue_self() -> bool:
    """Ask SLURM to requeue the job this process runs in; False outside SLURM (re-run to resume)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        print(f"scontrol requeue {job_id} failed: {done.stderr.strip()}", file=sys.stderr)
    return done.returncode == 0


def after_job_step(run: RunDir, exit_code: int) -> str:
    """Decide what a finished job step means: done, requeued after a stop signal (the ranks saved a
    checkpoint) or after a crash, or failed for good."""
    if run.manifest().stopped_in == allocation():
        return "requeued after the stop signal" if requeue_self() else "failed (requeue refused)"
    if exit_code == 0:
        return "ok"
    limit = run.load_recipe().slurm.max_restarts
    logged = run.metrics.count()
    manifest = run.manifest()
    restarts = manifest.crash_restarts
    if manifest.state == State.CANCELLED or restarts >= limit:
        return f"failed (exit code {exit_code}; {restarts} of {limit} crash restarts used)"
    if restarts and manifest.logged_steps_at_last_crash == logged:
        return f"failed (exit code {exit_code}; no training step since the previous crash, so it is not transient)"
    lifecycle.crash_requeued(run, logged)
    return "requeued" if requeue_self() else "failed (requeue refused)"


def run_of(target: Path) -> RunDir:
    """The run dir the teardown is about: the path itself, or this array element's line of a members file."""
    return member_of_array(target, int(os.environ["SLURM_ARRAY_TASK_ID"])) if target.is_file() else RunDir(target)


if __name__ == "__main__":
    outcome = after_job_step(run_of(Path(sys.argv[1])), int(sys.argv[2]))
    print(f"job step: {outcome}")
    sys.exit(0 if outcome == "ok" or outcome.startswith("requeued") else 1)

"""Requeueing a SLURM job from inside it: after a stop signal (the worker saved a checkpoint) or,
from the batch script's teardown, after a crash, up to slurm.max_restarts times.

    python -m launcher.executors.requeue RUN_DIR EXIT_CODE     (the sbatch teardown runs this)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from launcher.runs import RunDir


def requeue_self() -> bool:
    """Ask SLURM to requeue the job this process runs in; False outside SLURM (re-run to resume)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        print(f"scontrol requeue {job_id} failed: {done.stderr.strip()}", file=sys.stderr)
    return done.returncode == 0


def allocation() -> str:
    """This run of the job: its id and how many times SLURM restarted it (a requeue keeps the id)."""
    return f"{os.environ.get('SLURM_JOB_ID')}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def logged_steps(run: RunDir) -> int:
    """Rows in logs/train_metrics.jsonl over all attempts: it grows with every step any attempt makes."""
    return len(run.metrics_log.read_text().splitlines()) if run.metrics_log.exists() else 0


def after_job_step(run: RunDir, exit_code: int) -> str:
    """Decide what a finished job step means: done, requeued after a crash, or failed for good."""
    if exit_code == 0:
        return "ok"
    manifest = run.read_manifest()
    if manifest.get("stopped_in") == allocation():  # the ranks saved and requeued after a stop signal
        return "requeued after the stop signal"
    limit = tomllib.loads(run.recipe.read_text()).get("slurm", {}).get("max_restarts", 0)
    restarts = manifest.get("crash_restarts", 0)
    if manifest.get("state") == "cancelled" or restarts >= limit:
        return f"failed (exit code {exit_code}; {restarts} of {limit} crash restarts used)"
    logged = logged_steps(run)
    if restarts and manifest.get("logged_steps_at_last_crash") == logged:
        return f"failed (exit code {exit_code}; no training step since the previous crash, so it is not transient)"
    run.update_manifest(state="requeued", crash_restarts=restarts + 1, requeues=manifest.get("requeues", 0) + 1,
                        logged_steps_at_last_crash=logged)
    return "requeued" if requeue_self() else "failed (requeue refused)"


if __name__ == "__main__":
    outcome = after_job_step(RunDir(Path(sys.argv[1])), int(sys.argv[2]))
    print(f"job step: {outcome}")
    sys.exit(0 if outcome in ("ok", "requeued") else 1)

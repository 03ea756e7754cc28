"""Executors: where the ranks run. local.py (this machine) and slurm.py (a SLURM cluster) train a
run; the helpers here answer questions about a job recorded in a run's manifest, whichever ran it."""
from __future__ import annotations

import os
import signal


def job_active(job: dict) -> bool:
    if job["executor"] == "slurm":
        from launcher.executors.slurm import TERMINAL_STATES, job_state

        return job_state(str(job["id"])).split()[0] not in TERMINAL_STATES | {"UNKNOWN"}
    try:
        os.killpg(int(job["id"]), 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def job_summary(job: dict) -> str:
    if job["executor"] == "slurm":
        from launcher.executors.slurm import job_state

        state = job_state(str(job["id"])).lower()
        size = f", {job['nodes']} nodes, {job['ranks']} ranks" if "nodes" in job else ""
        return f"SLURM job {job['id']} {state}{size}, submitted {job.get('submitted')}"
    return f"local process group {job['id']} {'running' if job_active(job) else 'ended'}, started {job.get('submitted')}"


def cancel_job(job: dict) -> None:
    if job["executor"] == "slurm":
        from launcher.executors.slurm import cancel

        cancel(str(job["id"]))
    else:
        os.killpg(int(job["id"]), signal.SIGTERM)

"""Local executor: every rank on this machine, started by `accelerate launch` with the run's own configs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess

from rich.console import Console

from launcher.progress import follow_training, report_failure
from launcher.recipe import Recipe
from launcher.render import resolve_device, worker_command
from launcher.runs import RunDir, now


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(recipe: Recipe) -> dict[str, str]:
    """Split the cores between ranks so two ranks do not fight over the same threads."""
    threads = max(1, (os.cpu_count() or 1) // recipe.world_size())
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["DS_ACCELERATOR"] = "cpu" if resolve_device(recipe.distributed.device) == "cpu" else "cuda"
    return env


def train_local(recipe: Recipe, run: RunDir, console: Console) -> bool:
    """Run the training job to its end; True when every rank succeeded."""
    command = worker_command(run)
    command[2:2] = ["--main_process_port", str(free_port())]
    run.logs.mkdir(parents=True, exist_ok=True)
    launcher_log = run.logs / "launcher.log"
    with open(launcher_log, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=worker_env(recipe),
                                   start_new_session=True)
    jobs = run.read_manifest().get("jobs", [])
    run.update_manifest(jobs=jobs + [{"executor": "local", "id": process.pid, "submitted": now(), "ranks": recipe.world_size()}])
    try:
        follow_training(run, lambda: "running" if process.poll() is None else None, console)
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        raise
    if process.returncode != 0:
        console.print(f"[red]training failed[/red] (exit code {process.returncode})", highlight=False)
        report_failure(run, console, fallback_log=launcher_log)
        return False
    return True

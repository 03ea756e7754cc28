"""`launch serve RUN`: the run's server as one job (local or SLURM), followed until it answers; then
where it answers, its models and a request to try, until Ctrl-C (or `launch cancel RUN`) ends it."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import replace

from rich.console import Console

from launcher.config.hardware import resolve_device
from launcher.config.recipe import minutes
from launcher.errors import UserError
from launcher.launch.executors.base import Job
from launcher.launch.executors.factory import make_executor
from launcher.launch.jobs import ServeJob
from launcher.launch.pipeline import stage_resources
from launcher.launch.progress import print_tail
from launcher.rundir.runs import RunDir, ServerRecord
from launcher.serve.server import pick_port, refuse_what_vllm_cannot_serve, request_example

NO_VLLM = (
    "launch serve: vllm is not installed in this environment; build the vLLM environment with requirements/vllm-env "
    "and run .venv-vllm/bin/launch serve (GPU nodes: pip install 'peft-launcher[vllm]' in a venv of its own)"
)


def check_serveable(run: RunDir, port: int | None) -> None:
    if not run.adapter.exists():
        raise UserError(f"{run.root}: no final adapter yet; finish training first (launch {run.recipe} --run-dir {run.root})")
    if importlib.util.find_spec("vllm") is None:
        raise UserError(NO_VLLM)
    if port is not None and not 1024 <= port <= 65535:
        raise UserError(f"--port {port}: not a port a server of yours can listen on; choose one of 1024-65535")


def serve_run(
    run: RunDir, executor_name: str, host: str | None, port: int | None, time_limit: str | None, console: Console
) -> int:
    recipe = run.load_recipe()  # first: a folder that is not a run dir is one line
    check_serveable(run, port)
    executor = make_executor(executor_name, recipe, run.logs / "serve")
    host = host or ("0.0.0.0" if executor.on_other_machines else "127.0.0.1")
    if not executor.on_other_machines:  # refused here, before the job: it would run on this machine
        refuse_what_vllm_cannot_serve(recipe, resolve_device(recipe.distributed.device))
        if port is not None:
            pick_port(host, port)  # another process holds it
    resources = replace(stage_resources(recipe, "eval"), name=f"{recipe.name}-serve", stage="serve", tasks_per_node=1)
    resources = replace(resources, time_minutes=minutes(time_limit)) if time_limit else resources
    run.clear_server()  # a server killed with SIGKILL could not remove its record
    job = executor.submit(ServeJob(str(run.root.resolve()), host, port), resources)
    run.update_manifest(server=job.record)
    console.print(f"submitted {job.kind} job {job.id}: vLLM's server for {run.root}", highlight=False)
    try:
        record = wait_until_serving(run, job, console)
        if record is None:
            return 1
        say_where(record, run, console)
        while job.active():
            time.sleep(1)
        console.print(f"the server's job {job.id} ended {job.state()}", highlight=False)
        return 0
    except KeyboardInterrupt:
        job.cancel()
        run.clear_server()
        console.print(f"stopped the server (job {job.id})", highlight=False)
        return 0


def wait_until_serving(run: RunDir, job: Job, console: Console) -> ServerRecord | None:
    with console.status(f"serve: {job.kind} job {job.id}, starting the server"):
        while (record := run.server()) is None:
            if not job.active():
                console.print(f"[red]serve failed[/red]: {job.kind} job {job.id} ended {job.state()}", highlight=False)
                if job.log(0).exists():
                    print_tail(job.log(0), job.log(0).read_text(errors="replace").splitlines()[-25:], console)
                return None
            time.sleep(1)
    return record


def say_where(record: ServerRecord, run: RunDir, console: Console) -> None:
    model = "adapter" if "adapter" in record.models else record.models[0]
    console.print(
        f"serving on http://{record.host}:{record.port}/v1 (OpenAI-compatible): models {', '.join(record.models)}",
        highlight=False,
    )
    console.print(f"  try: {request_example(record, model, example_prompt(run))}", highlight=False)
    console.print(f"  Ctrl-C here, or launch cancel {run.root}, ends it", highlight=False)


def example_prompt(run: RunDir) -> str:
    """The first prompt of the run's evaluation, for the example request ("Hello" without one)."""
    rows = run.evaluation.example_rows() if run.evaluation.examples.is_file() else []
    return next((row["prompt"] for row in rows if row.get("prompt")), "Hello")

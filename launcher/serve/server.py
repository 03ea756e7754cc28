"""`launch serve RUN`: vLLM's OpenAI-compatible server on the run's base model, with its final
adapter and every complete checkpoint as LoRA modules (named "adapter" and "checkpoint-N"; the base
is "base"), in one job of either executor. It runs in the job's task: the server is a child of the
task, in a process group of its own, ended with the task whatever ends it (Ctrl-C, launch cancel,
the time limit, the launching process gone). Once it answers, the task writes RUN/server.json
(node, port, models), which is how `launch serve` learns where it runs, and removes it as it ends.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress

from launcher.config.recipe import Recipe
from launcher.errors import UserError
from launcher.evaluate.vllm import adapter_refusal, engine_refusal, free_memory, kv_cache_size, max_lora_rank
from launcher.models.loading import torch_dtype
from launcher.models.remote_code import config_json
from launcher.rundir.checkpoints import checkpoints_in, is_complete
from launcher.rundir.runs import RunDir, ServerRecord, now

READY_TIMEOUT_S = 600
END_GRACE_S = 5  # within the local executor's 10 s between SIGTERM and SIGKILL of the task
DEFAULT_PORT = 8000
PORT_TRIES = 3
SEQUENCES = 64
"""Requests the server's KV cache holds at once, each at the full context."""


def lora_modules(run: RunDir) -> tuple[dict[str, str], list[str]]:
    """{name: folder} of the adapters vLLM serves (the final one, then the complete checkpoints),
    and a line for each it cannot."""
    candidates = [("adapter", run.adapter)] if run.adapter.exists() else []
    candidates += [(c.name, c) for c in checkpoints_in(run.checkpoints) if is_complete(c)]
    served, refused = {}, []
    for name, folder in candidates:
        why = adapter_refusal(str(folder))
        if why:
            refused.append(f"{name}: not served: {why}")
        else:
            served[name] = str(folder.resolve())
    return served, refused


def context_length(recipe: Recipe) -> int:
    return recipe.data.max_length + recipe.eval.max_new_tokens


def server_command(recipe: Recipe, modules: dict[str, str], host: str, port: int, device: str) -> list[str]:
    """The server's command line (a list: no shell ever sees a recipe's value)."""
    import torch

    m, dtype = recipe.model, torch_dtype(recipe)
    cache = kv_cache_size(
        config_json(m.name_or_path, m.revision),
        torch.tensor([], dtype=dtype).element_size(),
        context_length(recipe),
        SEQUENCES,
        free_memory(device),
    )
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", m.name_or_path]
    command += ["--served-model-name", "base", "--host", host, "--port", str(port), "--dtype", str(dtype).removeprefix("torch.")]
    command += ["--seed", str(recipe.eval.seed), "--max-model-len", str(context_length(recipe))]
    command += ["--revision", m.revision] if m.revision else []
    command += ["--trust-remote-code"] if m.trust_remote_code else []
    command += ["--kv-cache-memory-bytes", str(cache.bytes)] if cache.bytes else []
    if modules:
        command += ["--enable-lora", "--max-lora-rank", str(max_lora_rank(list(modules.values()))), "--max-loras", "1"]
        command += ["--lora-modules", *[f"{name}={folder}" for name, folder in modules.items()]]
    return command


def serves_this_run(port: int, base: str, modules: dict[str, str]) -> bool:
    """The server on `port` answers and is ours: it serves this run's base model and adapter folders
    (another server that took the port would answer /health too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as reply:
            served = {card.get("id"): card.get("root") for card in json.load(reply).get("data", [])}
    except (OSError, ValueError):
        return False
    return served.get("base") == base and all(served.get(name) == folder for name, folder in modules.items())


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind `port` on `host` now (as vLLM binds: SO_REUSEADDR, so a closed
    connection's TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, asked: int | None) -> int:
    """The port asked for (refused in one line when another process holds it), else DEFAULT_PORT when
    free, else one the OS finds free."""
    if asked is not None:
        if not port_free(host, asked):
            raise UserError(
                f"--port {asked}: another process listens on it on {socket.gethostname()}; choose another port, or "
                f"leave --port out and launch serve picks a free one"
            )
        return asked
    if port_free(host, DEFAULT_PORT):
        return DEFAULT_PORT
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def end(server: subprocess.Popen) -> None:
    """The server's whole process group (vLLM's engine core is a child of its own): SIGTERM, then
    SIGKILL after END_GRACE_S."""
    for number in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(server.pid, number)
        with suppress(subprocess.TimeoutExpired):
            server.wait(END_GRACE_S)
            return


def refuse_what_vllm_cannot_serve(recipe: Recipe, device: str) -> None:
    """One line when vLLM cannot serve the run's model on `device` (an architecture, a CPU head size, a
    KV cache that does not fit)."""
    refusal = engine_refusal(recipe, device, [[0] * recipe.data.max_length])
    if refusal:
        raise UserError(f"launch serve: {refusal}; it cannot serve this run (launch eval answers with HF)")


def serve(run: RunDir, host: str, port: int | None, device: str) -> int:
    """Run the server until a signal ends this task (or the server ends on its own). `port` None: the
    first free of DEFAULT_PORT and ports the OS picks; a port another process takes while vLLM starts
    (between the choice and vLLM's bind) is given up for another, PORT_TRIES times in all."""
    recipe = run.load_recipe()
    refuse_what_vllm_cannot_serve(recipe, device)
    modules, refused = lora_modules(run)
    for line in refused:
        print(line, flush=True)
    running: list[subprocess.Popen] = []
    ending = []

    def stop(number, frame) -> None:
        ending.append(number)
        run.clear_server()  # first: the task may be killed before the server has ended
        for server in running:
            end(server)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):  # SIGUSR2: a job's stop signal
        signal.signal(number, stop)
    try:
        for tries_left in reversed(range(PORT_TRIES)):
            chosen = pick_port(host, port)
            running[:] = [subprocess.Popen(server_command(recipe, modules, host, chosen, device), start_new_session=True)]
            if until_serving(running[0], chosen, recipe.model.name_or_path, modules):
                record = ServerRecord(host=where(host), port=chosen, pid=os.getpid(), models=["base", *modules], since=now())
                run.write_server(record)
                print(f"serving on {record.host}:{chosen}: models {', '.join(record.models)}", flush=True)
                break
            if ending or port is not None or port_free(host, chosen) or not tries_left:
                break  # it ended for another reason than a port taken meanwhile: its log says why
            print(f"port {chosen} was taken by another process while vLLM started; trying another", flush=True)
        code = running[0].wait()
    finally:
        for server in running:
            end(server)
        run.clear_server()
    return 0 if ending else code


def until_serving(server: subprocess.Popen, port: int, base: str, modules: dict[str, str]) -> bool:
    """True once the server answers as this run's; False when it ended first."""
    deadline = time.time() + READY_TIMEOUT_S
    while server.poll() is None:
        if serves_this_run(port, base, modules):
            return True
        if time.time() > deadline:
            raise RuntimeError(f"vLLM's server did not answer on port {port} within {READY_TIMEOUT_S} s")
        time.sleep(1)
    return False


def where(host: str) -> str:
    """Where a client reaches a server listening on `host`."""
    return socket.gethostname() if host in ("0.0.0.0", "::") else host


def request_example(record: ServerRecord, model: str, prompt: str) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0})
    return f"curl http://{record.host}:{record.port}/v1/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}"

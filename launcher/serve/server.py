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


def answers_health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def end(server: subprocess.Popen) -> None:
    """The server's whole process group (vLLM's engine core is a child of its own): SIGTERM, then
    SIGKILL after END_GRACE_S."""
    for number in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(server.pid, number)
        with suppress(subprocess.TimeoutExpired):
            server.wait(END_GRACE_S)
            return


def serve(run: RunDir, host: str, port: int, device: str) -> int:
    """Run the server until a signal ends this task (or the server ends on its own)."""
    recipe = run.load_recipe()
    refusal = engine_refusal(recipe, device, [[0] * recipe.data.max_length])
    if refusal:
        raise UserError(f"launch serve: {refusal}; it cannot serve this run (launch eval answers with HF)")
    modules, refused = lora_modules(run)
    for line in refused:
        print(line, flush=True)
    server = subprocess.Popen(server_command(recipe, modules, host, port, device), start_new_session=True)
    ending = []

    def stop(number, frame) -> None:
        ending.append(number)
        run.clear_server()  # first: the task may be killed before the server has ended
        end(server)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):  # SIGUSR2: a job's stop signal
        signal.signal(number, stop)
    try:
        deadline = time.time() + READY_TIMEOUT_S
        while server.poll() is None and not answers_health(port) and time.time() < deadline:
            time.sleep(1)
        if server.poll() is None and not answers_health(port):
            raise RuntimeError(f"vLLM's server did not answer on port {port} within {READY_TIMEOUT_S} s")
        if server.poll() is None:
            shown = socket.gethostname() if host in ("0.0.0.0", "::") else host  # where a client reaches it
            record = ServerRecord(host=shown, port=port, pid=os.getpid(), models=["base", *modules], since=now())
            run.write_server(record)
            print(f"serving on {record.host}:{port}: models {', '.join(record.models)}", flush=True)
        code = server.wait()
    finally:
        end(server)
        run.clear_server()
    return 0 if ending else code


def request_example(record: ServerRecord, model: str, prompt: str) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0})
    return f"curl http://{record.host}:{record.port}/v1/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}"

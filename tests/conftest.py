"""Fixtures build their own tiny real model, tokenizer and data: nothing comes from a hub."""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import submitit  # noqa: F401  (see below)

# submitit configures logging when it is first imported (logging.config.dictConfig, which closes
# every handler that exists then). Imported here, before any test, it cannot close a handler that
# a library imported by an earlier test in the same worker bound to pytest's capture (jieba's).

REPO = Path(__file__).resolve().parent.parent
# The packing probe's verdicts (launcher.train.packing) go to a cache of this test process and its
# children, not the user's ~/.cache: every suite probes its own stack afresh.
os.environ.setdefault("LAUNCHER_CACHE_DIR", tempfile.mkdtemp(prefix="launcher-test-cache-"))


def as_from_a_terminal() -> None:
    """preexec_fn of every `launch` a test starts: SIGINT and SIGHUP at their default disposition,
    as a shell in a terminal starts a command. The suite itself may run under nohup, in the
    background or in a CI runner, where they arrive ignored, and a child keeps an inherited ignore
    (rightly: the launcher honours it), so a test that sends them would test how pytest was started."""
    for number in (signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    from launcher.assets import build_quickstart_assets

    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def write_recipe(folder: Path, text: str, name: str = "recipe.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tiny_recipe_text(assets: dict[str, Path], name: str = "tiny", extra: str = "") -> str:
    return f"""
name = "{name}"
[model]
name_or_path = "{assets["model"]}"
dtype = "fp32"
[data]
train_file = "{assets["train_file"]}"
eval_fraction = 0.1
max_length = 64
[train]
learning_rate = 3e-3
max_steps = 12
micro_batch_size = 8
save_steps = 5
warmup_steps = 2
report_to = "none"  # the trackers' own tests (test_tracking.py) and the quickstart's use them
[distributed]
procs_per_node = 2
deepspeed = "zero2"
[eval]
max_examples = 24
max_new_tokens = 3
{extra}
"""


def run_launch(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process, as a user runs it."""
    env = os.environ | {"COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=as_from_a_terminal,
    )


def start_launch(*args, python=sys.executable, **popen) -> subprocess.Popen:
    """The console entry point started in the background by `python` (stdout and stderr merged, as
    text); `popen`: more of Popen's arguments."""
    return subprocess.Popen(
        [str(python), "-m", "launcher.cli", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_from_a_terminal,
        **popen,
    )


# ---------------------------------------------------------------- shared by the test modules


def dpo_recipe_text(assets: dict[str, Path]) -> str:
    """The tests' tiny recipe as a DPO run on the parity pairs (the right answer chosen)."""
    text = tiny_recipe_text(assets).replace(
        f'train_file = "{assets["train_file"]}"', f'train_file = "{assets["preferences"]}"\nformat = "preference"'
    )
    return text.replace("[train]\n", '[train]\nobjective = "dpo"\n')


SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256)
"""A tiny model of any architecture: these sizes, plus its config class's own extras."""
GOLDEN = REPO / "tests" / "golden"


def train_tiny(assets: dict[str, Path], folder: Path, *sets: str, extra: str = "", run_dir: Path | None = None, flags=()):
    """The tests' tiny recipe trained end to end by `launch` with these --set overrides (the module
    fixtures that share one trained run each call this); returns (recipe file, run dir, result, the
    command's arguments)."""
    from launcher.rundir.runs import RunDir

    recipe = write_recipe(folder, tiny_recipe_text(assets, extra=extra))
    run = RunDir(run_dir or folder / "run")
    args = [recipe, "--run-dir", run.root, *flags, *[x for s in sets for x in ("--set", s)]]
    result = run_launch(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return recipe, run, result, args


def wait_for_rows(run, count: int, timeout_s: float = 240) -> None:
    """Until the run's metrics log holds `count` complete step rows."""
    deadline = time.time() + timeout_s
    while len(run.metrics.written()) < count:
        assert time.time() < deadline, f"{run.metrics_log}: fewer than {count} rows after {timeout_s} s"
        time.sleep(0.1)


def batches(run, rank: int, attempt: int | None = None) -> list[list[int]]:
    """The sample ids of each micro-batch a rank trained on (of one attempt, or all)."""
    lines = (run.logs / f"samples_rank{rank}.jsonl").read_text().splitlines()
    return [r["ids"] for r in map(json.loads, lines) if attempt is None or r["attempt"] == attempt]


def rank_pid(run, rank: int) -> int:
    return int(re.findall(r"pid (\d+)", run.rank_log(rank).read_text())[-1])


def launch_then_kill_a_rank(args: list, run, after_rows: int) -> None:
    """`launch args` in a fresh process; rank 1 SIGKILLed once `after_rows` steps are logged: it fails."""
    first = start_launch(*args)
    wait_for_rows(run, after_rows)
    os.kill(rank_pid(run, 1), signal.SIGKILL)
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 1, output


def assert_matches_golden(text: str, golden: Path) -> None:
    """The rendered text equals the recorded file. UPDATE_GOLDEN=1 records the new text and still
    fails, so a changed rendering is always a diff someone reads before it passes."""
    expected = golden.read_text() if golden.exists() else ""
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(golden), "rendered"))
    if diff and os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
        raise AssertionError(f"{golden} recorded anew (UPDATE_GOLDEN); review this diff, then run again without it:\n{diff}")
    assert not diff, f"rendered file differs from {golden} (UPDATE_GOLDEN=1 records the new one):\n{diff}"


# The vLLM environment (requirements/vllm-env): vLLM pins its own torch and transformers, so the
# tests run the launcher from there, in a fresh process, as a user does.
VLLM_ENV = Path(os.environ.get("VLLM_ENV", REPO / ".venv-vllm"))
VLLM_PYTHON = VLLM_ENV / "bin" / "python"
needs_vllm_env = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason=f"no vLLM environment at {VLLM_ENV}: build it with requirements/vllm-env"
)


def in_vllm_env(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    """A command of the launcher run by the vLLM environment's Python (this checkout's code)."""
    env = os.environ | {"COLUMNS": "120", "PYTHONPATH": str(REPO)}
    return subprocess.run([str(VLLM_PYTHON), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def start_in_vllm_env(*args) -> subprocess.Popen:
    """`launch` started in the background by the vLLM environment's Python (this checkout's code)."""
    return start_launch(*args, python=VLLM_PYTHON, env=os.environ | {"COLUMNS": "200", "PYTHONPATH": str(REPO)})


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def models_server(cards: list[dict], port: int = 0):
    """A real HTTP server (in a thread) answering /v1/models with `cards`, as vLLM's server would."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            body = json.dumps({"object": "list", "data": cards}).encode() if self.path == "/v1/models" else b"{}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def lines_until(process: subprocess.Popen, start: str) -> list[str]:
    """The process's output lines up to the first that starts with `start` (or to its end)."""
    said = []
    for line in process.stdout:
        said.append(line)
        if line.startswith(start):
            break
    return said


@pytest.fixture(scope="session")
def vllm_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny model and data for vLLM: head size 64 (hidden 128, 2 heads), since vLLM's CPU
    attention has no kernel for the usual tiny model's 16."""
    from launcher.assets import build_tiny_llama, corpus_of, parity_rows, write_jsonl

    folder = tmp_path_factory.mktemp("vllm-assets")
    rows = parity_rows(1200, seed=0)
    train = write_jsonl(rows, folder / "parity" / "train.jsonl")
    return {"model": build_tiny_llama(folder / "tiny-llama-64", corpus_of(rows), hidden=128, heads=2), "train_file": train}

"""Fixtures build their own tiny real model, tokenizer and data: nothing comes from a hub."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
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


def start_launch(*args) -> subprocess.Popen:
    """The console entry point started in the background (stdout and stderr merged, as text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_from_a_terminal,
    )

"""Kill one rank with SIGKILL mid-training, relaunch: the run resumes from the newest complete
checkpoint and its per-step losses and sample order equal an uninterrupted run's (CPU fp32)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import (
    batches,
    launch_then_kill_a_rank,
    run_launch,
    tiny_recipe_text,
    write_recipe,
)

from launcher.rundir.checkpoints import is_complete
from launcher.rundir.runs import RunDir

pytestmark = pytest.mark.e2e  # real processes end to end: the full tier

STEPS = 24


def last_row_per_step(run: RunDir) -> dict[int, dict]:
    rows = run.metrics.rows()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one row per step, whatever was redone
    return {row["step"]: row for row in rows}


def launch_args(recipe, run_dir, stage: str) -> list:
    return [
        recipe,
        "--run-dir",
        run_dir,
        "--executor",
        "local",
        "--set",
        f"distributed.deepspeed={stage}",
        "--set",
        f"train.max_steps={STEPS}",
        "--set",
        "train.save_steps=4",
        "--set",
        "merge.enabled=false",
        "--set",
        "eval.enabled=false",
    ]


# ZeRO-3 here; ZeRO-2 (and ZeRO-3 again) with the seed models' own code in test_seed_recipes.py
@pytest.mark.parametrize("stage", ["zero3"])
def test_sigkill_of_one_rank_then_relaunch_equals_an_uninterrupted_run(tmp_path, tiny_assets, stage):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    straight = RunDir(tmp_path / "straight")
    assert run_launch(*launch_args(recipe, straight.root, stage)).returncode == 0

    run = RunDir(tmp_path / "interrupted")
    launch_then_kill_a_rank(launch_args(recipe, run.root, stage), run, 14)
    assert json.loads(run.manifest_path.read_text())["state"] == "failed"

    again = run_launch(*launch_args(recipe, run.root, stage))
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = int(re.search(r"resuming from \S+ \(step (\d+)\)", run.rank_log(0).read_text()).group(1))
    assert resumed >= 12 and resumed % 4 == 0

    want, got = last_row_per_step(straight), last_row_per_step(run)
    assert len(run.metrics.written()) > STEPS  # the steps after the checkpoint were written twice
    assert max(abs(want[s]["loss"] - got[s]["loss"]) for s in want) == 0.0
    assert {got[s]["attempt"] for s in got if s > resumed} == {2}
    for rank in (0, 1):
        assert batches(run, rank, attempt=2) == batches(straight, rank)[resumed:]
    assert is_complete(run.checkpoints / f"checkpoint-{STEPS}") and (run.adapter / "adapter_model.safetensors").exists()

"""An evaluation killed at any moment finishes on the next run with the metrics of a clean one,
and --overwrite never deletes: it replaces only the launcher's own folders, moving the old aside.
The kill points are fabricated from a clean evaluation's files (fast: the tiny base model only)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import tiny_recipe_text, write_recipe

from launcher.config.recipe import load_recipe
from launcher.errors import UserError
from launcher.evaluate.plan import plan_evaluation, unfinished
from launcher.evaluate.results import finish_if_complete
from launcher.evaluate.shards import run_shard
from launcher.rundir.evaldir import EvalDir, System
from launcher.rundir.runs import this_process

SHARDS = 2


def shard_file(out, system, shard, shards):
    return EvalDir(out).shard_file(system, shard, shards)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_assets):
    folder = tmp_path_factory.mktemp("eval-resume")
    return load_recipe(write_recipe(folder, tiny_recipe_text(tiny_assets, extra=f"shards = {SHARDS}")))


def evaluate(recipe, out):
    """What a (re-)run does: find or write the plan, run the unfinished shards, write the results."""
    plan = plan_evaluation(recipe, [System(name="base")], out)
    for shard in sorted({k for k, _ in unfinished(out, plan)}):
        run_shard(out, shard, device="cpu")
    return finish_if_complete(out)


def scores(result) -> dict:
    return result.model_dump(include={"examples", "systems", "shards"})  # not the timings


@pytest.fixture(scope="module")
def clean(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "eval"
    return out, evaluate(recipe, out)


def killed_before_the_plan(clean_out, out):
    out.mkdir()
    shutil.copy(clean_out / ".launcher-output", out)
    shutil.copy(EvalDir(clean_out).examples, out)  # plan.json (written last) is missing


def killed_mid_shard(clean_out, out):
    shutil.copytree(clean_out, out)
    for name in ("metrics.json", "predictions.jsonl", "report.md", "report.html"):
        (out / name).unlink(missing_ok=True)
    EvalDir.marker_of(shard_file(out, "base", 1, SHARDS)).unlink()  # its rows may be half-written: redone
    shard_file(out, "base", 1, SHARDS).write_text('{"index": 1, "loss_sum": ')


def killed_after_all_shards(clean_out, out):
    """Every shard's .done, no results, and the finishing lock of the killed process left behind."""
    killed_mid_shard(clean_out, out)
    shutil.copy(
        EvalDir.marker_of(shard_file(clean_out, "base", 1, SHARDS)), EvalDir.marker_of(shard_file(out, "base", 1, SHARDS))
    )
    shutil.copy(shard_file(clean_out, "base", 1, SHARDS), shard_file(out, "base", 1, SHARDS))
    child = subprocess.Popen(["true"])
    child.wait()
    (out / ".finish.lock").write_text(json.dumps(this_process() | {"pid": child.pid, "start": "0"}))


def killed_mid_report(clean_out, out):
    killed_after_all_shards(clean_out, out)
    shutil.copy(clean_out / "predictions.jsonl", out)
    (out / "report.md").write_text((clean_out / "report.md").read_text()[:100])


KILL_POINTS = [killed_before_the_plan, killed_mid_shard, killed_after_all_shards, killed_mid_report]


@pytest.mark.parametrize("kill", KILL_POINTS, ids=lambda f: f.__name__)
def test_an_evaluation_killed_at_any_point_finishes_with_the_clean_metrics(recipe, clean, tmp_path, kill):
    clean_out, clean_result = clean
    out = tmp_path / "eval"
    kill(clean_out, out)
    assert not (out / "metrics.json").exists()
    result = evaluate(recipe, out)
    assert scores(result) == scores(clean_result)
    assert (out / "predictions.jsonl").read_text() == (clean_out / "predictions.jsonl").read_text()
    assert (out / "report.md").read_text().splitlines()[0] == (clean_out / "report.md").read_text().splitlines()[0]


def test_overwrite_moves_the_launchers_folder_aside_and_never_touches_a_users(recipe, clean, tmp_path):
    clean_out, _ = clean
    out = tmp_path / "eval"
    shutil.copytree(clean_out, out)
    other = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"max_new_tokens": 2})})
    with pytest.raises(UserError, match="holds another evaluation"):
        plan_evaluation(other, [System(name="base")], out)
    plan_evaluation(other, [System(name="base")], out, overwrite=True)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("eval.replaced-")]
    assert len(kept) == 1 and (kept[0] / "metrics.json").exists() and EvalDir(out).plan().decoding["max_new_tokens"] == 2

    users = tmp_path / "mine"
    (users / "sub").mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    (users / "sub" / "data.bin").write_bytes(b"\0")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="never replaced"):
            plan_evaluation(recipe, [System(name="base")], users, overwrite=overwrite)
    assert (users / "notes.txt").read_text() == "mine" and (users / "sub" / "data.bin").exists()
    assert sorted(p.name for p in users.rglob("*")) == ["data.bin", "notes.txt", "sub"]
    assert not any(p.name.startswith("mine.") for p in tmp_path.iterdir())

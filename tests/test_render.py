"""Rendered files: golden copies, accepted by DeepSpeed and accelerate themselves, and never overwritten."""

from __future__ import annotations

import json

import pytest
from conftest import GOLDEN, REPO, assert_matches_golden, run_launch, tiny_recipe_text, write_recipe

from launcher.config.recipe import load_recipe
from launcher.errors import UserError
from launcher.launch.render import DS_CONFIG_DIR, render_run
from launcher.rundir.runs import RunDir, claim_run_dir

FIXED = [
    "distributed.deepspeed=zero3",
    "distributed.device=cpu",
    "train.gradient_accumulation_steps=2",
    "train.max_grad_norm=0.5",
    "distributed.deepspeed_overrides={zero_optimization={overlap_comm=true}}",
]


def rendered(tmp_path, tiny_assets, overrides) -> RunDir:
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)), overrides)
    run = RunDir(tmp_path / "run")
    claim_run_dir(run, recipe)
    render_run(recipe, run)
    return run


def test_rendered_files_match_golden(tmp_path, tiny_assets):
    run = rendered(tmp_path, tiny_assets, FIXED)
    for path, golden in ((run.accelerate_config, "accelerate.yaml"), (run.deepspeed_config, "deepspeed-zero3.json")):
        assert_matches_golden(path.read_text().replace(str(run.root.resolve()), "{RUN_DIR}"), GOLDEN / golden)


TEMPLATE_STAGES = {"zero2": 2, "zero3": 3, "zero3-offload": 3}


@pytest.mark.parametrize("template", sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
def test_deepspeed_accepts_every_rendered_template(tmp_path, tiny_assets, template):
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig checks batch sizes against the world it sees: one process here.
    run = rendered(tmp_path, tiny_assets, [f"distributed.deepspeed={template}", "distributed.procs_per_node=1"])
    config = DeepSpeedConfig(json.loads(run.deepspeed_config.read_text()))
    assert config.train_batch_size == 8 and config.zero_optimization_stage == TEMPLATE_STAGES[template]


def test_accelerate_accepts_the_rendered_config(tmp_path, tiny_assets):
    from accelerate.commands.config.config_args import load_config_from_file

    run = rendered(tmp_path, tiny_assets, FIXED)
    config = load_config_from_file(str(run.accelerate_config))
    assert config.num_processes == 2 and config.distributed_type.value == "DEEPSPEED"
    assert config.deepspeed_config["deepspeed_config_file"] == str(run.deepspeed_config.resolve())
    assert config.mixed_precision is None  # accelerate refuses it next to a DeepSpeed file


def test_override_that_disagrees_with_the_recipe_is_refused(tmp_path, tiny_assets):
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu: 3 disagrees with the recipe's 8"):
        rendered(tmp_path, tiny_assets, ["distributed.deepspeed_overrides={train_micro_batch_size_per_gpu=3}"])


def test_dry_run_writes_everything_without_importing_torch(tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    probe = (
        "import sys, runpy; sys.argv = ['launch', {!r}, '--dry-run', '--run-dir', {!r}]\n"
        "try:\n    runpy.run_module('launcher.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')\n"
    ).format(str(recipe), str(tmp_path / "run"))
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("NO_TORCH")
    for name in ("recipe.toml", "accelerate.yaml", "deepspeed.json", "manifest.json"):
        assert str(tmp_path / "run" / name) in result.stdout
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["state"] == "rendered" and len(manifest["recipe_hash"]) == 16
    assert manifest["versions"]["torch"] and manifest["versions"]["deepspeed"]


def test_existing_run_dir_is_never_overwritten(tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    run_dir = tmp_path / "run"
    assert run_launch(recipe, "--dry-run", "--run-dir", run_dir).returncode == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    again = run_launch(recipe, "--dry-run", "--run-dir", run_dir)
    assert again.returncode == 0 and "continuing it" in again.stdout
    changed = run_launch(recipe, "--dry-run", "--run-dir", run_dir, "--set", "train.learning_rate=1e-3", "--set", "peft.r=4")
    assert changed.returncode == 2
    assert changed.stderr.splitlines() == [
        f"error: peft.r: 8 -> 4 cannot change when resuming {run_dir} (the checkpoint's adapter shapes and target "
        "modules come from it); restore it, or start a new run with --run-dir",
        f"error: train.learning_rate: 0.003 -> 0.001 cannot change when resuming {run_dir} (the optimizer, schedule "
        "or data order in the checkpoint were made with the old value); restore it, or start a new run with --run-dir",
    ]
    never = run_launch(recipe, "--dry-run", "--run-dir", run_dir, "--resume", "never")
    assert never.returncode == 2 and "--resume never" in never.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = run_launch(recipe, "--dry-run", "--run-dir", foreign)
    assert refused.returncode == 2 and "is not a run dir of this launcher" in refused.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1


def test_every_recipe_in_recipes_renders(tmp_path):
    for recipe in sorted((REPO / "recipes").glob("*.toml")):
        result = run_launch(recipe, "--dry-run", "--run-dir", tmp_path / recipe.stem)
        assert result.returncode == 0, f"{recipe}: {result.stderr}"
        assert (tmp_path / recipe.stem / "deepspeed.json").exists()


def test_a_resume_accepts_safe_changes_and_keeps_the_old_recipe(tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    run_dir = tmp_path / "run"
    assert run_launch(recipe, "--dry-run", "--run-dir", run_dir).returncode == 0
    old_recipe = (run_dir / "recipe.toml").read_text()
    longer = run_launch(recipe, "--dry-run", "--run-dir", run_dir, "--set", "train.max_steps=40", "--set", "eval.max_examples=5")
    assert longer.returncode == 0, longer.stderr
    assert "recipe changed since the last launch: train.max_steps: 12 -> 40 (the new value wins)" in longer.stdout
    assert "eval.max_examples: 24 -> 5 (the new value wins)" in longer.stdout
    [kept] = (run_dir / "history").iterdir()
    assert kept.read_text() == old_recipe and "max_steps = 40" in (run_dir / "recipe.toml").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["recipe_changes"]) == 2

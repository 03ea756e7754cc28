"""Sweeps: a recipe's variants expanded, checked (one bad value stops them all, named), rendered into
their own run dirs, run, compared; the SLURM array with a cancelled element is in test_slurm.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_launch, tiny_recipe_text, write_recipe
from test_bad_input import one_line

from launcher.cli import main
from launcher.config.sweep import expand, parse_sweep
from launcher.rundir.runs import RunDir
from launcher.rundir.sweepdir import SweepDir

FAST = "[merge]\nenabled = false\n"  # the variants train, evaluate and are compared; merging is tested elsewhere


def sweep_recipe(folder, assets, sweep: str = "", name: str = "tiny", steps: int = 6):
    text = tiny_recipe_text(assets, name=name, extra=FAST + sweep)
    text = text.replace("max_steps = 12", f"max_steps = {steps}").replace("procs_per_node = 2", "procs_per_node = 1")
    return write_recipe(folder, text, f"{name}.toml")


def test_a_grid_a_list_and_a_random_search_expand_to_named_variants():
    grid = expand(parse_sweep({"grid": {"train": {"learning_rate": [1e-4, 3e-4]}, "peft.r": [8, 16]}}))
    assert [v.name for v in grid] == ["lr=1e-4,r=8", "lr=1e-4,r=16", "lr=3e-4,r=8", "lr=3e-4,r=16"]
    assert grid[3].overrides == {"train.learning_rate": 3e-4, "peft.r": 16}

    crossed = expand(
        parse_sweep(
            {"variants": [{"name": "ia3", "peft.method": "ia3"}, {"peft.method": "lora"}], "grid": {"train.seed": [1, 2]}}
        )
    )
    assert [v.name for v in crossed] == ["ia3,seed=1", "ia3,seed=2", "method=lora,seed=1", "method=lora,seed=2"]

    space = {"train.learning_rate": {"log-uniform": [1e-5, 1e-2]}, "peft.r": {"choice": [4, 8, 16]}}
    drawn = expand(parse_sweep({"random": {"count": 200, "seed": 7, "space": space}}))
    again = expand(parse_sweep({"random": {"count": 200, "seed": 7, "space": space}}))
    other = expand(parse_sweep({"random": {"count": 200, "seed": 8, "space": space}}))
    assert drawn == again and drawn != other  # the seed, and only the seed, decides the draws
    rates = [v.overrides["train.learning_rate"] for v in drawn]
    assert all(1e-5 <= r <= 1e-2 for r in rates) and {v.overrides["peft.r"] for v in drawn} == {4, 8, 16}
    below = sum(r < 1e-4 for r in rates) / len(rates)  # log-uniform: a third of the decades below 1e-4
    assert 0.2 < below < 0.47, below
    assert all(float(f"{r:.3g}") == r for r in rates)  # rounded, so a name says the exact value
    assert len({v.name for v in drawn}) == 200  # a repeated draw gets -2, -3: every run dir its own
    assert all(not math.isnan(r) for r in rates)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--grid", "train.learning_rat=[1e-4]"], ("--grid train.learning_rat: unknown key", "did you mean train.learning_rate")),
        (["--grid", "train.learning_rate=[]"], ("sweep.grid.train.learning_rate: give a non-empty list",)),
        (["--grid", 'peft.r=[8, "sixteen"]'], ("variant r=sixteen: peft.r: must be a positive integer",)),
        (["--grid", f"train.seed={list(range(100))}", "--grid", f"eval.seed={list(range(100))}"], ("10,000 variants", "--yes")),
        ([], ("no [sweep] table and no --grid",)),
        (["--grid", "peft.r=[4,8]", "--set", "peft.r=4"], ("peft.r: both swept and fixed by --set",)),
    ],
)
def test_a_bad_sweep_is_one_line_and_nothing_is_rendered(arguments, words, tmp_path, tiny_assets, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = sweep_recipe(tmp_path, tiny_assets)
    one_line(capsys, main(["sweep", str(recipe), "--dry-run", *arguments]), *words)
    assert not (tmp_path / "runs").exists()


def test_bad_sweep_tables_and_a_sweep_given_to_launch_are_one_line(tmp_path, tiny_assets, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        '[sweep]\nrandom = { count = 2, space = { "train.learning_rate" = { log-uniform = [0, 1] } } }': "log-uniform: its bounds must be above 0",
        '[sweep]\nrandom = { count = 2, space = { "peft.r" = { normal = [1, 2] } } }': "give one of log-uniform, uniform, int-uniform, choice",
        "[sweep]\nmax_parallel = 0": "sweep.max_parallel: Input should be greater than 0",
        '[sweep]\nvariants = [{ name = "a b", "peft.r" = 4 }]': 'sweep.variants[0].name: "a b" is not a plain name',
        '[sweep]\ngrid = { "peft.r" = [4, 8] }\nstrategy = "halving"': "sweep.rungs: halving needs rungs",
        '[sweep]\ngrid = { "peft.r" = [4, 8] }\nstrategy = "halving"\nrungs = [3, 6]': "does not reach past the last halving rung (step 6)",
    }
    for number, (table, words) in enumerate(cases.items()):
        recipe = sweep_recipe(tmp_path, tiny_assets, table, name=f"bad{number}")
        one_line(capsys, main(["sweep", str(recipe), "--dry-run"]), words)
    halving = sweep_recipe(
        tmp_path, tiny_assets, '[sweep]\ngrid = { "peft.r" = [4, 8] }\nstrategy = "halving"\nrungs = [3]', name="h"
    )
    one_line(
        capsys,
        main(["sweep", str(halving), "--dry-run", "--executor", "slurm"]),
        'strategy = "halving" runs its variants on this machine',
    )
    recipe = sweep_recipe(tmp_path, tiny_assets, '[sweep]\ngrid = { "peft.r" = [4, 8] }', name="swept")
    one_line(capsys, main([str(recipe), "--dry-run"]), "has a [sweep] table", f"launch sweep {recipe}")
    assert not (tmp_path / "runs").exists()
    single = sweep_recipe(tmp_path, tiny_assets, name="single")
    assert main([str(single), "--dry-run"]) == 0  # runs/single is a run's
    capsys.readouterr()
    one_line(
        capsys, main(["sweep", str(single), "--dry-run", "--grid", "peft.r=[4,8]"]), "runs/single: is a run dir", "--sweep-dir"
    )
    left = {p.name for p in (tmp_path / "runs" / "single").iterdir()}
    assert "sweep.json" not in left and not any("=" in name for name in left)  # the run dir is untouched


def test_a_dry_run_renders_every_variant_and_the_array_script_without_slurm(tmp_path, tiny_assets, monkeypatch):
    """A laptop without SLURM: every variant's run dir, and the array's sbatch script as the login node renders it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    recipe = sweep_recipe(
        tmp_path, tiny_assets, '[sweep]\nmax_parallel = 2\ngrid = { "train.learning_rate" = [1e-3, 5e-3], "peft.r" = [4, 8] }'
    )
    assert main(["sweep", str(recipe), "--dry-run", "--executor", "slurm", "--nodes", "2"]) == 0
    folder = SweepDir(tmp_path / "runs" / "tiny")
    names = [v.name for v in folder.manifest().variants]
    assert names == ["lr=0.001,r=4", "lr=0.001,r=8", "lr=0.005,r=4", "lr=0.005,r=8"]
    for variant, run in folder.runs():
        resolved = run.load_recipe()
        assert (resolved.train.learning_rate, resolved.peft.r) == tuple(variant.overrides.values())
        assert resolved.distributed.nodes == 2 and run.deepspeed_config.is_file() and not run.sbatch.exists()
    script = folder.array_script.read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --nodes=2" in script and "#SBATCH --requeue" in script
    assert "%A_%a_0_log.out" in script and f"requeue {folder.members_file(0).resolve()}" in script


def test_a_changed_grid_adds_variants_and_a_changed_recipe_is_refused(tmp_path, tiny_assets, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = sweep_recipe(tmp_path, tiny_assets)
    assert main(["sweep", str(recipe), "--dry-run", "--grid", "peft.r=[4,8]"]) == 0
    assert main(["sweep", str(recipe), "--dry-run", "--grid", "peft.r=[4,8,16]"]) == 0
    folder = SweepDir(tmp_path / "runs" / "tiny")
    assert [v.name for v in folder.manifest().variants] == ["r=4", "r=8", "r=16"]
    before = {run.root.name: run.recipe.read_bytes() for _, run in folder.runs()}
    capsys.readouterr()
    code = main(["sweep", str(recipe), "--dry-run", "--grid", "peft.r=[4,8]", "--set", "train.micro_batch_size=4"])
    line = one_line(
        capsys, code, "variant r=4 (and 1 more variants): ", "was trained with another recipe (train.micro_batch_size changed)"
    )
    assert "--sweep-dir" in line
    assert {run.root.name: run.recipe.read_bytes() for _, run in folder.runs()} == before  # untouched


@pytest.mark.e2e
def test_a_random_search_of_three_runs_compares_and_marks_the_best_and_a_rerun_trains_nothing(tmp_path, tiny_assets):
    space = '"train.learning_rate" = { log-uniform = [1e-3, 1e-2] }, "peft.r" = { choice = [4, 8] }'
    recipe = sweep_recipe(tmp_path, tiny_assets, f"[sweep]\nrandom = {{ count = 3, seed = 1, space = {{ {space} }} }}")
    first = run_launch("sweep", recipe, "--executor", "local", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = SweepDir(tmp_path / "runs" / "tiny")
    runs = [run for _, run in folder.runs()]
    assert len(runs) == 3 and all(run.manifest().state == "completed" for run in runs)
    held_out = {run.root.name: run.evaluation.results().systems["adapter"]["loss"] for run in runs}
    best = min(held_out, key=held_out.get)
    assert folder.manifest().best.variant == best and folder.manifest().best.value == pytest.approx(held_out[best])
    assert f"best: {best} (held-out loss" in first.stdout
    page = folder.report_html.read_text()
    assert all(name in page for name in held_out) and f"<tr class=best><td>{best} *</td>" in page
    assert "train.learning_rate" in page and "peft.r" in page and "CPU-h" in page and "data:image/png;base64," in page
    assert "<th onclick='sortBy(" in page and ">MFU<" in page
    assert all(row["mfu"] > 0 for run in runs for row in run.metrics.rows())  # measured against this CPU's peak
    rows = {run.root.name: run.metrics.count() for run in runs}

    again = run_launch("sweep", recipe, "--executor", "local", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count(": complete, kept") == 3 and "nothing to submit" in again.stdout
    assert {run.root.name: RunDir(run.root).metrics.count() for run in runs} == rows  # nothing trained again
    status = run_launch("status", folder.root, cwd=tmp_path)
    assert status.returncode == 0 and status.stdout.count("completed") == 3, status.stdout
    assert json.loads(folder.manifest_path.read_text())["best"]["variant"] == best


def test_the_variants_log_side_by_side_in_the_trackers(tmp_path, tiny_assets, monkeypatch):
    """One W&B group (and one MLflow experiment) per sweep; TensorBoard reads every variant under the sweep dir."""
    from launcher.tracking.trackers import environment

    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_RUN_GROUP", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    recipe = sweep_recipe(tmp_path, tiny_assets)
    tracked = ["--set", 'train.report_to=["tensorboard", "wandb", "mlflow"]']
    assert main(["sweep", str(recipe), "--dry-run", "--grid", "peft.r=[4,8]", *tracked]) == 0
    plain_recipe = recipe.with_name("plain.toml")
    plain_recipe.write_text(recipe.read_text().replace('name = "tiny"', 'name = "plain"'))
    assert main([str(plain_recipe), "--dry-run", *tracked]) == 0
    envs = [environment(run.load_recipe(), run) for _, run in SweepDir(tmp_path / "runs" / "tiny").runs()]
    assert [e["WANDB_RUN_GROUP"] for e in envs] == ["tiny", "tiny"] and {e["MLFLOW_EXPERIMENT_NAME"] for e in envs} == {"tiny"}
    assert all(Path(e["TENSORBOARD_LOGGING_DIR"]).parent.parent == (tmp_path / "runs" / "tiny").resolve() for e in envs)
    plain = RunDir(tmp_path / "runs" / "plain")
    assert "WANDB_RUN_GROUP" not in environment(plain.load_recipe(), plain)


@pytest.mark.e2e
def test_halving_prunes_the_worse_half_at_its_rung_and_the_rest_resume_from_there(tmp_path, tiny_assets):
    rates = "[1e-4, 1e-3, 5e-3, 1e-2]"
    recipe = sweep_recipe(
        tmp_path, tiny_assets, f'[sweep]\ngrid = {{ "train.learning_rate" = {rates} }}\nstrategy = "halving"\nrungs = [3]'
    )
    first = run_launch("sweep", recipe, "--executor", "local", "--set", "eval.max_examples=8", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = SweepDir(tmp_path / "runs" / "tiny")
    (rung,) = folder.manifest().rungs
    at_rung = {run.root.name: run.rung_eval(3) for _, run in folder.runs()}
    losses = {
        name: json.loads((out / "metrics.json").read_text())["systems"]["checkpoint-3"]["loss"] for name, out in at_rung.items()
    }
    assert rung.step == 3 and rung.losses == pytest.approx(losses)
    assert sorted(rung.kept) == sorted(sorted(losses, key=losses.get)[:2]) and len(rung.pruned) == 2
    assert rung.saved_device_hours > 0 and f"halving at step 3: kept {rung.kept[0]}" in first.stdout
    for name in rung.pruned:  # stopped for good at the rung; its checkpoint kept
        run = folder.run(name)
        assert run.manifest().state == "pruned" and (run.checkpoint(3) / "launcher-complete.json").exists()
        assert not run.adapter.exists() and run.metrics.last()["step"] == 3
    for name in rung.kept:  # went on from the rung's checkpoint to the end
        run = folder.run(name)
        assert run.manifest().state == "completed" and [r["step"] for r in run.metrics.rows()] == [1, 2, 3, 4, 5, 6]
        assert (
            f"resuming from {run.checkpoint(3).resolve()}" in run.rank_log(0).read_text()
            or "checkpoint-3 (step 3)" in run.rank_log(0).read_text()
        )
    assert folder.manifest().best.variant in rung.kept and "halving at step 3" in folder.report_html.read_text()

    again = run_launch("sweep", recipe, "--executor", "local", "--set", "eval.max_examples=8", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("pruned at a halving rung, kept") == 2 and again.stdout.count(": complete, kept") == 2
    assert len(folder.manifest().rungs) == 1  # the rung was decided once

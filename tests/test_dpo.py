"""DPO end to end (TRL's DPOTrainer inside the launcher's worker): the README's recipe on the parity
pairs, 2 ranks under DeepSpeed, the reference being the base with the adapter disabled."""

from __future__ import annotations

import json
import math
import os
import re
import signal
from statistics import mean

import pytest
from conftest import REPO, batches, dpo_recipe_text, run_launch, start_launch, wait_for_rows, write_recipe

from launcher.adapters.merge import validate_adapter
from launcher.config.objectives import REWARD_METRICS
from launcher.rundir.runs import RunDir

pytestmark = pytest.mark.e2e  # real processes end to end: the full tier


@pytest.mark.parametrize(("zero", "method"), [("zero2", "lora"), ("zero3", "qlora")])
def test_the_dpo_quickstart_learns_the_preference_against_the_disabled_adapter(tmp_path, zero, method):
    """LoRA under ZeRO-2 end to end with its evaluation; QLoRA (real bitsandbytes) under ZeRO-3 to the merge."""
    run = RunDir(tmp_path / "dpo")
    sets = ["model.dtype=fp32", f"distributed.deepspeed={zero}", f"peft.method={method}"]
    sets += ["eval.enabled=false"] if zero == "zero3" else []
    result = run_launch(REPO / "recipes" / "quickstart-dpo.toml", "--run-dir", run.root, *[x for s in sets for x in ("--set", s)])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = run.metrics.rows()
    assert [r["step"] for r in rows] == list(range(1, 61)) and all(set(REWARD_METRICS) <= set(r) for r in rows)
    # Step 1: LoRA's B starts at zero, so the policy is its reference (the adapter disabled): every
    # implicit reward is 0 and the sigmoid loss is -log(1/2).
    first = rows[0]
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    late = rows[-10:]
    assert mean(r["rewards/accuracies"] for r in late) >= 0.8 and mean(r["rewards/margins"] for r in late) > 1.0
    assert mean(r["loss"] for r in late) < 0.45 < first["loss"]
    assert "valid" in validate_adapter(run.adapter, trained=True)  # its probe: the gathered adapter is the trained one
    assert (run.merged / "model.safetensors").exists()
    if zero == "zero2":
        assert "reward acc " in result.stdout  # the progress line
        assert re.search(
            r"completed, step 60/60, loss [\d.]+, .* reward acc [\d.]+ margin", run_launch("status", run.root).stdout
        )
        reproduced = (run.logs / "local").glob("eval-*_0.log")
        assert any("adapter: with HF, reproduces the trained model" in log.read_text() for log in reproduced)
        systems = json.loads((run.eval / "metrics.json").read_text())["systems"]
        base, adapter = systems["base"], systems["adapter"]
        assert adapter["exact_match"] > base["exact_match"]
        # Held-out pairs (never trained on): the base ranks the answers about as a coin would; against it, the
        # adapter's implicit rewards prefer the chosen answer on at least 9 pairs in 10.
        assert 0.3 <= base["preference_accuracy"] <= 0.7 and "reward_accuracy" not in base
        assert adapter["reward_accuracy"] >= 0.9 and adapter["reward_margin"] > 1.0 and adapter["preference_accuracy"] > 0.8
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        board = EventAccumulator(str(next((run.root / "tensorboard").rglob("events*")).parent))
        board.Reload()
        assert len(board.Scalars("train/rewards/accuracies")) == 60 and board.Scalars("eval/reward_accuracy")
        table = result.stdout[result.stdout.index("evaluation on ") :].splitlines()[1].split()
        assert table[-4:] == ["pref", "reward", "margin", "tok/s"], table


STEPS = 80


def dpo_args(tmp_path, assets, run_dir) -> list:
    """The tests' tiny recipe on the parity pairs, as a DPO run (fp32: equal numbers after a resume)."""
    recipe = write_recipe(tmp_path, dpo_recipe_text(assets), "dpo.toml")
    sets = [f"train.max_steps={STEPS}", "train.save_steps=40", "merge.enabled=false", "eval.enabled=false"]
    return [recipe, "--run-dir", run_dir, "--executor", "local"] + [x for s in sets for x in ("--set", s)]


def test_a_stopped_dpo_run_resumes_with_the_losses_rewards_and_order_of_an_uninterrupted_one(tmp_path, tiny_assets):
    straight = RunDir(tmp_path / "straight")
    assert run_launch(*dpo_args(tmp_path, tiny_assets, straight.root)).returncode == 0
    run = RunDir(tmp_path / "stopped")
    launch = start_launch(*dpo_args(tmp_path, tiny_assets, run.root), start_new_session=True)
    wait_for_rows(run, 5)
    os.kill(launch.pid, signal.SIGINT)  # Ctrl-C: the ranks get the stop signal, save at their next step and end
    output, _ = launch.communicate(timeout=180)
    assert "stopped; newest complete checkpoint: checkpoint-" in output and "Traceback" not in output, output
    saved = max(int(p.name.split("-")[1]) for p in run.checkpoints.glob("checkpoint-*"))
    assert 5 <= saved < STEPS
    again = run_launch(*dpo_args(tmp_path, tiny_assets, run.root))
    assert again.returncode == 0, again.stdout + again.stderr
    want, got = straight.metrics.rows(), run.metrics.rows()
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("loss", *REWARD_METRICS):
        assert max(abs(w[key] - g[key]) for w, g in zip(want, got)) == 0.0, key
    for rank in (0, 1):
        assert batches(run, rank, attempt=2) == batches(straight, rank)[saved:]

"""DPO end to end (TRL's DPOTrainer inside the launcher's worker): the README's recipe on the parity
pairs, 2 ranks under DeepSpeed, the reference being the base with the adapter disabled."""

from __future__ import annotations

import json
import math
from statistics import mean

import pytest
from conftest import REPO, run_launch

from launcher.adapters.merge import validate_adapter
from launcher.config.objectives import REWARD_METRICS
from launcher.rundir.runs import RunDir

pytestmark = pytest.mark.e2e  # real processes end to end: the full tier


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_the_dpo_quickstart_learns_the_preference_against_the_disabled_adapter(tmp_path, zero):
    run = RunDir(tmp_path / "dpo")
    sets = ["model.dtype=fp32", f"distributed.deepspeed={zero}"] + (["eval.enabled=false"] if zero == "zero3" else [])
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
        reproduced = (run.logs / "local").glob("eval-*_0.log")
        assert any("adapter: with HF, reproduces the trained model" in log.read_text() for log in reproduced)
        metrics = json.loads((run.eval / "metrics.json").read_text())
        assert metrics["systems"]["adapter"]["exact_match"] > metrics["systems"]["base"]["exact_match"]

"""End to end, for real: 2 processes, DeepSpeed ZeRO on CPU (gloo), LoRA on a tiny Llama built here."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_launch, train_tiny

from launcher.adapters.merge import validate_adapter
from launcher.models.loading import load_pretrained
from launcher.rundir.runs import RunDir

pytestmark = pytest.mark.e2e  # real processes end to end: the full tier

STEPS = 30


@pytest.fixture(scope="module", params=["zero3", "zero2"])
def finished_run(request, tmp_path_factory, tiny_assets):
    folder = tmp_path_factory.mktemp(request.param)
    _, run, result, args = train_tiny(tiny_assets, folder, f"distributed.deepspeed={request.param}", f"train.max_steps={STEPS}")
    return run, result, args, tiny_assets


def metrics_rows(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics_log.read_text().splitlines()]


def test_training_logs_every_step_and_the_loss_goes_down(finished_run):
    run, *_ = finished_run
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["tokens_per_second"] > 0 and r["learning_rate"] is not None for r in rows)
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)


def test_checkpoints_hold_every_ranks_sharded_state(finished_run):
    run, *_ = finished_run
    names = sorted(p.name for p in run.checkpoints.iterdir())
    assert names == [f"checkpoint-{n}" for n in (10, 15, 20, 25, 30, 5)]
    last = run.checkpoints / f"checkpoint-{STEPS}"
    shards = {p.name for p in (last / f"global_step{STEPS}").iterdir()}
    # ZeRO-2 keeps one model-states file (parameters are not sharded); optimizer state is per rank.
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= shards
    assert any(name.endswith("model_states.pt") for name in shards)
    assert {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json"} <= {p.name for p in last.iterdir()}
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == STEPS


def test_final_adapter_is_gathered_and_valid(finished_run):
    run, *_ = finished_run
    assert "valid" in validate_adapter(run.adapter, trained=True)
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"


def test_merged_model_equals_base_plus_adapter(finished_run):
    from peft import PeftModel
    from transformers import AutoTokenizer

    run, _, _, assets = finished_run
    tokenizer = AutoTokenizer.from_pretrained(run.merged)
    inputs = tokenizer(
        ["Is this number even or odd?\n1234\n", "Is this number even or odd?\n7\n"], return_tensors="pt", padding=True
    )
    merged = load_pretrained(run.merged, torch.float32).eval()
    base = load_pretrained(assets["model"], torch.float32)
    with_adapter = PeftModel.from_pretrained(base, run.adapter).eval()
    with torch.no_grad():
        expected, got = with_adapter(**inputs).logits, merged(**inputs).logits
        with with_adapter.disable_adapter():
            untouched = with_adapter(**inputs).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - untouched).abs().max().item() > 1e-2  # the adapter changed something


def test_evaluation_compares_base_and_adapter(finished_run):
    run, result, *_ = finished_run
    metrics = json.loads((run.eval / "metrics.json").read_text())
    base, adapter = metrics["systems"]["base"], metrics["systems"]["adapter"]
    assert set(base) == set(adapter) >= {"exact_match", "bleu4", "rouge1", "rouge2", "rougeL", "loss", "perplexity"}
    assert adapter["loss"] < base["loss"]
    assert adapter["exact_match"] > base["exact_match"] and adapter["rouge1"] > base["rouge1"]
    rows = [json.loads(line) for line in (run.eval / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["examples"] and set(rows[0]) == {"prompt", "reference", "base", "adapter"}
    assert "| adapter |" in (run.eval / "report.md").read_text()
    # One-word answers ("even"/"odd"): no 4-grams, no bigrams; the report names the convention and says why.
    assert metrics["metrics_convention"]["name"] == "sacrebleu" and adapter["bleu4"] is None and adapter["rouge2"] is None
    assert "- BLEU-4 n/a: no reference has 4 tokens" in (run.eval / "report.md").read_text()
    assert "<table>" in (run.eval / "report.html").read_text() and (run.eval / "loss_curve.png").stat().st_size > 1000
    assert str(run.eval / "report.html") in result.stdout
    lines = result.stdout[result.stdout.index("evaluation on ") :].splitlines()
    end = next(i for i, line in enumerate(lines) if line.split()[:1] == ["adapter"])
    table = lines[: end + 1]  # title, header, rule, base, adapter
    assert table[1].split() == ["system", "exact", "rouge1", "rougeL", "loss", "ppl", "tok/s"], table  # n/a throughout: out
    assert max(map(len, table)) <= 80 and "…" not in "".join(table), table  # whole in 80 columns, no cut cells
    status = run_launch("status", run.root)
    assert f"report: {run.eval / 'report.html'}" in status.stdout


def test_rerun_finds_the_finished_run_and_changes_nothing(finished_run):
    run, _, args, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file() and p.name != "manifest.json"}
    again = run_launch(*args)
    assert again.returncode == 0, again.stderr
    assert "continuing it (state: completed)" in again.stdout
    after = {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert after == before
    assert json.loads(run.manifest_path.read_text())["state"] == "completed"


def test_stages_rerun_alone_and_refuse_to_overwrite(finished_run):
    run, *_ = finished_run
    refused = run_launch("merge", run.root)
    assert refused.returncode == 2 and "pass --overwrite" in refused.stderr
    other = run_launch("eval", run.root, "--set", "eval.max_new_tokens=5")
    assert other.returncode == 2 and "holds another evaluation (different decoding)" in other.stderr
    redone = run_launch("eval", run.root, "--overwrite")
    assert redone.returncode == 0, redone.stderr
    assert json.loads((run.eval / "metrics.json").read_text())["examples"] > 0


def test_an_empty_checkpoint_adapter_is_rebuilt_from_the_zero_shards(finished_run):
    """A ZeRO-3 save without stage3_gather_16bit_weights_on_model_save writes empty adapter tensors;
    we write exactly that over a checkpoint's adapter and merge from it."""
    from safetensors.torch import load_file, save_file

    run, *_ = finished_run
    checkpoint = run.checkpoints / "checkpoint-10"
    saved = load_file(checkpoint / "adapter_model.safetensors")
    save_file({name: torch.empty(0) for name in saved}, str(checkpoint / "adapter_model.safetensors"))
    result = run_launch("merge", run.root, "--checkpoint", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    rebuilt = load_file(run.root / "adapter-checkpoint-10" / "adapter_model.safetensors")
    assert set(rebuilt) == set(saved)
    assert max((rebuilt[name] - saved[name]).abs().max().item() for name in saved) == 0.0
    assert (run.root / "merged-checkpoint-10" / "model.safetensors").exists()


def test_each_stage_records_its_own_wall_time_and_peak(finished_run):
    """Training, merge and eval ran as their own processes: each record is that process's. A merge
    re-run alone in a fresh process measures the same peak (within 10%) as the one the pipeline ran."""
    run, *_ = finished_run
    manifest = json.loads(run.manifest_path.read_text())
    train, merge, evaluation = manifest["train"], manifest["merge"], manifest["eval"]
    assert all(record["wall_s"] > 0 and record["peak_rss_mib"] > 100 for record in (train, merge, evaluation))
    assert merge["peak_rss_mib"] != train["peak_rss_mib"]  # measured in another process than training's
    again = run_launch("merge", run.root, "--overwrite")
    assert again.returncode == 0, again.stdout + again.stderr
    alone = json.loads(run.manifest_path.read_text())["merge"]
    assert abs(merge["peak_rss_mib"] - alone["peak_rss_mib"]) <= 0.1 * alone["peak_rss_mib"], (merge, alone)

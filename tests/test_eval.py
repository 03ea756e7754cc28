"""Batch evaluation for real: a trained tiny run, evaluated sharded over processes, resumed after a
lost shard, and compared with the unsharded evaluation; the metrics on Chinese text."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_launch, train_tiny, write_recipe

from launcher.adapters.merge import PROBE_FILE

pytestmark = [pytest.mark.xdist_group("eval"), pytest.mark.e2e]  # one trained run for the module, on one worker


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_assets):
    folder = tmp_path_factory.mktemp("eval")
    _, run, _, _ = train_tiny(tiny_assets, folder, "eval.enabled=false", extra="[merge]\nenabled = false")
    return run, folder


def rows_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_sharded_eval_of_every_checkpoint_equals_one_process_and_resumes(trained):
    run, folder = trained
    sharded, single = folder / "eval-2", folder / "eval-1"
    result = run_launch("eval", run.root, "--checkpoints", "all", "--shards", "2", "--out", sharded)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((sharded / "metrics.json").read_text())
    systems = ["base", "checkpoint-5", "checkpoint-10", "checkpoint-12", "adapter"]
    assert list(metrics["systems"]) == systems
    assert metrics["systems"]["adapter"]["loss"] < metrics["systems"]["base"]["loss"]
    assert len(list((sharded / "shards").rglob("*.done"))) == 2 * len(systems)
    assert (sharded / "checkpoint_metrics.png").stat().st_size > 1000 and (sharded / "loss_curve.png").stat().st_size > 1000
    report = (sharded / "report.md").read_text()
    head, samples = report.split("## Sample predictions")
    assert f"- model: {run.load_recipe().model.name_or_path} (fp32); method: lora (r 8, alpha 16" in head
    assert "- training: lr 0.003 (linear, 2 warm-up steps), 12 steps, micro batch 8 x 1 accumulation x 2 ranks" in head
    assert "- run run: 1080 training examples" in head and "; train " in head and " s, peak RSS " in head
    assert samples.splitlines()[2].startswith(
        "| prompt | reference | base | adapter | checkpoint-5 | checkpoint-10 | checkpoint-12 |"
    )

    # Predictions come back in input order, whatever the shard and batch order was.
    examples = [json.loads(line) for line in (sharded / "examples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows_of(sharded)] == [e["prompt"] for e in examples]

    # The same evaluation in one process gives the same predictions and losses.
    assert run_launch("eval", run.root, "--checkpoints", "all", "--out", single).returncode == 0
    assert rows_of(single) == rows_of(sharded)
    one = json.loads((single / "metrics.json").read_text())["systems"]
    for system in systems:
        assert one[system]["loss"] == pytest.approx(metrics["systems"][system]["loss"], rel=1e-5)
        assert one[system]["exact_match"] == metrics["systems"][system]["exact_match"]

    # A shard lost mid-way (no marker) is the only work a re-run does.
    lost = sharded / "shards" / "checkpoint-10" / "shard-00001-of-00002.jsonl"
    lost.with_suffix(".done").unlink()
    lost.write_text("half a file")
    (sharded / "metrics.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (sharded / "shards").rglob("*.jsonl") if p != lost}
    again = run_launch("eval", run.root, "--checkpoints", "all", "--shards", "2", "--out", sharded)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "evaluating 1 of 2 shards (1 done before)" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert json.loads((sharded / "metrics.json").read_text())["systems"] == metrics["systems"]

    # Another plan in the same folder is refused, nothing replaced.
    other = run_launch("eval", run.root, "--out", sharded, "--set", "eval.max_new_tokens=7")
    assert other.returncode == 2 and "holds another evaluation (different" in other.stderr and "decoding" in other.stderr
    assert "--overwrite" in other.stderr and (sharded / "metrics.json").exists()


def test_eval_names_bad_targets(trained):
    run, folder = trained
    bad = run_launch("eval", run.logs)
    assert bad.returncode == 2 and "neither a run dir" in bad.stderr and "Traceback" not in bad.stderr


def test_a_failed_eval_job_ends_launch_eval_as_a_failed_stage_ends_launch_run(trained, tiny_assets):
    """Exit 1, one red line naming the job and its error, then the log's tail; no traceback of launch's own."""
    import shutil

    run, folder = trained
    broken = folder / "weightless-model"
    shutil.copytree(tiny_assets["model"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()  # the shard's load of the base fails, after the plan was made
    recipe = write_recipe(folder, run.recipe.read_text().replace(str(tiny_assets["model"]), str(broken)), "weightless.toml")
    result = run_launch("eval", run.adapter, "--recipe", recipe, "--no-base", "--out", folder / "eval-failed")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "evaluation failed: local job eval-" in result.stdout and " ended FAILED" in result.stdout
    assert "failed: OSError: Error no file named model.safetensors" in result.stdout
    assert result.stderr.count("Traceback") == 0 and "RuntimeError" not in result.stdout + result.stderr


def test_adapter_folder_evaluates_with_its_runs_recipe(trained):
    run, folder = trained
    out = folder / "eval-ckpt"
    result = run_launch("eval", run.checkpoints / "checkpoint-10", "--no-base", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(json.loads((out / "metrics.json").read_text())["systems"]) == ["checkpoint-10"]


PARITY_TASK = """task: parity_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "Is this number even or odd?\\n{{{{number}}}}\\n"
target_delimiter: ""
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_benchmarks_score_base_and_adapter_as_lm_evals_own_cli_does(trained):
    """A local lm-eval task (a YAML over a JSONL the test writes; no hub): `launch eval --benchmark`
    scores the base and the adapter with the model it loaded, and lm-eval's own command line, loading
    the adapter its way, gives the same accuracy."""
    import subprocess
    import sys

    run, folder = trained
    tasks = folder / "tasks"
    tasks.mkdir()
    rows = [{"number": str(n), "answer": "odd" if n % 2 else "even"} for n in range(1000, 1040)]
    (tasks / "parity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "parity.yaml").write_text(PARITY_TASK.format(data=tasks / "parity.jsonl"))
    out = folder / "eval-benchmark"
    result = run_launch("eval", run.root, "--benchmark", "parity_local", "--benchmark-tasks", tasks, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    scores = json.loads((out / "metrics.json").read_text())["benchmarks"]
    base, adapter = (scores[s]["parity_local"]["metrics"]["perplexity"] for s in ("base", "adapter"))
    assert scores["adapter"]["parity_local"]["samples"] == 40
    assert adapter < base / 10, (base, adapter)  # the answers' perplexity: trained on this question
    report = (out / "report.md").read_text()
    assert "## Benchmarks" in report and "| system | parity_local acc | parity_local perplexity |" in report
    assert "lm-evaluation-harness: parity_local (version " in report

    harness = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--tasks", "parity_local", "--include_path", str(tasks)]
        + ["--model_args", f"pretrained={run.load_recipe().model.name_or_path},peft={run.adapter},dtype=float32"]
        + ["--device", "cpu", "--batch_size", "8", "--output_path", str(folder / "harness")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert harness.returncode == 0, harness.stderr[-3000:]
    written = json.loads(next((folder / "harness").rglob("results_*.json")).read_text())
    assert written["results"]["parity_local"]["perplexity,none"] == pytest.approx(adapter, rel=1e-4)
    assert written["results"]["parity_local"]["acc,none"] == scores["adapter"]["parity_local"]["metrics"]["acc"]


def test_an_unknown_benchmark_task_is_one_line_before_any_work(trained):
    run, folder = trained
    result = run_launch("eval", run.root, "--benchmark", "no_such_task_anywhere", "--out", folder / "eval-none")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "eval.benchmarks: no_such_task_anywhere: no such lm-eval task" in result.stderr
    assert not (folder / "eval-none").exists()


def test_an_adapter_that_changes_nothing_or_answers_for_another_model_stops_the_evaluation(trained, tmp_path):
    """An adapter silently not applied would score like the base (lm-evaluation-harness#808): the
    evaluation stops with one line before scoring it, as it does for a backend that does not
    reproduce the trained model's saved probe."""
    from safetensors.torch import load_file, save_file

    run, _ = trained
    flat, tampered = tmp_path / "flat", tmp_path / "tampered"
    for folder in (flat, tampered):
        shutil.copytree(run.adapter, folder)
    weights = load_file(str(flat / "adapter_model.safetensors"))
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, str(flat / "adapter_model.safetensors"))
    probe = load_file(str(tampered / PROBE_FILE))
    save_file(probe | {"logits": probe["logits"] * 1.5}, str(tampered / PROBE_FILE))  # another model's answers
    for folder, said in (
        (flat, "flat: with HF, the adapter changes nothing (next-token log-probabilities equal the base model's on 4 prompts"),
        (tampered, "tampered: with HF, next-token log-probabilities are "),
    ):
        done = run_launch("eval", folder, "--recipe", run.recipe, "--no-base", "--out", tmp_path / f"eval-{folder.name}")
        assert done.returncode == 1 and said in done.stdout + done.stderr, done.stdout + done.stderr
        assert not (tmp_path / f"eval-{folder.name}" / "metrics.json").exists()
    assert "off the trained model's on average (more than 0.001 for fp32" in done.stdout + done.stderr

"""Standard benchmarks through lm-evaluation-harness (`eval.benchmarks`, `launch eval --benchmark`):
its tasks (C-Eval, CMMLU, MMLU, or a task YAML of the user's in `eval.benchmark_tasks_dir`) run on
every evaluated system, the base model and each adapter or checkpoint, with the model the
evaluation already loaded (the adapter selected, as for generation). lm-eval is an optional extra:
pip install 'peft-launcher[benchmarks]'.

Each system's results are one unit of the evaluation plan: benchmarks/SYSTEM.json, then its marker
benchmarks/SYSTEM.done (written last), done by the shard `index % shards` and skipped on a re-run.
"""

from __future__ import annotations

from pathlib import Path

from launcher.errors import UserError
from launcher.rundir.evaldir import BenchmarkSpec, EvalDir, EvalPlan

INSTALL = "pip install 'peft-launcher[benchmarks]' (lm-evaluation-harness)"


def benchmark_spec(tasks: list[str], tasks_dir: str | None, limit: int | None) -> BenchmarkSpec | None:
    """What the plan records of the benchmarks (None without any): checked against lm-eval's task
    index here, so a misspelt task is one line before any model loads."""
    if not tasks:
        return None
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError([f"eval.benchmarks: lm-evaluation-harness is not installed; {INSTALL}"])
    if tasks_dir and not Path(tasks_dir).is_dir():
        raise UserError([f"eval.benchmark_tasks_dir: {tasks_dir} is not a folder; give the folder of your task YAML files"])
    unknown = [task for task in tasks if task not in set(task_manager(tasks_dir, tasks).all_tasks)]
    if unknown:
        where = f" or in {tasks_dir}" if tasks_dir else ""
        raise UserError(
            [
                f"eval.benchmarks: {', '.join(unknown)}: no such lm-eval task{where}; list them with `lm-eval ls tasks`, "
                f"or write a task YAML and pass its folder with --benchmark-tasks DIR"
            ]
        )
    return BenchmarkSpec(tasks=list(tasks), tasks_dir=tasks_dir, limit=limit)


def task_manager(tasks_dir: str | None, tasks: list[str]):
    """lm-eval's task index: the user's folder alone when it holds every task asked for (indexing
    the harness's own ~15,000 task files takes seconds), else the harness's tasks too."""
    from lm_eval.tasks import TaskManager

    if tasks_dir:
        own = TaskManager(include_path=tasks_dir, include_defaults=False, verbosity="ERROR")
        if set(tasks) <= set(own.all_tasks):
            return own
    return TaskManager(include_path=tasks_dir, verbosity="ERROR")


def run_benchmarks(model, tokenizer, spec: BenchmarkSpec, batch_size: int, seed: int) -> dict:
    """lm-eval's results for the model as it is now (adapter selected): per task its metrics
    (value and standard error), how many samples and the task version."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=harness_model,
        tasks=spec.tasks,
        task_manager=task_manager(spec.tasks_dir, spec.tasks),
        limit=spec.limit,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        verbosity="ERROR",
    )
    results = {}
    for task, values in output["results"].items():
        metrics = {
            key.split(",")[0]: value
            for key, value in values.items()
            if "," in key and isinstance(value, (int, float)) and "_stderr" not in key
        }
        errors = {
            key.split("_stderr,")[0]: value for key, value in values.items() if "_stderr," in key and isinstance(value, float)
        }
        samples = output.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = {"metrics": metrics, "stderr": errors, "samples": samples, "version": output["versions"].get(task)}
    return results


def collect(folder: EvalDir, plan: EvalPlan) -> tuple[dict, dict]:
    """(results per system, why a system has none) of a finished evaluation's benchmarks."""
    found, failed = {}, {}
    for system in (s.name for s in plan.systems):
        record = folder.benchmark_record(system)
        if record.failed:
            failed[system] = record.failed
        else:
            found[system] = record.results
    return found, failed


def table_rows(benchmarks: dict) -> list[list[str]]:
    """system x task/metric, value ± standard error, for the report."""
    columns = sorted({(task, metric) for tasks in benchmarks.values() for task, r in tasks.items() for metric in r["metrics"]})
    rows = [["system"] + [f"{task} {metric}" for task, metric in columns]]
    for system, tasks in benchmarks.items():
        cells = []
        for task, metric in columns:
            result = tasks.get(task, {"metrics": {}, "stderr": {}})
            value, error = result["metrics"].get(metric), result["stderr"].get(metric)
            cells.append("—" if value is None else f"{value:.4g}" + (f" ± {error:.2g}" if error else ""))
        rows.append([system] + cells)
    return rows

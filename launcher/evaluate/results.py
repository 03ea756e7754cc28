"""The end of an evaluation: once every shard is done, whichever shard finished last writes the
predictions in input order, the metrics (metrics.json, last) and the report, and logs them into
the evaluated runs' trackers."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config.recipe import PreferenceSection
from launcher.data.examples import Example
from launcher.evaluate.benchmarks import collect as collect_benchmarks
from launcher.evaluate.plan import unfinished
from launcher.evaluate.report import write_report
from launcher.evaluate.scores import resolve_convention, text_scores
from launcher.rundir.evaldir import Convention, EvalDir, EvalPlan, EvalResults, ShardMarker, SystemSpeed
from launcher.rundir.runs import exclusive
from launcher.tracking.trackers import log_evaluation


def finish_if_complete(out: Path) -> EvalResults | None:
    """Once every shard is done: predictions.jsonl in input order, metrics.json and the report.
    Whichever shard finishes last does it (under a lock, so two never write at once)."""
    folder = EvalDir(Path(out))
    plan = folder.plan()
    if unfinished(out, plan):
        return None
    with exclusive(folder.finish_lock):
        finished = folder.results()  # another shard's task wrote them meanwhile
        return finished if finished is not None else write_results(folder, plan)


def shard_markers(out: Path) -> list[ShardMarker]:
    """Every completion marker of the planned evaluation in `out`."""
    folder = EvalDir(Path(out))
    plan = folder.plan()
    return [folder.shard_marker(s.name, k, plan.shards) for k in range(plan.shards) for s in plan.systems]


@dataclass
class Answers:
    """One system's rows over every shard, in input order, and what its shards' markers add up to."""

    rows: list[dict] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    generation_failed: str | None = None
    hf_because: str | None = None
    backends: set[str] = field(default_factory=set)


def collect(folder: EvalDir, plan: EvalPlan, system: str) -> Answers:
    found = Answers()
    for k in range(plan.shards):
        found.rows += folder.shard_rows(system, k, plan.shards)
        marker = folder.shard_marker(system, k, plan.shards)
        found.new_tokens += marker.new_tokens
        found.seconds += marker.seconds
        found.backends.add(marker.backend)
        found.generation_failed = found.generation_failed or marker.generation_failed
        found.hf_because = found.hf_because or marker.hf_because
    found.rows.sort(key=lambda r: r["index"])
    return found


def own_preference(rows: list[dict]) -> dict[str, float]:
    """On preference pairs: how often the system itself finds the chosen answer likelier than the rejected."""
    if not rows or "rejected_loss_sum" not in rows[0]:
        return {}
    return {"preference_accuracy": sum(r["loss_sum"] < r["rejected_loss_sum"] for r in rows) / len(rows)}


def preference_scores(rows: list[dict], base_rows: list[dict] | None, plan: EvalPlan) -> dict[str, float]:
    """On held-out preference pairs, an adapter's implicit rewards against its reference, the base (as DPO
    counts them: beta x the log-probability the adapter adds to an answer): the share of pairs whose
    chosen answer gains more than the rejected one (reward accuracy) and the mean difference (margin)."""
    scores = own_preference(rows)
    if not scores or base_rows is None:
        return scores
    beta = PreferenceSection.model_validate(plan.recipe.get("preference", {})).beta
    margins = [
        beta * ((b["loss_sum"] - r["loss_sum"]) - (b["rejected_loss_sum"] - r["rejected_loss_sum"]))
        for r, b in zip(rows, base_rows)
    ]
    return scores | {"reward_accuracy": sum(m > 0 for m in margins) / len(margins), "reward_margin": sum(margins) / len(margins)}


def write_results(folder: EvalDir, plan: EvalPlan) -> EvalResults:

    examples = [Example(**row) for row in folder.example_rows()]
    references = [e.response for e in examples]
    convention, why = resolve_convention(plan.recipe["eval"].get("metrics_convention", "auto"), references)
    predictions, metrics, speed, failed = {}, {}, {}, {}
    collected = {s.name: collect(folder, plan, s.name) for s in plan.systems}  # each system's shards read once
    base = next((s.name for s in plan.systems if s.adapter is None), None)  # the reference of every adapter
    base_rows = collected[base].rows if base else None
    for system, found in collected.items():
        predictions[system] = [r["prediction"] for r in found.rows]
        loss = sum(r["loss_sum"] for r in found.rows) / max(sum(r["loss_tokens"] for r in found.rows), 1)
        metrics[system] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if found.generation_failed:  # losses only; the answers were never generated
            failed[system] = found.generation_failed
        elif all(e.prompt for e in examples):
            metrics[system] |= text_scores(predictions[system], references, convention)
        metrics[system] |= preference_scores(found.rows, base_rows, plan) if system != base else own_preference(found.rows)
        speed[system] = SystemSpeed(
            generated_tokens=found.new_tokens,
            shard_seconds=round(found.seconds, 2),
            backend="+".join(sorted(found.backends)),
            hf_because=found.hf_because,
        )
    folder.write_predictions(
        [
            {"prompt": e.prompt, "reference": e.response} | {s: predictions[s][i] for s in predictions}
            for i, e in enumerate(examples)
        ]
    )
    benchmarks, benchmark_failures = collect_benchmarks(folder, plan) if plan.benchmarks else ({}, {})
    result = EvalResults(
        examples=len(examples),
        data=plan.data,
        shards=plan.shards,
        metrics_convention=Convention(name=convention, why=why),
        systems=metrics,
        speed=speed,
        generation_failed=failed,
        benchmarks=benchmarks,
        benchmarks_failed=benchmark_failures,
    )
    write_report(folder, plan, examples, predictions, result)
    folder.write_results(result)  # last: marks it done
    for problem in log_evaluation(plan, result):  # into each evaluated run's trackers
        print(f"warning: {problem}", file=sys.stderr)
    return result

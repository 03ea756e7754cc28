"""Planning a batch evaluation: which systems (the base model, adapters, checkpoints) on which
examples, sharded how, decoded how; and what of a planned evaluation is left to do.

An evaluation folder (launcher/rundir/evaldir.py spells it) holds:
    plan.json              what is evaluated: the resolved recipe, systems, data, shards, decoding
    examples.jsonl         the examples, in input order (fixed once, so every shard agrees)
    shards/S/shard-K.jsonl one system's predictions and reference losses for shard K's examples
    shards/S/shard-K.done  its completion marker (written last): a re-run skips this shard
    predictions.jsonl, metrics.json, report.md, report.html, *.png   once every shard is done
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from launcher.config.recipe import Recipe
from launcher.data.examples import Example, load_examples, split_examples
from launcher.errors import UserError
from launcher.evaluate.benchmarks import benchmark_spec
from launcher.models.loading import load_tokenizer
from launcher.rundir.checkpoints import checkpoints_in, is_complete
from launcher.rundir.evaldir import EvalDir, EvalPlan, System
from launcher.rundir.runs import RunDir, made_by_launcher, mark_output, set_aside

DECODING_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size")


def systems_of(runs: list[RunDir], adapters: list[Path], checkpoints: str, base: bool = True) -> list[System]:
    """base, then each run's final adapter (and complete checkpoints with checkpoints="all"),
    then adapter folders given directly."""

    several = len(runs) + len(adapters) > 1
    found = [System(name="base")] if base else []
    for run in runs:
        prefix = f"{run.root.name}/" if several else ""
        if checkpoints == "all":
            found += [
                System(name=f"{prefix}{c.name}", adapter=str(c.resolve()))
                for c in checkpoints_in(run.checkpoints)
                if is_complete(c)
            ]
        if run.adapter.exists():
            found.append(System(name=f"{prefix}adapter", adapter=str(run.adapter.resolve())))
    for adapter in adapters:
        found.append(
            System(name=f"{adapter.parent.name}/{adapter.name}" if several else adapter.name, adapter=str(adapter.resolve()))
        )
    names = [s.name for s in found]
    if len(set(names)) != len(names):
        raise UserError([f"two systems would share a name ({', '.join(names)}); evaluate them in separate --out folders"])
    return found


def eval_examples(recipe: Recipe, data: str | None) -> list[Example]:

    tokenizer = load_tokenizer(recipe) if recipe.data.template == "tokenizer" else None
    if data or recipe.eval.data:
        examples, _ = load_examples(str(data or recipe.eval.data), recipe.data, tokenizer)
    else:
        examples = split_examples(recipe, tokenizer).held_out
    if not examples:
        raise UserError(["eval: no examples to evaluate; set data.eval_file, data.eval_fraction > 0 or pass --data FILE"])
    return examples[: recipe.eval.max_examples]


def plan_evaluation(
    recipe: Recipe,
    systems: list[System],
    out: Path,
    data: str | None = None,
    overwrite: bool = False,
    runs: list[RunDir] = (),
    set_aside_other: bool = False,
) -> EvalPlan:
    """Write plan.json and examples.jsonl into `out`, or find the same plan there (a resume).

    A finished or different evaluation in `out` is replaced only with overwrite=True (or, for the
    run's own final evaluation, set_aside_other=True when it is a different one), and then moved
    aside, never deleted; a folder the launcher did not write is never used."""
    settings, folder = recipe.eval, EvalDir(Path(out))
    benchmarks = benchmark_spec(settings.benchmarks, settings.benchmark_tasks_dir, settings.benchmark_limit)  # before any work
    examples = eval_examples(recipe, data)
    lines = [json.dumps(asdict(e), ensure_ascii=False) for e in examples]
    plan = EvalPlan(
        recipe=recipe.to_dict(),
        systems=systems,
        data=str(data or recipe.eval.data or "held-out split"),
        shards=recipe.eval.shards,
        examples=len(examples),
        examples_sha256=hashlib.sha256("\n".join(lines).encode()).hexdigest(),
        decoding={key: getattr(recipe.eval, key) for key in DECODING_KEYS},
        runs=[str(run.root.resolve()) for run in runs],
        benchmarks=benchmarks,
    )
    old = planned_before(folder, replaceable=overwrite or set_aside_other)
    if old is not None and not old.differences(plan) and not overwrite:
        return old  # the same evaluation: resume its unfinished shards
    if old is not None and not (overwrite or set_aside_other):
        raise UserError(
            f"{out}: holds another evaluation (different {', '.join(old.differences(plan))}); "
            f"pass --out DIR for a new one, or --overwrite to replace it (the old one is kept, renamed)"
        )
    if folder.root.exists() and any(folder.root.iterdir()):
        if not made_by_launcher(folder.root):
            raise UserError(
                f"{out}: exists and is not an evaluation folder of the launcher; it is never replaced: pass --out DIR"
            )
        if old is not None or folder.plan_path.exists():
            set_aside(folder.root)  # a finished or different evaluation: kept, renamed
    folder.root.mkdir(parents=True, exist_ok=True)
    mark_output(folder.root, "evaluation")
    folder.write_plan(plan, lines)
    return plan


def planned_before(folder: EvalDir, replaceable: bool) -> EvalPlan | None:
    """The plan `folder` holds; one this launcher cannot read counts as another evaluation when it
    is to be replaced anyway (and is one line otherwise)."""
    try:
        return folder.plan()
    except UserError:
        if replaceable:
            return None
        raise


def unfinished(out: Path, plan: EvalPlan) -> list[tuple[int, str]]:
    """(shard, work) not done yet: a system's answers on a shard, or its benchmarks."""
    folder = EvalDir(Path(out))
    answers = [(k, s.name) for k in range(plan.shards) for s in plan.systems if not folder.shard_done(s.name, k, plan.shards)]
    return answers + [(plan.benchmark_shard(s.name), f"{s.name} benchmarks") for s in benchmarks_left(out, plan, shard=None)]


def benchmarks_left(out: Path, plan: EvalPlan, shard: int | None) -> list[System]:
    """The systems whose benchmarks are not done (those of one shard, or of every shard with None)."""
    if plan.benchmarks is None:
        return []
    folder = EvalDir(Path(out))
    return [
        s for s in plan.systems if (shard is None or plan.benchmark_shard(s.name) == shard) and not folder.benchmarks_done(s.name)
    ]

"""`launch sweep`: a recipe's variants validated, pre-flighted, rendered and submitted as one SLURM
job array per stage (or run one after another locally), each variant a whole run in its own run dir.

The sweep's state is on disk (rundir/sweepdir): sweep.json before anything is queued and after
each array, and each variant's own manifest. A re-run of the same command plans again from there:
a completed variant is kept, a queued or running one left alone, the rest submitted (a cancelled,
preempted or failed one resumes from its newest complete checkpoint, as a single run does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from launcher.config.recipe import Recipe, load_recipe, read_recipe_tables, read_toml, with_new_defaults
from launcher.config.sweep import CONFIRM_ABOVE, SweepSection, Variant, expand, flatten, parse_grid_flags, parse_sweep
from launcher.data.examples import read_training_set
from launcher.errors import UserError
from launcher.evaluate.plan import plan_evaluation
from launcher.evaluate.sweep_report import VariantRow, devices_of, publish_comparison, rung_line, table, variant_row
from launcher.launch.executors.base import TERMINAL_STATES, Executor
from launcher.launch.executors.factory import choose_executor, job_of, make_executor
from launcher.launch.pipeline import (
    Stage,
    execute,
    prepare,
    refuse_what_the_scheduler_would_not_run,
    run_dir_in_use,
    run_evaluation,
    stages_to_do,
)
from launcher.launch.preflight import run_preflight
from launcher.rundir import lifecycle
from launcher.rundir.checkpoints import is_complete
from launcher.rundir.evaldir import System
from launcher.rundir.files import write_atomic
from launcher.rundir.runs import RunDir, State, differences, now
from launcher.rundir.sweepdir import ArrayRecord, RungRecord, SweepDir, SweepManifest, VariantRecord, write_members

# Keys whose value no pre-flight check reads: variants differing only in these share one pre-flight.
PREFLIGHT_BLIND = (
    "train.learning_rate",
    "train.warmup_steps",
    "train.lr_scheduler",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.seed",
    "train.save_total_limit",
    "train.logging_steps",
    "peft.alpha",
    "peft.dropout",
    "eval.seed",
    "eval.temperature",
    "eval.top_p",
)
ERRORS_SHOWN = 20


@dataclass(frozen=True)
class Planned:
    variant: Variant
    recipe: Recipe
    run: RunDir


def plan_sweep(
    recipe_path: Path, grid_flags: list[str], overrides: list[str], yes: bool
) -> tuple[SweepSection, list[Planned], Path]:
    """Every variant of the sweep, each validated as a recipe; one bad value stops it all, named."""
    raw = read_recipe_tables(recipe_path)
    table = dict(raw.get("sweep") or {})
    if grid_flags:
        grid = table.get("grid") or {}
        table["grid"] = (
            flatten(grid, leaf=lambda v: isinstance(v, list)) if isinstance(grid, dict) else grid
        ) | parse_grid_flags(grid_flags)
    if not table:
        raise UserError(
            [f"{recipe_path}: no [sweep] table and no --grid; say what to sweep, e.g. --grid train.learning_rate=[1e-4,3e-4]"]
        )
    sweep = parse_sweep(table)
    variants = expand(sweep)
    if len(variants) > CONFIRM_ABOVE and not yes:
        raise UserError(
            [
                f"sweep: {len(variants):,} variants (more than {CONFIRM_ABOVE:,}); pass --yes to queue them all, or narrow the sweep"
            ]
        )
    base = load_recipe(recipe_path, overrides, raw=raw)
    fixed = {item.partition("=")[0].strip() for item in overrides}
    both = sorted(fixed & {key for variant in variants for key in variant.overrides})
    if both:
        raise UserError([f"{both[0]}: both swept and fixed by --set (which would win for every variant); drop one"])
    cluster = sorted({key for variant in variants for key in variant.overrides if key.startswith("slurm.")})
    if cluster:
        raise UserError([f"{cluster[0]}: cannot be swept (a job array has one set of SLURM settings); run one sweep per value"])
    root = Path("runs") / base.name
    planned, problems = [], []
    for variant in variants:
        try:
            recipe = load_recipe(recipe_path, overrides, raw=raw, values=variant.overrides)
        except UserError as err:
            problems += [f"variant {variant.name}: {line}" for line in err.lines]
            continue
        planned.append(Planned(variant, recipe, RunDir(root / variant.name)))
    if problems:
        raise UserError(capped(problems))
    return sweep, planned, root


def capped(problems: list[str]) -> list[str]:
    """The first ERRORS_SHOWN lines, and how many more there are."""
    return problems[:ERRORS_SHOWN] + ([f"... and {len(problems) - ERRORS_SHOWN} more"] if len(problems) > ERRORS_SHOWN else [])


def at(planned: list[Planned], root: Path) -> list[Planned]:
    """The variants with their run dirs under `root` (--sweep-dir)."""
    return [replace(p, run=RunDir(Path(root) / p.variant.name)) for p in planned]


def refuse_changed_runs(planned: list[Planned]) -> None:
    """A variant's run dir that holds a run of another recipe is never touched: the sweep's recipe changed."""
    changed = [p for p in planned if p.run.manifest_path.is_file() and p.run.manifest().recipe_hash != p.recipe.fingerprint()]
    changed = [
        p for p in changed if any(differences(with_new_defaults(read_toml(p.run.recipe), p.recipe.to_dict()), p.recipe.to_dict()))
    ]
    if not changed:
        return  # (a hash that differs only by keys a newer launcher added, at their defaults, is the same recipe)
    first = changed[0]
    keys = [
        key
        for key, _, _ in differences(
            with_new_defaults(read_toml(first.run.recipe), first.recipe.to_dict()), first.recipe.to_dict()
        )
    ]
    others = f" (and {len(changed) - 1} more variants)" if len(changed) > 1 else ""
    raise UserError(
        f"variant {first.variant.name}{others}: {first.run.root} was trained with another recipe "
        f"({', '.join(keys[:4]) or 'resolved values'} changed); a sweep never changes a variant's run: restore the "
        f"recipe, or sweep into a new --sweep-dir"
    )


def preflight_key(recipe: Recipe) -> str:
    resolved = recipe.to_dict()
    for key in PREFLIGHT_BLIND:
        section, leaf = key.split(".")
        resolved.get(section, {}).pop(leaf, None)
    return json.dumps(resolved, sort_keys=True)


def data_key(recipe: Recipe) -> str:
    return json.dumps(
        {"model": recipe.model.model_dump(), "data": recipe.data.model_dump(), "eval": recipe.eval.enabled}, sort_keys=True
    )


def preflight_sweep(planned: list[Planned], console: Console) -> int:
    """Pre-flight once per distinct model, data and tokenizer (the data read) and once per distinct
    set of the keys pre-flight reads; every variant gets the verdict of its group. Returns the checks run."""
    data_reports, checks, problems = {}, {}, []
    for p in planned:
        key = data_key(p.recipe)
        if key not in data_reports:
            data_reports[key] = read_training_set(p.recipe, samples=0)
        data = data_reports[key]
        check = preflight_key(p.recipe)
        if check not in checks:
            checks[check] = run_preflight(p.recipe, examples=data.examples)
        report = checks[check]
        problems += [f"variant {p.variant.name}: {line}" for line in data.errors + report.errors]
    for line in sorted({w for report in checks.values() for w in report.warnings}):
        console.print(f"warning {line}", highlight=False, markup=False)
    if problems:
        raise UserError(capped(problems))
    return len(checks)


def record_sweep(
    folder: SweepDir, recipe_path: Path, overrides: list[str], sweep: SweepSection, planned: list[Planned], executor: str
) -> None:
    """sweep.json: the variants so far and these (a changed grid adds its new ones), before anything is
    queued; what earlier commands recorded (arrays, rungs, the best) is kept."""
    old = folder.manifest() if folder.exists() else None
    known = {v.name: v for v in (old.variants if old else [])}
    for p in planned:
        known.setdefault(
            p.variant.name, VariantRecord(name=p.variant.name, overrides=p.variant.overrides, run_dir=p.variant.name)
        )
    settings = {
        "recipe": str(Path(recipe_path).resolve()),
        "base_overrides": list(overrides),
        "metric": sweep.metric,
        "mode": sweep.mode,
        "max_parallel": sweep.max_parallel,
        "executor": executor,
        "variants": list(known.values()),
    }
    if old is None:
        folder.write(SweepManifest(name=planned[0].recipe.name, created=now(), **settings))
        return
    with folder.editing() as manifest:
        for key, value in settings.items():
            setattr(manifest, key, value)


def render_variants(planned: list[Planned]) -> None:
    """Each variant's run dir with its rendered files (claimed, or found again with the same recipe)."""
    quiet = Console(quiet=True)
    for p in planned:
        with run_dir_in_use(p.run.root, f"launch sweep ({p.variant.name})") as root:
            prepare(p.recipe, root, quiet, make_executor("local", p.recipe, p.run.logs))


def live_elements(folder: SweepDir) -> dict[str, tuple[str, str]]:
    """Every array element the scheduler still knows, by element id and by variant name (one query):
    sweep.json records an array the moment sbatch answers, before the variants' manifests name it."""
    manifest = folder.manifest()
    states = sweep_executor(folder).array_states(sorted({a.id for a in manifest.arrays}))
    for array in manifest.arrays:
        for index, name in enumerate(array.members):
            state = states.get(f"{array.id}_{index}")
            if state and state[0] not in TERMINAL_STATES:
                states[f"variant:{name}"] = state
    return states


def to_submit(planned: list[Planned], states: dict[str, tuple[str, str]]) -> tuple[list[tuple[Planned, list[Stage]]], list[str]]:
    """(variant, its stages still to do) for each variant to submit; and a line for each left as it is.
    `states`: live_elements (the sweep's queued and running array elements)."""
    todo, kept = [], []
    for p in planned:
        manifest = p.run.manifest()
        if manifest.state == State.COMPLETED:
            kept.append(f"{p.variant.name}: complete, kept")
            continue
        if manifest.state == State.PRUNED:
            kept.append(f"{p.variant.name}: pruned at a halving rung, kept as it stopped")
            continue
        if f"variant:{p.variant.name}" in states or job_active(p.run, states):
            kept.append(f"{p.variant.name}: {manifest.state}, its job is still queued or running; left alone")
            continue
        stages = stages_to_do(p.recipe, p.run)
        if stages:
            todo.append((p, stages))
    return todo, kept


def submit_arrays(
    executor: Executor, folder: SweepDir, todo: list[tuple[Planned, list[Stage]]], parallel: int, console: Console
) -> int:
    """One array per stage for each group of variants with the same stages and resources, split at the
    cluster's MaxArraySize; element i of a later stage waits for element i of the one before (aftercorr)."""
    groups: dict[str, list[tuple[Planned, list[Stage]]]] = {}
    for p, stages in todo:
        shape = [(s.name, replace(s.resources, name="", requeue_run=None)) for s in stages]
        groups.setdefault(repr(shape), []).append((p, stages))
    size, arrays = executor.array_limit(), 0
    for members in groups.values():
        for start in range(0, len(members), size):
            arrays += submit_chain(executor, folder, members[start : start + size], parallel, console)
    return arrays


def submit_chain(
    executor: Executor, folder: SweepDir, members: list[tuple[Planned, list[Stage]]], parallel: int, console: Console
) -> int:
    first = members[0][0]
    number = len(folder.manifest().arrays)
    runs = [p.run for p, _ in members]
    write_members(folder.members_file(number), runs)
    for p, stages in members:
        if stages[0].name == "train":
            lifecycle.training(p.run)
        else:
            lifecycle.relaunched_after_training(p.run)
    after = None
    for position, stage in enumerate(members[0][1]):
        resources = replace(
            stage.resources,
            name=f"{first.recipe.name}-sweep" + ("" if stage.name == "train" else f"-{stage.name}"),
            requeue_run=str(folder.members_file(number).resolve()) if stage.name == "train" else None,
        )
        jobs = executor.submit_array([stages[position].body for _, stages in members], resources, parallel, after)
        array_id = jobs[0].id.split("_")[0]
        folder.add_array(
            ArrayRecord(id=array_id, stage=stage.name, members=[p.variant.name for p, _ in members], submitted=now(), after=after)
        )
        console.print(
            f"submitted {stage.name} array {array_id} ({len(jobs)} variants, at most {parallel} at once"
            + (f", each after its element of {after})" if after else ")"),
            highlight=False,
        )
        for (p, _), job in zip(members, jobs):
            record_job(p.run, job.record, first_of_chain=position == 0)
        after = array_id
    return len(members[0][1])


def record_job(run: RunDir, record, first_of_chain: bool) -> None:
    """The element's job in its variant's manifest, as a single run records its jobs: training in jobs,
    the stages after it in chain (a new chain starts with the chain's first job)."""
    with run.editing_manifest() as manifest:
        if record.stage == "train":
            manifest.jobs.append(record)
            manifest.chain = []
        elif first_of_chain:
            manifest.chain = [record]
        else:
            manifest.chain.append(record)


def run_locally(todo: list[tuple[Planned, list[Stage]]], console: Console) -> list[str]:
    """Locally: the variants one after another, each followed to its end (Ctrl-C stops the one running,
    which saves a checkpoint; the same command resumes it). Returns the names of those that failed."""
    failed = []
    for number, (p, _) in enumerate(todo, 1):
        console.rule(f"variant {number}/{len(todo)}: {p.variant.name}")
        with run_dir_in_use(p.run.root, f"launch sweep ({p.variant.name})") as root:
            if not execute(p.recipe, RunDir(root), console, executor_name="local"):
                failed.append(p.variant.name)
                if RunDir(root).manifest().state == State.CANCELLED:  # launch cancel SWEEP: the rest waits too
                    console.print("cancelled: the sweep stops here; the same command goes on with what is left")
                    break
    return failed


def sweep_executor(folder: SweepDir) -> Executor:
    """The executor the sweep was submitted with (its first variant's recipe gives the cluster's settings)."""
    manifest = folder.manifest()
    first = folder.run(manifest.variants[0].run_dir)
    return make_executor(manifest.executor, first.load_recipe(), folder.logs)


def cancel_sweep(folder: SweepDir, console: Console) -> int:
    """End every element of the sweep's arrays (one call), and any other job of a variant; mark the variants it ended cancelled."""
    manifest = folder.manifest()
    executor = sweep_executor(folder)
    arrays = sorted({a.id for a in manifest.arrays})
    states = executor.array_states(arrays)
    live = [run for _, run in folder.runs() if run.manifest_path.is_file() and job_active(run, states)]
    if not live:
        raise UserError(f"{folder.root}: no queued or running variant to cancel")
    if arrays:
        executor.cancel_arrays(arrays)
    for run in live:
        for record in job_records(run):
            if record.id not in states and job_of(record, run.logs).active():  # a job of its own, not an array's element
                job_of(record, run.logs).cancel()
        lifecycle.cancelled(run)
        console.print(f"cancelled {run.root.name}", highlight=False)
    return 0


def job_records(run: RunDir) -> list:
    """The variant's newest training job and the jobs chained after it."""
    manifest = run.manifest()
    return manifest.jobs[-1:] + manifest.chain


def job_active(run: RunDir, states: dict[str, tuple[str, str]]) -> bool:
    records = job_records(run)
    for record in records:
        if record.id in states:  # an array's element the scheduler still knows
            if states[record.id][0] not in TERMINAL_STATES:
                return True
        elif not in_array(record) and job_of(record, run.logs).active():
            return True
    return False


def in_array(record) -> bool:
    """An element of a sweep's array (the scheduler has forgotten it when it is not in the array's states):
    only arrays record their folder."""
    return record.folder is not None


def variant_state(run: RunDir, states: dict[str, tuple[str, str]]) -> tuple[str, str, str]:
    """(state, job id, why it waits) of one variant: its manifest's state, and its scheduler state
    while one of its jobs is queued."""
    manifest = run.manifest()
    records = job_records(run)
    for record in records:
        if record.id in states:
            state, reason = states[record.id]
            if state == "PENDING":
                return "pending" + (f" ({record.stage})" if record.stage != "train" else ""), record.id, reason
            return str(manifest.state), record.id, ""
    state = str(manifest.state)
    if State(state) in lifecycle.TRAINING_NOW and not job_active(run, states):  # scancelled, or a node died
        state += ", its job ended (the same sweep command resumes it)"
    return state, records[-1].id if records else "", ""


def run_sweep(
    recipe_path: Path,
    grid_flags: list[str],
    overrides: list[str],
    console: Console,
    executor_name: str = "auto",
    sweep_dir: Path | None = None,
    dry_run: bool = False,
    yes: bool = False,
) -> int:
    """`launch sweep`: plan, check, render and submit every variant not complete yet."""
    sweep, planned, root = plan_sweep(recipe_path, grid_flags, overrides, yes)
    folder = SweepDir(sweep_dir or root)
    if RunDir(folder.root).manifest_path.is_file():
        raise UserError(f"{folder.root}: is a run dir (of `launch {recipe_path}`), not a sweep's; pass --sweep-dir DIR")
    planned = at(planned, folder.root)
    refuse_changed_runs(planned)
    executor = choose_executor(executor_name, planned[0].recipe, rendering_only=dry_run)
    if sweep.strategy == "halving":
        refuse_unfit_for_halving(planned, sweep, executor)
    if not dry_run:
        checks = preflight_sweep(planned, console)
        console.print(f"pre-flight: {len(planned)} variants valid ({checks} distinct checks)", highlight=False)
    record_sweep(folder, recipe_path, overrides, sweep, planned, executor)
    render_variants(planned)
    console.print(
        f"sweep {folder.root}: {len(planned)} variants rendered ({', '.join(p.variant.name for p in planned[:4])}{', ...' if len(planned) > 4 else ''})",
        highlight=False,
    )
    if dry_run:
        return describe_sweep_dry_run(folder, planned, sweep, executor, console)
    if sweep.strategy == "halving":
        return run_halving(folder, planned, sweep, console)
    todo, kept = to_submit(planned, live_elements(folder))
    for line in kept:
        console.print(f"  {line}", highlight=False)
    if not todo:
        console.print("nothing to submit: every variant is complete or still queued", highlight=False)
        return finish_report(folder, console)
    arrays = make_executor(executor, todo[0][0].recipe, folder.logs)
    if arrays.runs_arrays:
        refuse_what_the_scheduler_would_not_run(arrays, todo[0][1])
        submit_arrays(arrays, folder, todo, sweep.max_parallel, console)
        console.print(
            f"the arrays go on without this process; follow: launch status {folder.root}  |  compare: launch report "
            f"{folder.root}  |  end: launch cancel {folder.root} (or one: launch cancel {folder.root}/VARIANT)",
            highlight=False,
        )
        return 0
    failed = run_locally(todo, console)
    code = finish_report(folder, console)
    if failed:
        console.print(f"[red]{len(failed)} variants did not finish[/red]: {', '.join(failed)}; the same command resumes them")
        return 1
    return code


def describe_sweep_dry_run(folder: SweepDir, planned: list[Planned], sweep: SweepSection, executor: str, console: Console) -> int:
    """--dry-run: every variant's run dir is rendered; on SLURM the training array's script too."""
    first = planned[0]
    arrays = make_executor(executor, first.recipe, folder.logs)
    if arrays.runs_arrays:
        resources = replace(
            stages_to_do(first.recipe, first.run)[0].resources,
            name=f"{first.recipe.name}-sweep",
            requeue_run=str(folder.members_file(len(folder.manifest().arrays)).resolve()),
        )
        count = min(len(planned), arrays.array_limit())
        script = arrays.array_script(resources, count, sweep.max_parallel)
        write_atomic(folder.array_script, script)
        arrays = -(-len(planned) // count)
        console.print(
            f"would submit {folder.array_script} ({arrays} array(s) of up to {count} elements, at most {sweep.max_parallel} at once)",
            highlight=False,
        )
    else:
        console.print(f"would run the {len(planned)} variants one after another on this machine", highlight=False)
    return 0


def sweep_rows(folder: SweepDir) -> list[VariantRow]:
    """One row per variant, its scheduler state from one squeue call over the whole sweep."""
    states = sweep_executor(folder).array_states(sorted({a.id for a in folder.manifest().arrays}))
    rows = []
    for variant, run in folder.runs():
        if not run.manifest_path.is_file():
            rows.append(variant_row(variant, run))
            continue
        state, job, waiting = variant_state(run, states)
        rows.append(variant_row(variant, run, state, job, waiting))
    return rows


def finish_report(folder: SweepDir, console: Console) -> int:
    """The comparison: report.html written, the best variant recorded in sweep.json and named."""
    manifest = folder.manifest()
    rows = sweep_rows(folder)
    best = publish_comparison(folder, rows)
    path = folder.report_html
    console.print(status_table(rows, best, manifest.metric))
    for record in manifest.rungs:
        console.print(rung_line(record), highlight=False)
    if best:
        console.print(
            f"best: {best.variant} (held-out {best.metric} {best.value:.4g}, {best.mode}); run dir {folder.run(best.variant).root}",
            highlight=False,
        )
    console.print(f"report: {path}  |  tensorboard --logdir {folder.root}", highlight=False)
    return 0


def status_table(rows: list[VariantRow], best, metric: str) -> Table:
    """The terminal's table: one line per variant, the sweep's metric only."""
    lines = table(rows, best, compact_metric=metric)
    shown = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    for number, name in enumerate(lines[0]):
        shown.add_column(name, justify="left" if number == 0 else "right", overflow="fold")
    for line in lines[1:]:
        shown.add_row(*line)
    return shown


def sweep_summary(folder: SweepDir) -> str:
    """One line for `launch status` over runs/: how many variants stand where, and the best so far."""
    manifest = folder.manifest()
    counts: dict[str, int] = {}
    for _, run in folder.runs():
        state = str(run.manifest().state) if run.manifest_path.is_file() else "not rendered"
        counts[state] = counts.get(state, 0) + 1
    states = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    best = f"; best {manifest.best.variant} ({manifest.best.metric} {manifest.best.value:.4g})" if manifest.best else ""
    return f"{folder.root}: sweep of {len(manifest.variants)} variants: {states}{best}; launch status {folder.root}"


def refuse_unfit_for_halving(planned: list[Planned], sweep: SweepSection, executor: str) -> None:
    if make_executor(executor, planned[0].recipe, Path()).runs_arrays:
        raise UserError(
            'sweep.strategy = "halving" runs its variants on this machine for now (a rung waits for every variant); '
            'use --executor local, or strategy = "all" for job arrays'
        )
    short = [p for p in planned if p.recipe.train.max_steps <= sweep.rungs[-1]]
    if short:
        raise UserError(
            f"variant {short[0].variant.name}: train.max_steps = {short[0].recipe.train.max_steps} does not reach past the "
            f"last halving rung (step {sweep.rungs[-1]}); set train.max_steps above it"
        )


def run_halving(folder: SweepDir, planned: list[Planned], sweep: SweepSection, console: Console) -> int:
    """Successive halving: every variant still in trains to the rung's step and pauses there (a complete
    checkpoint); their held-out losses there are compared and the worse half is pruned; after the last
    rung the rest train to their end. A rung decided before (sweep.json) is not decided again."""
    alive = [p for p in planned if p.run.manifest().state not in (State.PRUNED, State.COMPLETED)]
    done = [p for p in planned if p.run.manifest().state == State.COMPLETED]
    for step in sweep.rungs:
        record = next((r for r in folder.manifest().rungs if r.step == step), None)
        if record is None and alive:
            record = decide_rung(folder, alive, step, {p.variant.name: rung_loss(p, step, console) for p in alive}, console)
        if record is not None:
            alive = [p for p in alive if p.variant.name in record.kept]
    for p in alive:
        p.run.pause_at(None)
    stopped = [p for p in planned if p.run.manifest().state == State.PRUNED]
    todo, kept = to_submit(alive + done + stopped, {})
    for line in kept:
        console.print(f"  {line}", highlight=False)
    failed = run_locally(todo, console)
    code = finish_report(folder, console)
    return 1 if failed else code


def rung_loss(p: Planned, step: int, console: Console) -> float | None:
    """The variant's held-out loss at checkpoint-`step`, trained there first if need be (None: it failed)."""
    checkpoint = p.run.checkpoint(step)
    if not is_complete(checkpoint):
        p.run.pause_at(step)
        console.rule(f"rung step {step}: {p.variant.name}")
        with run_dir_in_use(p.run.root, f"launch sweep ({p.variant.name}, rung {step})") as root:
            if not execute(p.recipe, RunDir(root), console, executor_name="local", training_only=True):
                return None
    if not is_complete(checkpoint):
        return None
    name = f"checkpoint-{step}"
    out = p.run.rung_eval(step)
    plan_evaluation(p.recipe, [System(name=name, adapter=str(checkpoint.resolve()))], out)
    result = run_evaluation(p.recipe, out, "local", console)
    return None if result is None else result.systems[name].get("loss")


def decide_rung(
    folder: SweepDir, alive: list[Planned], step: int, losses: dict[str, float | None], console: Console
) -> RungRecord:
    """The better half (rounded up) by held-out loss goes on; the rest is pruned, and what they would
    have cost from here to their end is what the rung saved."""
    ranked = sorted(alive, key=lambda p: (losses[p.variant.name] is None, losses[p.variant.name] or 0.0))
    keep = ranked[: (len(ranked) + 1) // 2]
    pruned = [p for p in ranked if p not in keep]
    saved = 0.0
    for p in pruned:
        if p.run.manifest().state == State.PAUSED:
            lifecycle.pruned(p.run)
        saved += remaining_device_hours(p, step)
    record = RungRecord(
        step=step,
        losses={name: loss for name, loss in losses.items() if loss is not None},
        kept=[p.variant.name for p in keep],
        pruned=[p.variant.name for p in pruned],
        saved_device_hours=saved,
    )
    folder.add_rung(record)
    console.print(rung_line(record), highlight=False)
    return record


def remaining_device_hours(p: Planned, step: int) -> float:
    """Device-hours the variant would have trained from `step` to its last step, at its own measured pace."""
    rows = p.run.metrics.rows()
    if len(rows) < 2 or rows[-1]["step"] == rows[0]["step"]:
        return 0.0
    per_step = (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])
    _, devices = devices_of(p.recipe)
    return max(p.recipe.train.max_steps - step, 0) * per_step * devices / 3600

"""The one flow: recipe -> run dir -> train -> merge -> eval -> summary. Each finished stage is skipped on a re-run."""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from launcher.recipe import PROMPT_FAMILY, Recipe, RecipeError
from launcher.render import render_run, worker_command
from launcher.runs import RunDir, claim_run_dir


def prepare(recipe: Recipe, run_dir: Path, console: Console, resume: str = "auto") -> RunDir:
    """Claim (or find again) the run dir and write the rendered files into it."""
    run = RunDir(run_dir)
    existed = run.manifest_path.exists()
    if existed and resume == "never":
        raise RecipeError([f"--resume never: {run.root} holds a run already; pass a new --run-dir to start over"])
    changes = claim_run_dir(run, recipe)
    render_run(recipe, run)
    if existed:
        console.print(f"run dir {run.root} exists with this recipe: continuing it (state: {run.read_manifest().get('state')})",
                      highlight=False)
    for change in changes:
        console.print(f"  recipe changed since the last launch: {change}", highlight=False)
    if resume not in ("auto", "never"):
        rewind(run, Path(resume), console)
    return run


def rewind(run: RunDir, checkpoint: Path, console: Console) -> None:
    """--resume PATH: resume from an older complete checkpoint; newer results are kept, renamed."""
    from launcher.checkpoints import is_complete, rewind_to
    from launcher.runs import archive

    checkpoint = checkpoint.resolve()
    if checkpoint.parent != run.checkpoints.resolve() or not is_complete(checkpoint):
        raise RecipeError([f"--resume {checkpoint}: not a complete checkpoint of {run.root}; "
                           f"pick one of {run.checkpoints}/checkpoint-N with a completion marker"])
    for moved in rewind_to(checkpoint):
        console.print(f"  newer checkpoint kept as {moved}", highlight=False)
    archive(run, [run.adapter, run.merged, run.eval])  # they belong to the later history


def describe_dry_run(run: RunDir, console: Console, executor: str = "local") -> None:
    console.print(f"rendered into {run.root}:", highlight=False)
    files = [run.recipe, run.accelerate_config, run.deepspeed_config, run.manifest_path]
    for path in files + ([run.root / "sbatch.sh"] if executor == "slurm" else []):
        console.print(f"  {path}", highlight=False)
    if executor == "slurm":
        console.print(f"would submit {run.root / 'sbatch.sh'} with sbatch (through submitit)", highlight=False)
    else:
        console.print("workers would start with:\n  " + " ".join(worker_command(run)), highlight=False)


def execute(recipe: Recipe, run: RunDir, console: Console, executor: str = "local", detach: bool = False) -> bool:
    """Train (unless the adapter exists already), merge, evaluate; True on success.

    The job itself merges and evaluates on rank 0 when training ends (so a detached SLURM job
    finishes on its own); `finish` here only does what is still missing.
    """
    started = time.time()
    if not run.adapter.exists():
        run.set_state("training")
        if executor == "slurm":
            from launcher.executors.slurm import train_slurm

            ok = train_slurm(recipe, run, console, detach=detach)
        else:
            from launcher.executors.local import train_local

            ok = train_local(recipe, run, console)
        if not ok:
            run.set_state("failed")
            return False
        if detach:
            return True
        run.update_manifest(train_wall_s=round(time.time() - started, 1), **first_step_latency(run, started))
    finish(recipe, run, console)
    run.update_manifest(wall_s=round(time.time() - started, 1))
    print_summary(recipe, run, console, time.time() - started)
    return True


def finish(recipe: Recipe, run: RunDir, console: Console | None = None) -> None:
    """Merge and evaluate, each only when enabled and not done yet; then the run is completed."""
    from launcher.evaluate import evaluate_run
    from launcher.merge import merge_run
    from launcher.models import quiet_libraries_for

    console = console or Console(highlight=False)
    quiet_libraries_for(recipe)
    if recipe.merge.enabled and recipe.peft.method in PROMPT_FAMILY:
        console.print(f"not merged: {recipe.peft.method} learns virtual tokens, not weight deltas, so there is "
                      f"nothing to merge; the adapter in {run.adapter} is the export (load it with PeftModel)")
    elif recipe.merge.enabled and not run.merged.exists():
        with console.status("merging the adapter into the base model"):
            merge_run(recipe, run)
        run.set_state("merged")
    if recipe.eval.enabled and not (run.eval / "metrics.json").exists():
        with console.status(f"evaluating base and adapter ({recipe.eval.shards} shards)"):
            evaluate_run(recipe, run)
        run.set_state("evaluated")
    run.set_state("completed")


def chained_stages(recipe: Recipe) -> list[str]:
    """The stages that run as their own SLURM jobs after training (afterok), in order."""
    merge = recipe.merge.enabled and recipe.peft.method not in PROMPT_FAMILY
    return (["merge"] if merge else []) + (["eval"] if recipe.eval.enabled else [])


def run_stage(run_dir: Path, stage: str, shard: int = 0) -> None:
    """One chained stage in its SLURM job: the merge, or one eval shard (one SLURM task each).
    The eval's plan is written by whichever task comes first (under a lock; the others find it),
    and the task that finishes the last shard writes the results."""
    import fcntl

    from launcher.cli import load_run_recipe
    from launcher.evaluate import plan_evaluation, run_shard, systems_of
    from launcher.merge import merge_run, validate_adapter
    from launcher.models import quiet_libraries_for

    recipe, run = load_run_recipe(run_dir), RunDir(run_dir)
    quiet_libraries_for(recipe)
    if stage == "merge":
        if not run.merged.exists():
            merge_run(recipe, run)
        print(f"merged model: {run.merged} (peak RSS {run.read_manifest().get('merge', {}).get('peak_rss_mib')} MiB)")
        run.set_state("merged")
        return
    validate_adapter(run.adapter)
    with open(run.root / ".eval-plan.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run.eval / "metrics.json").exists():
            plan_evaluation(recipe, systems_of([run], [], recipe.eval.checkpoints), run.eval, runs=[run])
    run_shard(run.eval, shard)
    print(f"eval shard {shard} of {recipe.eval.shards}: done")
    if (run.eval / "metrics.json").exists():
        print(f"report: {run.eval / 'report.html'}")
        run.set_state("completed")


def first_step_latency(run: RunDir, started: float) -> dict:
    if not run.metrics_log.exists():
        return {}
    first = json.loads(run.metrics_log.read_text().splitlines()[0])
    return {"launch_to_first_step_s": round(first["time"] - started, 1)}


def print_summary(recipe: Recipe, run: RunDir, console: Console, wall_s: float) -> None:
    console.print(f"\n[bold green]done[/bold green] in {wall_s:.0f} s — run dir {run.root}", highlight=False)
    console.print(f"  adapter: {run.adapter}", highlight=False)
    if run.merged.exists():
        console.print(f"  merged:  {run.merged}", highlight=False)
    metrics_path = run.eval / "metrics.json"
    if metrics_path.exists():
        console.print(f"  report:  {run.eval / 'report.html'}", highlight=False)
        console.print(metrics_table(json.loads(metrics_path.read_text())))


def metrics_table(result: dict) -> Table:
    from launcher.report import table_rows

    rows = table_rows(result)
    table = Table(title=f"evaluation on {result['examples']} examples ({result['data']})")
    for number, name in enumerate(rows[0]):
        table.add_column(name, justify="left" if number == 0 else "right")
    for row in rows[1:]:
        table.add_row(*row)
    return table

"""The one flow: recipe -> run dir -> train -> merge -> eval -> summary.

This module alone knows the order of the stages. It hands the stages that are still to do, as
job bodies with their resources, to one executor: each waits for the one before it (locally
they run as their own processes one after another; on SLURM they are an afterok chain, which
finishes on its own after a detached launch).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from launcher.config.recipe import Recipe, minutes
from launcher.errors import UserError
from launcher.evaluate.plan import unfinished
from launcher.evaluate.report import summary_lines, table_rows
from launcher.evaluate.results import finish_if_complete
from launcher.launch.executors.base import CANCELLED, COMPLETED, Executor, Job, Resources
from launcher.launch.executors.factory import job_of, make_executor
from launcher.launch.jobs import EvalJob, MergeJob, TrainJob
from launcher.launch.progress import StateWatcher, follow_training, print_tail, report_failure
from launcher.launch.render import keep_or_refuse, render_run, worker_command
from launcher.rundir import lifecycle
from launcher.rundir.checkpoints import checkpoint_step, is_complete, latest_complete_checkpoint, rewind_to, step_of
from launcher.rundir.evaldir import EvalDir, EvalResults
from launcher.rundir.files import write_atomic
from launcher.rundir.runs import RunDir, State, archive, claim_run_dir, in_use, make_run_root
from launcher.tracking.trackers import dashboard_commands


@contextmanager
def run_dir_in_use(root: Path, command: str, create: bool = True):
    """The run dir for `command` alone: refused at once while another command works in it (its lock)
    or a job recorded in its manifest still runs (a detached SLURM chain, ranks still saving)."""

    root = Path(root)
    if create:
        make_run_root(root)
    with in_use(root, command):
        run = RunDir(root)
        if run.manifest_path.is_file():
            manifest = run.manifest()
            for record in manifest.jobs[-1:] + manifest.chain:
                job = job_of(record, run.logs)
                if job.active():
                    raise UserError(
                        f"{root}: is in use by {record.stage} job {job.id} ({job.describe()}); follow it with "
                        f"launch status {root}, or end it with launch cancel {root}"
                    )
        yield root


@dataclass(frozen=True)
class Stage:
    name: str
    body: object
    resources: Resources


def prepare(recipe: Recipe, run_dir: Path, console: Console, executor: Executor, resume: str = "auto") -> RunDir:
    """Claim (or find again) the run dir and write the rendered files into it (sbatch.sh too, when
    the executor submits a script)."""
    run = RunDir(run_dir)
    existed = run.manifest_path.exists()
    if existed and resume == "never":
        raise UserError(f"--resume never: {run.root} holds a run already; pass a new --run-dir to start over")
    changes = claim_run_dir(run, recipe)
    try:
        render_run(recipe, run)
        write_submission_script(recipe, run, executor)
    except OSError as err:
        raise UserError(
            f"{err.filename or run.root}: cannot write the run dir ({err.strerror}); choose another --run-dir"
        ) from None
    if run.manifest().worker_command != worker_command(run):  # the run dir was moved: files rendered again
        run.update_manifest(worker_command=worker_command(run))
    if existed:
        console.print(
            f"run dir {run.root} exists with this recipe: continuing it (state: {run.manifest().state})", highlight=False
        )
    for change in changes:
        console.print(f"  recipe changed since the last launch: {change}", highlight=False)
    if resume not in ("auto", "never"):
        rewind(run, Path(resume), console)
    return run


def rewind(run: RunDir, checkpoint: Path, console: Console) -> None:
    """--resume PATH: resume from an older complete checkpoint; newer results are kept, renamed."""

    checkpoint = checkpoint.resolve()
    if checkpoint.parent != run.checkpoints.resolve() or not is_complete(checkpoint):
        raise UserError(
            f"--resume {checkpoint}: not a complete checkpoint of {run.root}; "
            f"pick one of {run.checkpoints}/checkpoint-N with a completion marker"
        )
    for moved in rewind_to(checkpoint):
        console.print(f"  newer checkpoint kept as {moved}", highlight=False)
    later = [path for path in run.checkpoint_outputs() if checkpoint_step(path.name) > step_of(checkpoint)]
    archive(run, [run.adapter, run.merged, run.eval, *later])  # they belong to the later history


def stages_to_do(recipe: Recipe, run: RunDir) -> list[Stage]:
    """train -> merge -> eval, leaving out what is disabled or done; the last one completes the run."""
    root = str(run.root.resolve())
    merges = recipe.merge.enabled and recipe.peft.spec.merges
    todo = [
        name
        for name, needed in (
            ("train", not run.adapter.exists()),
            ("merge", merges and not run.merged.exists()),
            ("eval", recipe.eval.enabled and not run.evaluation.metrics.exists()),
        )
        if needed
    ]
    stages = []
    for name in todo:
        last = name == todo[-1]
        if name == "train":
            body = TrainJob(root, last_stage=last)
        elif name == "merge":
            body = MergeJob(root, last_stage=last)
        else:
            body = EvalJob(str(run.eval.resolve()), run_dir=root, last_stage=last)
        stages.append(Stage(name, body, stage_resources(recipe, name, run)))
    return stages


def stage_resources(recipe: Recipe, stage: str, run: RunDir | None = None) -> Resources:
    """Training: the recipe's topology and [slurm] resources. Merge and eval: one node, their own
    section's time, CPUs, memory (and GPUs for eval), one task per eval shard. Training needs its run:
    on SLURM a crashed or stopped training job is requeued to resume it."""
    if stage == "train":
        s = recipe.slurm
        return Resources(
            name=recipe.name,
            stage=stage,
            nodes=recipe.distributed.nodes,
            tasks_per_node=recipe.distributed.procs_per_node,
            time_minutes=s.time_minutes(),
            cpus_per_task=s.cpus_per_task,
            mem=s.mem,
            gpus_per_node=s.gpus_per_node,
            all_or_nothing=True,
            requeue_run=str(run.root.resolve()),
        )
    section = recipe.merge if stage == "merge" else recipe.eval
    return Resources(
        name=f"{recipe.name}-{stage}",
        stage=stage,
        time_minutes=minutes(section.time),
        tasks_per_node=recipe.eval.shards if stage == "eval" else 1,
        cpus_per_task=section.cpus_per_task,
        mem=section.mem,
        gpus_per_task=getattr(section, "gpus_per_task", None),
    )


def write_submission_script(recipe: Recipe, run: RunDir, executor: Executor) -> Path | None:
    """sbatch.sh: the training job's script, when the executor submits one; never replaced by another."""

    text = executor.submission_script(stage_resources(recipe, "train", run))
    if text is None:
        return None
    path = run.sbatch
    keep_or_refuse(run, path, text)
    if not path.exists():
        write_atomic(path, text)
    return path


def describe_dry_run(run: RunDir, console: Console, script: Path | None) -> None:
    console.print(f"rendered into {run.root}:", highlight=False)
    for path in [run.recipe, run.accelerate_config, run.deepspeed_config, run.manifest_path] + ([script] if script else []):
        console.print(f"  {path}", highlight=False)
    if script:
        console.print(f"would submit {script} with sbatch (through submitit)", highlight=False)
    else:
        console.print("workers would start with:\n  " + " ".join(worker_command(run)), highlight=False)


def execute(
    recipe: Recipe, run: RunDir, console: Console, executor_name: str = "local", detach: bool = False, training_only: bool = False
) -> bool:
    """Submit the stages still to do, each after the one before (`training_only`: training alone, a
    halving rung's); unless detached, follow them to their end. True on success (or a pause at a rung)."""
    started = time.time()
    executor = make_executor(executor_name, recipe, run.logs)
    if recipe.merge.enabled and not recipe.peft.spec.merges:
        console.print(
            f"not merged: {recipe.peft.method} learns virtual tokens, not weight deltas, so there is "
            f"nothing to merge; the adapter in {run.adapter} is the export (load it with PeftModel)"
        )
    stages = stages_to_do(recipe, run)[:1] if training_only else stages_to_do(recipe, run)
    refuse_what_the_scheduler_would_not_run(executor, stages)
    jobs = submit(executor, stages, run, console)
    if jobs:
        watch = [f"launch status {run.root}", f"launch logs {run.root} -f"] + dashboard_commands(run)
        say(console, "  follow: " + "  |  ".join(watch) + f"  |  end: launch cancel {run.root}")
    if detach and jobs:
        say(console, "detached: the jobs go on without this process")
        return True
    try:
        ok = follow(run, jobs, console)
    except KeyboardInterrupt:
        stop_jobs(executor, jobs, run, console)
        raise
    if not ok:
        for _, job in jobs:
            if job.active():
                job.cancel()
        return False
    if training_only:
        return True
    if jobs and jobs[0][0] == "train":
        first = run.metrics.rows()[:1]
        run.update_manifest(launch_to_first_step_s=round(first[0]["time"] - started, 1) if first else None)
    print_summary(run, console, time.time() - started)
    return True


def refuse_what_the_scheduler_would_not_run(executor: Executor, stages: list[Stage]) -> None:
    """Before anything is queued: a job SLURM would never start (more CPUs, GPUs, memory or time than
    its partition has) is one line now, not a job pending forever."""
    for stage in stages:
        reason = executor.refusal(stage.resources)
        if reason:
            r = stage.resources
            raise UserError(
                [
                    f"slurm: the {stage.name} job ({r.nodes} node(s) x {r.tasks_per_node} task(s)"
                    f"{f', {r.cpus_per_task} CPUs each' if r.cpus_per_task else ''}) cannot run on this cluster "
                    f"(sbatch --test-only: {reason}); ask for less (--nodes, --procs-per-node, slurm.cpus_per_task, "
                    f"slurm.mem, slurm.time) or pick another slurm.partition; nothing was queued"
                ]
            )


STOP_GRACE_S = 120.0  # an interrupted local run: time for the ranks to reach a step boundary and save


def stop_jobs(executor: Executor, jobs: list[tuple[str, Job]], run: RunDir | None, console: Console) -> None:
    """`launch` was interrupted (Ctrl-C, SIGTERM, SIGHUP). Local jobs end with it, none left behind:
    training first saves a checkpoint at its next step (a second interrupt ends it at once).
    SLURM jobs go on without this process."""

    if executor.detachable:
        left = ", ".join(f"{stage} {job.kind} job {job.id} ({job.state().lower()})" for stage, job in jobs if job.active())
        ids = " ".join(job.id for _, job in jobs)
        how = (
            f"follow with `launch status {run.root}`, or end with `launch cancel {run.root}`"
            if run
            else f"end with `scancel {ids}`"
        )
        say(console, f"interrupted: {left or 'no job'} left in the queue, going on without this process; {how}")
        return
    say(
        console,
        "interrupted: stopping the local jobs; training saves a checkpoint at its next step (interrupt again to end it now)",
    )
    try:
        for _, job in jobs:
            job.stop(STOP_GRACE_S)
    except KeyboardInterrupt:
        for _, job in jobs:
            job.cancel()
    if run is None:  # an evaluation: its finished shards are kept
        say(console, "stopped; the same command resumes the evaluation's unfinished shards")
        return
    lifecycle.stopped(run)
    newest = latest_complete_checkpoint(run.checkpoints)
    say(console, f"stopped; newest complete checkpoint: {newest.name if newest else 'none'}; the same command resumes the run")


LOW_DISK_BYTES = 256 * 2**20  # a failed job with less free space than this: the disk is named as the likely cause


def record_failure(run: RunDir, reason: str, console: Console) -> None:
    """State "failed" and why, in the manifest. On a full disk a new file may not fit where the
    old one's blocks do: then the manifest is rewritten in place."""
    import shutil

    free = shutil.disk_usage(run.root).free
    if free < LOW_DISK_BYTES:
        reason += f" (the run dir's file system is full: {free / 2**20:.1f} MiB free; make room and relaunch)"
        say(console, f"[red]disk full[/red]: {free / 2**20:.1f} MiB free where {run.root} is")
    try:
        lifecycle.failed(run, reason)
    except OSError as err:
        say(console, f"could not record the failure in {run.manifest_path} ({err.strerror})")


def say(console: Console, line: str) -> None:
    """Print a line if the terminal is still there (after a hang-up it is not)."""
    with suppress(OSError):
        console.print(line, highlight=False)


def submit(executor: Executor, stages: list[Stage], run: RunDir, console: Console) -> list[tuple[str, Job]]:
    """Queue every stage after the previous one and record the jobs in the manifest."""
    jobs, after = [], None
    if stages and stages[0].name == "train":
        lifecycle.training(run)
    elif stages:
        lifecycle.relaunched_after_training(run)
    for stage in stages:
        job = executor.submit(stage.body, stage.resources, after=after)
        jobs.append((stage.name, job))
        if stage.name == "train":
            r = stage.resources
            console.print(
                f"submitted {job.kind} job {job.id} ({r.nodes} nodes x {r.tasks_per_node} ranks)"
                + (f"; sbatch script: {run.sbatch}" if executor.detachable else ""),
                highlight=False,
            )
        else:
            console.print(
                f"queued {stage.name} as {job.kind} job {job.id}" + (f" (after {after.id} succeeds)" if after else ""),
                highlight=False,
            )
        after = job
    with run.editing_manifest() as manifest:
        train = [job.record for name, job in jobs if name == "train"]
        manifest.jobs += train
        manifest.chain = [job.record for name, job in jobs if name != "train"] if jobs else manifest.chain
    return jobs


def follow(run: RunDir, jobs: list[tuple[str, Job]], console: Console) -> bool:
    """Training with a progress bar, then each later stage; False (with the failed job's log lines)
    when one does not complete."""
    for stage, job in jobs:
        watcher = StateWatcher(job, console)
        if stage == "train":
            follow_training(run, watcher.poll, console)
        else:
            with console.status(f"{stage}: {job.kind} job {job.id}"):
                while watcher.poll():
                    time.sleep(0.5)
        if watcher.state == CANCELLED:
            console.print(f"{stage}: {job.kind} job {job.id} was cancelled (launch cancel); the same command resumes the run")
            return False
        if watcher.state != COMPLETED:
            console.print(
                f"[red]{'training' if stage == 'train' else stage} failed[/red]: {job.kind} job {job.id} ended {watcher.state}",
                highlight=False,
            )
            reason = report_failure(run, console, fallback_log=job.log(0))
            record_failure(run, f"{stage} job {job.id} ended {watcher.state}" + (f": {reason}" if reason else ""), console)
            return False
        if stage == "train" and not run.adapter.exists() and run.manifest().state == State.PAUSED:
            console.print(f"paused at its halving rung, step {run.pause_step()}", highlight=False)
            return True
        if stage == "train" and not run.adapter.exists():
            console.print(
                f"training stopped at a checkpoint (stop signal) before the end; run the same command "
                f"again to resume: launch {run.recipe} --run-dir {run.root}",
                highlight=False,
            )
            return False
    return True


def run_evaluation(recipe: Recipe, out: Path, executor_name: str, console: Console) -> EvalResults | None:
    """`launch eval`: the unfinished shards of the evaluation planned in `out`, one task each, as one
    job; then its metrics (None, said in one red line with the log's tail, when the job failed)."""

    plan = EvalDir(Path(out)).plan()
    todo = sorted({k for k, _ in unfinished(out, plan)})
    if todo:
        done = plan.shards - len(todo)
        console.print(
            f"evaluating {len(todo)} of {plan.shards} shards ({done} done before) with {executor_name}", highlight=False
        )
        executor = make_executor(executor_name, recipe, Path(out) / "logs")
        resources = replace(stage_resources(recipe, "eval"), tasks_per_node=len(todo))
        job = executor.submit(EvalJob(str(Path(out).resolve()), shards=todo), resources)
        watcher = StateWatcher(job, console)
        try:
            with console.status(f"eval: {job.kind} job {job.id}"):
                while watcher.poll():
                    time.sleep(0.5)
        except KeyboardInterrupt:
            stop_jobs(executor, [("eval", job)], None, console)
            raise
        if watcher.state != COMPLETED:  # as a failed stage of `launch run` ends: one red line, the log's tail
            console.print(f"[red]evaluation failed[/red]: {job.kind} job {job.id} ended {watcher.state}", highlight=False)
            if job.log(0).exists():
                print_tail(job.log(0), job.log(0).read_text(errors="replace").splitlines()[-25:], console)
            return None
    result = finish_if_complete(out)
    if result is None:
        console.print(f"[red]evaluation failed[/red]: shards {unfinished(out, plan)} did not finish; see {Path(out) / 'logs'}")
    return result


def print_summary(run: RunDir, console: Console, wall_s: float) -> None:
    console.print(f"\n[bold green]done[/bold green] in {wall_s:.0f} s — run dir {run.root}", highlight=False)
    console.print(f"  adapter: {run.adapter}", highlight=False)
    if run.merged.exists():
        console.print(f"  merged:  {run.merged}", highlight=False)
    result = run.evaluation.results()
    if result is not None:
        console.print(f"  report:  {run.evaluation.report_html}", highlight=False)
        console.print(metrics_table(result))
        convention = result.metrics_convention
        console.print(f"  metrics convention {convention.name} ({convention.why})", highlight=False)
        for line in summary_lines(result):
            console.print(f"  {line}", highlight=False)
    say(console, "  next: " + "  |  ".join(next_commands(run)))


def next_commands(run: RunDir) -> list[str]:
    """What a user does after a run: look at it, read its logs, evaluate it further, load it."""
    commands = [f"launch status {run.root}", f"launch logs {run.root}"] + dashboard_commands(run)
    if run.checkpoints.exists():
        commands.append(f"launch eval {run.root} --checkpoints all (or --data FILE)")
    if run.evaluation.report_html.exists():
        commands.append(f"open {run.evaluation.report_html}")
    return commands + [f"PeftModel.from_pretrained(base, '{run.adapter}')"]


SHORT_HEADERS = {
    "exact_match": "exact",
    "perplexity": "ppl",
    "generated tok/s": "tok/s",
    "preference_accuracy": "pref",
    "reward_accuracy": "reward",
    "reward_margin": "margin",
}  # the report keeps the long ones


def metrics_table(result: EvalResults) -> Table:
    """The end-of-run table, whole in an 80-column terminal and in a log file: short headers, light
    borders, a metric that reads n/a for every system left out (the notes below say why; the report
    keeps it), and a cell too wide folded onto a second line rather than cut to "…"."""
    rows = table_rows(result)
    readable = [i for i in range(len(rows[0])) if any(row[i] != "n/a" for row in rows[1:])]  # all n/a: the notes say why
    rows = [[row[i] for i in readable] for row in rows]
    table = Table(
        title=f"evaluation on {result.examples} examples ({result.data})",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    for number, name in enumerate(rows[0]):
        table.add_column(SHORT_HEADERS.get(name, name), justify="left" if number == 0 else "right", overflow="fold")
    for row in rows[1:]:
        table.add_row(*row)
    return table

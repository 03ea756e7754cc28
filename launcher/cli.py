"""`launch`: argument parsing only; each command calls one stage.

launch RECIPE.toml [--set KEY=VALUE ...] [--run-dir DIR] [--dry-run] [--procs-per-node N]
launch check RECIPE.toml [--set KEY=VALUE ...]
launch merge RUN_DIR [--checkpoint N] [--overwrite]
launch eval RUN_DIR|ADAPTER_DIR ... [--data FILE] [--shards K] [--executor local|slurm] [--checkpoints all] [--benchmark TASK,...]
launch sweep RECIPE.toml [--grid KEY=[V1,V2] ...] [--set KEY=VALUE ...] [--dry-run] [--yes]
launch status [RUN_DIR|SWEEP_DIR]
launch report SWEEP_DIR
launch logs RUN_DIR [--rank N] [-f]
launch cancel RUN_DIR|SWEEP_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from launcher.adapters.combine import METHODS, combine_adapters
from launcher.adapters.merge import merge_into_base, merge_run
from launcher.config.recipe import PATTERN_FORMS, TIME_PATTERN, Recipe, load_recipe
from launcher.config.sweep import CONFIRM_ABOVE
from launcher.data.examples import read_training_set
from launcher.errors import Interrupted, UserError
from launcher.evaluate.plan import plan_evaluation, systems_of
from launcher.evaluate.report import summary_lines
from launcher.launch.executors.factory import NAMES as EXECUTOR_NAMES
from launcher.launch.executors.factory import choose_executor, job_of, make_executor, queues_jobs
from launcher.launch.pipeline import describe_dry_run, execute, metrics_table, prepare, run_dir_in_use, run_evaluation
from launcher.launch.preflight import gpu_request_warning, run_preflight
from launcher.launch.progress import percent, rewards
from launcher.launch.render import render_deepspeed, zero_stage
from launcher.launch.serving import serve_run
from launcher.launch.sweeping import cancel_sweep, finish_report, run_sweep, status_table, sweep_rows, sweep_summary
from launcher.models.loading import quiet_libraries_for
from launcher.rundir import lifecycle
from launcher.rundir.checkpoints import latest_complete_checkpoint
from launcher.rundir.evaldir import EvalDir
from launcher.rundir.runs import RunDir, default_run_dir, run_dirs_under, unused_name
from launcher.rundir.sweepdir import SweepDir, sweep_dirs_under
from launcher.tracking.trackers import dashboard_commands

COMMANDS = ("run", "sweep", "check", "merge", "eval", "serve", "status", "report", "logs", "cancel")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")  # `launch RECIPE.toml` means `launch run RECIPE.toml`
    args = build_parser().parse_args(argv)
    if not getattr(args, "handler", None):
        build_parser().print_help()
        return 2
    console = Console(highlight=False, soft_wrap=True)
    # Library notices nobody can act on stay out of the terminal (the job logs keep them), e.g.
    # bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" on every CPU import.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        with interrupted_by_signals():
            return args.handler(args, console)
    except UserError as err:
        for line in err.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        signum = interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT
        with suppress(OSError):  # after a hang-up the terminal is gone
            print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


@contextmanager
def interrupted_by_signals():
    """While a command runs, SIGTERM and SIGHUP (the terminal closing) interrupt it as Ctrl-C does:
    whatever it started is stopped before it ends (launch's local ranks save a checkpoint first).
    The previous handlers come back afterwards (main() may run inside another program)."""

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:  # under nohup a hang-up stays ignored
            signal.signal(number, interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch",
        description="Validate, render, train, merge and evaluate a PEFT fine-tuning recipe.",
        epilog="`launch RECIPE.toml ...` is short for `launch run RECIPE.toml ...`. "
        "Run `launch COMMAND --help` for each command's options.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="train a recipe end to end (the default command)",
        description="Render the run dir, train on every rank, then merge and evaluate. "
        "Re-running on an existing run dir continues it.",
    )
    add_recipe_arguments(run)
    run.add_argument("--run-dir", type=Path, help="where the run writes (default: runs/<recipe name>)")
    run.add_argument("--dry-run", action="store_true", help="write the rendered files, print where, and stop")
    run.add_argument(
        "--executor",
        choices=["auto", *EXECUTOR_NAMES],
        default="auto",
        help="where the ranks run (auto: SLURM when sbatch answers and a partition is known, else local)",
    )
    run.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|CHECKPOINT",
        help="auto: continue an existing run from its newest complete checkpoint (default); never: "
        "refuse to reuse a run dir; CHECKPOINT: continue from that one (newer results are kept, renamed)",
    )
    run.add_argument("--detach", action="store_true", help="with SLURM: return after submitting instead of following the job")
    add_topology_arguments(run)
    run.set_defaults(handler=command_run)

    sweep = commands.add_parser(
        "sweep",
        help="run a recipe's variants (a grid, a list, a random search) as one SLURM job array per stage",
        description="Expand the recipe's [sweep] table and --grid flags into variants, validate and pre-flight every "
        "one, render each into its run dir under runs/<name>/<variant>/, and submit them as one job array per stage "
        "(locally: one after another). Re-running it submits only the variants that are not complete.",
    )
    add_recipe_arguments(sweep)
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=[V1,V2]",
        help="sweep KEY over these values (TOML), crossed with the other --grid keys (repeatable)",
    )
    sweep.add_argument("--sweep-dir", type=Path, help="where the variants' run dirs go (default: runs/<recipe name>)")
    sweep.add_argument("--dry-run", action="store_true", help="render every variant and the array script, and stop")
    sweep.add_argument("--yes", action="store_true", help=f"queue more than {CONFIRM_ABOVE:,} variants")
    sweep.add_argument("--executor", choices=["auto", *EXECUTOR_NAMES], default="auto", help="SLURM arrays or local runs")
    add_topology_arguments(sweep)
    sweep.set_defaults(handler=command_sweep)

    report = commands.add_parser(
        "report",
        help="compare a sweep's variants (SWEEP/report.html)",
        description="One table of the variants' held-out metrics and cost, their loss curves overlaid, the best marked.",
    )
    report.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    report.set_defaults(handler=command_report)

    check = commands.add_parser(
        "check",
        help="validate a recipe and run the pre-flight checks, running nothing",
        description="Validate the recipe, read its data, build the model on the meta device "
        "(no weights) and check target modules, the method's compatibility, the "
        "batch arithmetic and the per-device memory estimate.",
    )
    add_recipe_arguments(check)
    check.add_argument(
        "--show-samples",
        type=int,
        default=0,
        metavar="N",
        help="print N tokenized training samples with the masked (not trained) part marked",
    )
    add_topology_arguments(check)
    check.set_defaults(handler=command_check)

    merge = commands.add_parser(
        "merge",
        help="merge the final adapter into the base model (RUN_DIR/merged)",
        description="Re-run the merge of a finished run: stream the base model's shards "
        "and add the adapter's deltas (RUN_DIR/merged).",
    )
    merge.add_argument("run_dir", type=Path, metavar="RUN_DIR", nargs="?")
    merge.add_argument("--overwrite", action="store_true", help="replace the existing output")
    merge.add_argument(
        "--checkpoint",
        type=int,
        metavar="N",
        help="merge the adapter of the complete checkpoint checkpoints/checkpoint-N into "
        "RUN_DIR/merged-checkpoint-N instead of the final adapter",
    )
    merge.add_argument(
        "--adapters",
        type=Path,
        nargs="+",
        metavar="RUN_DIR|ADAPTER_DIR",
        help="combine these LoRA adapters (same base) into one, written to --out",
    )
    merge.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per adapter, e.g. 0.6 0.4")
    merge.add_argument(
        "--method",
        default="cat",
        choices=METHODS,
        help="PEFT's combination: cat (default) and svd are exact, linear/ties/dare_* approximate",
    )
    merge.add_argument("--density", type=float, help="fraction of each delta kept by ties, dare_* and magnitude_prune")
    merge.add_argument("--out", type=Path, metavar="DIR", help="where the combined adapter goes (with --adapters)")
    merge.add_argument(
        "--recipe", type=Path, metavar="RECIPE.toml", help="the base model's recipe, for adapter folders outside any run dir"
    )
    merge.add_argument(
        "--into-base",
        action="store_true",
        help="with --adapters: also stream-merge the combined adapter into the base model (DIR-merged)",
    )
    merge.set_defaults(handler=command_merge)

    evaluation = commands.add_parser(
        "eval",
        help="batch-evaluate the base model and adapters side by side (RUN_DIR/eval)",
        description="Batched generation and reference loss for the base model and each adapter or checkpoint, "
        "sharded over processes or SLURM tasks; a re-run resumes the unfinished shards. Writes "
        "predictions.jsonl, metrics.json, report.md and report.html.",
    )
    evaluation.add_argument(
        "targets",
        type=Path,
        nargs="+",
        metavar="RUN_DIR|ADAPTER_DIR",
        help="run dirs (their final adapter) or adapter folders, evaluated side by side",
    )
    evaluation.add_argument(
        "--data",
        metavar="FILE",
        help="evaluate on this file (in the recipe's data.format) instead of eval.data or the held-out split",
    )
    evaluation.add_argument("--shards", type=int, metavar="K", help="split the examples over K processes or SLURM tasks")
    evaluation.add_argument("--executor", choices=EXECUTOR_NAMES, default="local", help="where the shards run")
    evaluation.add_argument(
        "--checkpoints", choices=["final", "all"], help="all: every complete checkpoint of each run too (eval.checkpoints)"
    )
    evaluation.add_argument(
        "--recipe", type=Path, metavar="RECIPE.toml", help="the recipe of adapter folders that are not inside a run dir"
    )
    evaluation.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: the first run's eval/)")
    evaluation.add_argument("--no-base", action="store_true", help="leave the base model out")
    evaluation.add_argument(
        "--benchmark", metavar="TASK[,TASK]", help="lm-evaluation-harness tasks to run on every system too (eval.benchmarks)"
    )
    evaluation.add_argument(
        "--benchmark-tasks", metavar="DIR", help="a folder of your own lm-eval task YAMLs (eval.benchmark_tasks_dir)"
    )
    evaluation.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an [eval] key, e.g. --set eval.max_new_tokens=64 (repeatable)",
    )
    evaluation.add_argument("--overwrite", action="store_true", help="replace an evaluation already in the folder")
    evaluation.set_defaults(handler=command_eval)

    serving = commands.add_parser(
        "serve",
        help="serve a run's adapters with vLLM's OpenAI-compatible server",
        description="vLLM's OpenAI-compatible server on the run's base model (model 'base'), its final adapter "
        "('adapter') and complete checkpoints ('checkpoint-N'), on this machine or as a SLURM job, until Ctrl-C "
        "or launch cancel. Needs vllm (requirements/vllm-env).",
    )
    serving.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    serving.add_argument("--executor", choices=EXECUTOR_NAMES, default="local", help="where the server runs")
    serving.add_argument(
        "--port", type=int, help="the port it listens on (default: 8000, or a free one when another process holds 8000)"
    )
    serving.add_argument("--host", help="the address it listens on (default 127.0.0.1 locally, 0.0.0.0 on SLURM)")
    serving.add_argument("--time", metavar="HH:MM:SS", help="the SLURM job's time limit (default eval.time)")
    serving.set_defaults(handler=command_serve)

    status = commands.add_parser(
        "status",
        help="state of one run, or of every run under runs/",
        description="Show state, steps done and outputs from the run dirs' manifests.",
    )
    status.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR")
    status.set_defaults(handler=command_status)

    logs = commands.add_parser(
        "logs", help="print (or follow) one rank's log", description="Print a rank's log from RUN_DIR/logs."
    )
    logs.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    logs.add_argument("--rank", type=int, default=0, help="which rank (default 0)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    logs.set_defaults(handler=command_logs)

    cancel = commands.add_parser(
        "cancel", help="cancel a run's job", description="Cancel the run's running job (SLURM or local)."
    )
    cancel.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    cancel.set_defaults(handler=command_cancel)
    return parser


def add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags: they win over the recipe and the SLURM profile."""
    parser.add_argument("--nodes", type=int, metavar="N", help="nodes (distributed.nodes); more than one needs SLURM")
    parser.add_argument("--procs-per-node", type=int, metavar="N", help="ranks per node (distributed.procs_per_node)")
    parser.add_argument("--time", metavar="HH:MM:SS", help="SLURM time limit (slurm.time)")
    parser.add_argument("--partition", metavar="NAME", help="SLURM partition (slurm.partition)")
    parser.add_argument("--profile", metavar="NAME", help="SLURM cluster profile slurm/profiles/NAME.toml (slurm.profile)")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, metavar="RECIPE.toml", help="the experiment's recipe")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.learning_rate=2e-4 (repeatable)",
    )


FLAG_KEYS = {
    "nodes": "distributed.nodes",
    "procs_per_node": "distributed.procs_per_node",
    "time": "slurm.time",
    "partition": "slurm.partition",
    "profile": "slurm.profile",
}


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """--set items, then the topology flags as the keys they set."""
    overrides = list(args.overrides)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}" if isinstance(value, int) else f"{key}={json.dumps(value)}")
    return overrides


def recipe_from(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, recipe_overrides(args))


def command_run(args: argparse.Namespace, console: Console) -> int:

    recipe = recipe_from(args)
    executor = choose_executor(args.executor, recipe, rendering_only=args.dry_run)
    warning = gpu_request_warning(recipe, queues_jobs(executor))
    if args.dry_run and warning:
        console.print(f"[yellow]warning[/yellow] {escape(warning)}", highlight=False)
    if not args.dry_run and preflight(recipe, console, queued=queues_jobs(executor)).errors:
        console.print("pre-flight failed: nothing was started; fix the errors above", highlight=False)
        return 2
    with run_dir_in_use(args.run_dir or default_run_dir(recipe), "launch " + " ".join(sys.argv[1:])) as root:
        run = prepare(recipe, root, console, make_executor(executor, recipe, RunDir(root).logs), resume=args.resume)
        if args.dry_run:
            describe_dry_run(run, console, run.sbatch if run.sbatch.exists() else None)
            return 0
        return 0 if execute(recipe, run, console, executor_name=executor, detach=args.detach) else 1


def command_sweep(args: argparse.Namespace, console: Console) -> int:
    overrides = recipe_overrides(args)
    return run_sweep(args.recipe, args.grid, overrides, console, args.executor, args.sweep_dir, args.dry_run, args.yes)


def command_report(args: argparse.Namespace, console: Console) -> int:
    return finish_report(SweepDir(args.sweep_dir), console)


def command_check(args: argparse.Namespace, console: Console) -> int:

    recipe = recipe_from(args)
    ds_config = render_deepspeed(recipe)
    console.print(f"{args.recipe}: valid", highlight=False)
    if recipe.slurm.profile:
        console.print(
            f"  SLURM profile {recipe.slurm.profile}: partition {recipe.slurm.partition}, time {recipe.slurm.time}",
            highlight=False,
        )
    console.print(
        f"  model {recipe.model.name_or_path} ({recipe.model.dtype}), peft {recipe.peft.method}, "
        f"{recipe.world_size()} ranks, DeepSpeed {recipe.distributed.deepspeed} (ZeRO-{zero_stage(ds_config)})",
        highlight=False,
    )
    report = preflight(recipe, console, samples=args.show_samples)
    return 2 if report.errors else 0


def preflight(recipe: Recipe, console: Console, samples: int = 0, queued: bool = False):
    """Run the pre-flight checks and print them; errors are printed as the recipe errors they are."""

    if not hub_reachable(recipe):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast on hub ids instead of retrying for a minute
        console.print("  hub: unreachable from here; checking with local files and the cache only", highlight=False)
    quiet_libraries_for(recipe)
    with console.status("pre-flight: reading data, building the model on the meta device"):
        data = read_training_set(recipe, samples)
        report = run_preflight(recipe, examples=data.examples)
    report.warnings[:0] = data.warnings + [w for w in [gpu_request_warning(recipe, queued)] if w]
    report.errors[:0] = data.errors
    for line in data.lines + report.lines:
        console.print(f"  {line}", highlight=False, markup=False)
    for line in report.warnings:
        console.print(f"[yellow]warning[/yellow] {escape(line)}", highlight=False)
    for line in report.errors:
        console.print(f"[red]error[/red] {escape(line)}", highlight=False)
    for sample in data.samples[:samples]:
        console.print(sample, highlight=False, markup=False)  # samples hold [gMASK]-like text, never markup
    return report


def hub_reachable(recipe: Recipe, timeout_s: float = 3.0) -> bool:
    """True when the recipe names nothing on the hub, or the hub answers a TCP connect in time."""
    import socket
    from urllib.parse import urlparse

    names = [recipe.model.name_or_path, recipe.data.train_file, recipe.data.eval_file]
    if all(name is None or Path(name).exists() for name in names) or os.environ.get("HF_HUB_OFFLINE"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def command_merge(args: argparse.Namespace, console: Console) -> int:

    if args.adapters:
        return command_combine(args, console)
    if args.run_dir is None:
        raise UserError("launch merge: name a RUN_DIR, or combine adapters with --adapters A B --weights WA WB --out DIR")
    run = RunDir(args.run_dir)
    recipe = run.load_recipe()
    quiet_libraries_for(recipe)
    with run_dir_in_use(run.root, "launch " + " ".join(sys.argv[1:]), create=False):
        console.print(f"merged model: {merge_run(recipe, run, overwrite=args.overwrite, checkpoint=args.checkpoint)}")
    return 0


def command_combine(args: argparse.Namespace, console: Console) -> int:

    if args.out is None or args.weights is None:
        raise UserError(["launch merge --adapters: give --weights (one per adapter) and --out DIR for the combination"])
    adapters = [RunDir(a).adapter if RunDir(a).recipe.is_file() else a for a in args.adapters]
    _, _, recipe_path = eval_targets(args.adapters, args.recipe)
    recipe = load_recipe(recipe_path)
    quiet_libraries_for(recipe)
    out = combine_adapters(recipe, adapters, args.weights, args.method, args.out, args.density, args.overwrite)
    console.print(f"combined adapter ({args.method}, weights {args.weights}): {out}", highlight=False)
    if args.into_base:
        merged = out.with_name(out.name + "-merged")
        merge_into_base(recipe, out, merged, args.overwrite)
        console.print(f"merged into the base: {merged}", highlight=False)
    return 0


def command_eval(args: argparse.Namespace, console: Console) -> int:

    runs, adapters, recipe_path = eval_targets(args.targets, args.recipe)
    overrides = list(args.overrides) + [
        f"{key}={json.dumps(value)}"
        for key, value in (
            ("eval.shards", args.shards),
            ("eval.checkpoints", args.checkpoints),
            ("eval.benchmarks", args.benchmark and [task.strip() for task in args.benchmark.split(",") if task.strip()]),
            ("eval.benchmark_tasks_dir", args.benchmark_tasks and str(Path(args.benchmark_tasks).resolve())),
        )
        if value is not None
    ]
    recipe = load_recipe(recipe_path, overrides)
    bases = {run.load_recipe().model.name_or_path for run in runs} | {recipe.model.name_or_path}
    if len(bases) > 1:
        raise UserError(
            [
                f"eval: the runs were trained on different base models ({', '.join(sorted(bases))}); "
                "evaluate each base in its own command"
            ]
        )
    missing = [run.root for run in runs if not run.adapter.exists() and recipe.eval.checkpoints == "final"]
    if missing:
        raise UserError([f"{missing[0]}: no final adapter yet; finish training, or pass --checkpoints all"])
    systems = systems_of(runs, adapters, recipe.eval.checkpoints, base=not args.no_base)
    quiet_libraries_for(recipe)
    with ExitStack() as held:
        out = args.out or eval_folder(runs, adapters, held, console)
        plan_evaluation(recipe, systems, out, data=args.data, overwrite=args.overwrite, runs=runs)
        console.print(f"evaluating {', '.join(s.name for s in systems)} into {out}", highlight=False)
        result = run_evaluation(recipe, out, args.executor, console)
    if result is None:
        return 1  # as `launch run` ends when a stage fails; the same command resumes the finished shards
    console.print(metrics_table(result))
    for line in summary_lines(result):
        console.print(f"  {line}", highlight=False)
    folder = EvalDir(Path(out))
    console.print(f"report: {folder.report_html} (and {folder.report_md.name})", highlight=False)
    return 0


def eval_folder(runs: list, adapters: list[Path], held: ExitStack, console: Console) -> Path:
    """Where `launch eval` writes without --out. RUN/eval belongs to the run's final evaluation: it
    is used (and the run held meanwhile) only when the run is trained and no command or job works
    in it; otherwise the evaluation goes to a folder of its own, RUN/eval-<time>."""

    if not runs:
        return adapters[0].with_name(adapters[0].name + "-eval")
    run = runs[0]
    if run.adapter.exists():
        try:
            held.enter_context(run_dir_in_use(run.root, "launch " + " ".join(sys.argv[1:]), create=False))
            return run.eval
        except UserError as busy:
            console.print(f"{busy.lines[0]}", highlight=False)
    own = unused_name(run.root / f"eval-{time.strftime('%Y%m%dT%H%M%S')}")
    console.print(f"the run's final evaluation (eval/) stays its own: this one goes to {own}", highlight=False)
    return own


def eval_targets(targets: list[Path], recipe: Path | None):
    """Run dirs and adapter folders; the recipe is --recipe, or the first target's run's."""

    runs, adapters, found = [], [], recipe
    for target in targets:
        if RunDir(target).recipe.is_file():
            runs.append(RunDir(target))
            found = found or RunDir(target).recipe
        elif (target / "adapter_config.json").is_file():
            adapters.append(target)
            owner = next((RunDir(p) for p in (target.parent, target.parent.parent) if RunDir(p).recipe.is_file()), None)
            found = found or (owner.recipe if owner else None)
        else:
            raise UserError(
                [f"{target}: neither a run dir ({RunDir(target).recipe.name}) nor an adapter folder (adapter_config.json)"]
            )
    if found is None:
        raise UserError(["eval: the adapters are not inside a run dir; pass --recipe RECIPE.toml (model, data format, [eval])"])
    return runs, adapters, found


def command_status(args: argparse.Namespace, console: Console) -> int:

    if args.run_dir and SweepDir(args.run_dir).exists():
        manifest = SweepDir(args.run_dir).manifest()
        console.print(status_table(sweep_rows(SweepDir(args.run_dir)), manifest.best, manifest.metric))
        return 0
    if args.run_dir:
        console.print(describe_run(RunDir(args.run_dir)), highlight=False)
        return 0
    roots = run_dirs_under(Path("runs"))
    sweeps = sweep_dirs_under(Path("runs"))
    if not roots and not sweeps:
        console.print("no runs under runs/")
    for folder in sweeps:
        console.print(sweep_summary(folder), highlight=False)
    unreadable = []
    for root in roots:
        try:
            console.print(describe_run(RunDir(root)), highlight=False)
        except UserError as err:  # one broken run dir does not hide the others
            unreadable += err.lines
    if unreadable:
        raise UserError(unreadable)
    return 0


def describe_run(run) -> str:

    manifest = run.manifest()
    step = run.metrics.last()
    progress = f"step {step['step']}/{step['max_steps']}, loss {step['loss']:.4f}" if step else "no steps yet"
    if step:
        progress += f", {step['tokens_per_second']:.0f} tok/s, MFU {percent(step.get('mfu'))}"
        progress += f", {rewards(step)}" if rewards(step) else ""
    lines = [f"{run.root}: {manifest.state}, {progress}"]
    if manifest.state == "failed" and manifest.failure:
        lines.append(f"  failed: {manifest.failure}")
    newest = latest_complete_checkpoint(run.checkpoints)
    lines.append(f"  last complete checkpoint: {newest.name if newest else 'none'}; requeues: {manifest.requeues}")
    if manifest.jobs:
        lines.append(f"  job: {job_of(manifest.jobs[-1], run.logs).describe()}")
    for job in manifest.chain:
        lines.append(f"  {job.stage}: {job_of(job, run.logs).describe()}" + (f", after job {job.after}" if job.after else ""))
    for stage in ("train", "merge", "eval"):
        record = getattr(manifest, stage)
        if record:
            lines.append(f"  {stage}: {record.cost()}")
    lines += [f"  dashboard: {command}" for command in dashboard_commands(run)]
    server = run.server()
    if server is not None:
        lines.append(
            f"  serving: http://{server.host}:{server.port}/v1, models {', '.join(server.models)} (since {server.since})"
        )
    if run.evaluation.report_html.exists():
        lines.append(f"  report: {run.evaluation.report_html} (and {run.evaluation.report_md.name})")
    elif run.evaluation.plan_path.exists():
        lines.append(f"  eval: unfinished in {run.eval}; resume it with: launch eval {run.root}")
    return "\n".join(lines)


def command_logs(args: argparse.Namespace, console: Console) -> int:

    run = RunDir(args.run_dir)
    manifest = run.manifest()
    log = run.rank_log(args.rank)
    offset = 0
    while True:
        if log.exists():
            with open(log, errors="replace") as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            sys.stdout.write(chunk)
            sys.stdout.flush()
        elif not args.follow:
            raise UserError(f"{log}: no log for rank {args.rank} yet")
        manifest = run.manifest()
        if not args.follow or not manifest.jobs or not job_of(manifest.jobs[-1], run.logs).active():
            return 0
        time.sleep(1)


def command_serve(args: argparse.Namespace, console: Console) -> int:
    if args.time and not re.fullmatch(TIME_PATTERN, args.time):
        raise UserError(f"--time {args.time!r}: {PATTERN_FORMS[TIME_PATTERN]}")
    return serve_run(RunDir(args.run_dir), args.executor, args.host, args.port, args.time, console)


def command_cancel(args: argparse.Namespace, console: Console) -> int:

    if SweepDir(args.run_dir).exists():
        return cancel_sweep(SweepDir(args.run_dir), console)
    run = RunDir(args.run_dir)
    manifest = run.manifest()
    stages = [job_of(record, run.logs) for record in manifest.jobs[-1:] + manifest.chain]
    server = [job_of(manifest.server, run.logs / "serve")] if manifest.server else []
    active = [job for job in stages + server if job.active()]
    if not active:
        raise UserError(f"{args.run_dir}: no running job to cancel")
    for job in active:
        job.cancel()
        stage = f" ({job.record.stage})" if job.record.stage != "train" else ""
        console.print(f"cancelled {job.record.executor} job {job.id}{stage}", highlight=False)
    if any(job in active for job in stages):  # ending only its server leaves the run as it is
        lifecycle.cancelled(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())

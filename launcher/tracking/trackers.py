"""Experiment tracking: training's logged steps, the resolved recipe (as hyper-parameters) and every
evaluation's metrics in one tracker run per run dir, for `train.report_to` = tensorboard (default:
event files under RUN/tensorboard/, offline), wandb, mlflow and trackio.

The trackers are configured through their own environment variables, set in each process that logs
(the training ranks, the evaluation's writer) and never written to a file: a key or token
(WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, HF_TOKEN) stays in the user's environment. Where the user set
nothing, each logs locally inside the run dir: W&B under RUN/wandb/ (WANDB_MODE=offline on a cluster
without internet, then `wandb sync`), MLflow in a file store RUN/mlruns/, Trackio in RUN/trackio/.
One tracker run per run dir, however often the job is requeued: the W&B id derives from the run
dir, the MLflow run id is kept in RUN/tracking.json (ids only, no address) and resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from launcher.config.recipe import Recipe
from launcher.errors import UserError
from launcher.rundir.checkpoints import checkpoint_step
from launcher.rundir.evaldir import EvalPlan, EvalResults
from launcher.rundir.files import write_atomic
from launcher.rundir.runs import RunDir
from launcher.rundir.sweepdir import sweep_of

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
OURS = (
    "TENSORBOARD_LOGGING_DIR",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "WANDB_RUN_GROUP",
    "MLFLOW_RUN_ID",
)  # the run's identity: always set


def trackers(recipe: Recipe) -> list[str]:
    return [name for name in recipe.train.report_to if name != "none"]


def missing_packages(recipe: Recipe) -> list[str]:
    """The trackers of the recipe whose library is not installed here."""
    import importlib.util

    return [name for name in trackers(recipe) if importlib.util.find_spec(PACKAGES[name]) is None]


def tracking_problems(recipe: Recipe) -> tuple[list[str], str]:
    """(errors, the line saying where the run is tracked) for pre-flight: a tracker whose library is
    missing, or W&B with no way to log in, would stop training at its first step."""
    errors = [
        f"train.report_to: {name} is not installed in this environment; pip install {PACKAGES[name]} "
        f"(pip install 'peft-launcher[tracking]' installs every tracker), or leave it out of train.report_to"
        for name in missing_packages(recipe)
    ]
    if "wandb" in trackers(recipe) and not wandb_can_log():
        errors.append(
            "train.report_to: wandb has no API key here (WANDB_API_KEY unset, no `wandb login`), so training would stop "
            "at its first step; export WANDB_API_KEY in your shell (never in the recipe), or WANDB_MODE=offline to log "
            "into RUN/wandb/ and `wandb sync` it later"
        )
    where = {
        "tensorboard": "tensorboard (RUN/tensorboard/)",
        "wandb": f"wandb ({os.environ.get('WANDB_MODE', 'online')})",
        "mlflow": "mlflow (" + ("$MLFLOW_TRACKING_URI" if "MLFLOW_TRACKING_URI" in os.environ else "RUN/mlruns/") + ")",
        "trackio": "trackio (RUN/trackio/)",
    }
    used = trackers(recipe)
    return errors, "tracking: " + (", ".join(where[name] for name in used) if used else "none (train.report_to)")


def wandb_can_log() -> bool:
    import netrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_run_id(run: RunDir) -> str:
    """The W&B run id of a run dir: the same for every attempt, different for another run dir."""
    created = run.manifest().created if run.manifest_path.exists() else ""
    return hashlib.sha1(f"{run.root.resolve()}|{created}".encode()).hexdigest()[:16]


def saved_ids(run: RunDir) -> dict:
    path = run.tracking_ids
    return json.loads(path.read_text()) if path.is_file() else {}


def environment(recipe: Recipe, run: RunDir) -> dict[str, str]:
    """The trackers' environment variables for this run; the user's own settings (project, address,
    mode) win, except the run's identity."""
    used = trackers(recipe)
    env = {"TENSORBOARD_LOGGING_DIR": str(run.tensorboard)}
    if "wandb" in used:
        env |= {"WANDB_DIR": str(run.root), "WANDB_PROJECT": recipe.name, "WANDB_RUN_ID": wandb_run_id(run)}
        env["WANDB_RESUME"] = "allow"
        sweep = sweep_of(run)
        if sweep is not None:  # a sweep's variants side by side: one W&B group (MLflow: one experiment, recipe.name)
            env["WANDB_RUN_GROUP"] = sweep.root.name
    if "mlflow" in used:
        env |= {"MLFLOW_EXPERIMENT_NAME": recipe.name}
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a file store in the run dir (MLflow 3 asks to allow it)
            env |= {"MLFLOW_TRACKING_URI": run.mlflow_store.resolve().as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
        if saved_ids(run).get("mlflow_run_id"):
            env["MLFLOW_RUN_ID"] = saved_ids(run)["mlflow_run_id"]
    if "trackio" in used:
        env["TRACKIO_DIR"] = str(run.trackio)
    return {key: value for key, value in env.items() if key in OURS or key not in os.environ}


@contextmanager
def tracking_environment(recipe: Recipe, run: RunDir):
    """os.environ with the run's tracker settings, restored afterwards."""
    changes = environment(recipe, run)
    before = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def flat(tree: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """recipe.to_dict() as dotted keys with scalar values (lists and None as text)."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return out


# ---------------------------------------------------------------- training


def recipe_logger(recipe: Recipe, run: RunDir):
    """A Trainer callback that, on rank 0 once the trackers have started, logs the resolved recipe
    as hyper-parameters and keeps the tracker run ids in RUN/tracking.json (added after the
    Trainer's own tracker callbacks, so it runs after them)."""
    from transformers import TrainerCallback

    class RecipeLogger(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                log_recipe(recipe, run)

    return RecipeLogger()


def log_recipe(recipe: Recipe, run: RunDir) -> None:
    params, used, ids = flat(recipe.to_dict()), trackers(recipe), {}
    if "tensorboard" in used:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        writer = SummaryWriter(os.environ["TENSORBOARD_LOGGING_DIR"])
        for summary in hparams({f"recipe.{k}": v for k, v in params.items()}, {}):  # in this run, not a sub-run
            writer.file_writer.add_summary(summary)
        writer.add_text("recipe", "```toml\n" + run.recipe.read_text() + "\n```")
        writer.close()
    if "wandb" in used:
        import wandb

        if wandb.run is not None:
            wandb.run.config.update({"recipe": recipe.to_dict()}, allow_val_change=True)
            ids |= {"wandb_run_id": wandb.run.id, "wandb_project": wandb.run.project}
    if "mlflow" in used:
        import mlflow

        active = mlflow.active_run()
        if active is not None:
            items = sorted((f"recipe.{k}", str(v)[:6000]) for k, v in params.items())
            for start in range(0, len(items), 100):  # MLflow takes at most 100 per call
                mlflow.log_params(dict(items[start : start + 100]))
            ids["mlflow_run_id"] = active.info.run_id
    if "trackio" in used:
        import trackio

        trackio.config.update({"recipe": recipe.to_dict()}, allow_val_change=True)
    if ids:
        write_atomic(run.tracking_ids, json.dumps(saved_ids(run) | ids, indent=2) + "\n")


# ---------------------------------------------------------------- evaluation


def series_name(run: RunDir, plan: EvalPlan) -> str:
    """`eval` for the run's own evaluation data; `eval_<file>` for another (--data), so two data
    sets never share a curve."""
    own = run.load_recipe().eval.data
    if plan.data == "held-out split" or (own and plan.data == own):
        return "eval"
    return "eval_" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(plan.data).stem)


def evaluation_points(run: RunDir, result: EvalResults, prefix: str, series: str = "eval") -> list[tuple[str, int, dict]]:
    """(series, step, metrics) of each evaluated system of this run (named `prefix`NAME, and the
    base model), its benchmark scores as TASK/METRIC: the base at step 0 as `SERIES_base`,
    checkpoints at their step and the final adapter at the last step as `SERIES`."""

    last = run.metrics.last()
    points = []
    for name, values in result.systems.items():
        short = name.removeprefix(prefix)
        numbers = {key: value for key, value in values.items() if isinstance(value, (int, float))}
        for task, scores in result.benchmarks.get(name, {}).items():
            numbers |= {f"{task}/{metric}": value for metric, value in scores["metrics"].items()}
        if name == "base":
            points.append((f"{series}_base", 0, numbers))
        elif name.startswith(prefix) and checkpoint_step(short) >= 0:
            points.append((series, checkpoint_step(short), numbers))
        elif name.startswith(prefix) and short == "adapter":
            points.append((series, last["step"] if last else 0, numbers))
    return sorted(points, key=lambda point: point[1])


def log_evaluation(plan: EvalPlan, result: EvalResults) -> list[str]:
    """Each evaluated run's metrics into its trackers; a line per tracker that could not take them."""
    problems = []
    for root in plan.runs:
        run = RunDir(Path(root))
        recipe = run.load_recipe()
        named = any(s.name.startswith(f"{run.root.name}/") for s in plan.systems)  # several runs: RUN/adapter
        points = evaluation_points(run, result, f"{run.root.name}/" if named else "", series_name(run, plan))
        with tracking_environment(recipe, run):
            for tracker in trackers(recipe):
                try:
                    LOGGERS[tracker](recipe, run, points)
                except Exception as err:  # a tracker that is down never costs the evaluation its results
                    problems.append(
                        f"{tracker}: the evaluation metrics of {run.root} were not logged ({type(err).__name__}: {err})"
                    )
    return problems


def tensorboard_points(recipe: Recipe, run: RunDir, points) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.environ["TENSORBOARD_LOGGING_DIR"])
    for series, step, numbers in points:
        for key, value in numbers.items():
            writer.add_scalar(f"{series}/{key}", value, step)
    writer.close()


def wandb_points(recipe: Recipe, run: RunDir, points) -> None:
    import wandb

    with wandb.init(id=os.environ["WANDB_RUN_ID"], resume="allow", name=run.root.name) as tracked:
        for series in {series for series, _, _ in points}:
            tracked.define_metric(f"{series}/step")
            tracked.define_metric(f"{series}/*", step_metric=f"{series}/step")
        for series, step, numbers in points:
            tracked.log({f"{series}/step": step} | {f"{series}/{key}": value for key, value in numbers.items()})


def mlflow_points(recipe: Recipe, run: RunDir, points) -> None:
    import mlflow

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        raise RuntimeError(f"no MLflow run of its training is recorded in {run.tracking_ids.name}")
    with mlflow.start_run(run_id=run_id):
        for series, step, numbers in points:
            mlflow.log_metrics({f"{series}/{key}": value for key, value in numbers.items()}, step=step)


def trackio_points(recipe: Recipe, run: RunDir, points) -> None:
    import trackio

    # A resumed Trackio run takes the config it is given as its whole config: the recipe again.
    trackio.init(project=recipe.name, name=run.root.name, resume="allow", config={"recipe": recipe.to_dict()})
    try:
        for series, step, numbers in points:
            trackio.log({f"{series}/{key}": value for key, value in numbers.items()}, step=step)
    finally:
        trackio.finish()


LOGGERS = {"tensorboard": tensorboard_points, "wandb": wandb_points, "mlflow": mlflow_points, "trackio": trackio_points}


# ---------------------------------------------------------------- dashboards


def dashboard_commands(run: RunDir) -> list[str]:
    """How to look at the run's tracked curves, one command per tracker."""
    try:
        recipe, commands = run.load_recipe(), []
    except UserError:  # no recipe (yet), or one of an older schema: no dashboard to name
        return []
    used = trackers(recipe)
    if "tensorboard" in used and (run.tensorboard.exists() or not run.metrics_log.exists()):  # not a run from before
        commands.append(f"tensorboard --logdir {run.tensorboard}")
    if "wandb" in used:
        offline = sorted(run.wandb.glob("offline-run-*"))
        commands.append(
            f"wandb sync {run.wandb}/offline-run-*" if offline else f"W&B run {wandb_run_id(run)} of project {recipe.name}"
        )
    if "mlflow" in used:
        commands.append(
            f"mlflow ui --backend-store-uri {run.mlflow_store}"
            if run.mlflow_store.exists()
            else f"MLflow run {saved_ids(run).get('mlflow_run_id', '?')}"
        )
    if "trackio" in used:
        commands.append(f"TRACKIO_DIR={run.trackio} trackio show --project {recipe.name}")
    return commands

"""Job bodies: the small picklable callables an executor runs in every task of a job.

Each takes a run dir (or an evaluation folder), reads what the previous stage wrote there, and
does one stage: train (one task per rank), merge (one task), evaluate (one task per shard).
None of them knows the order of the stages or which executor runs it: `pipeline` hands them to
an executor. `last_stage` says that the run is complete when this stage is.
"""

from __future__ import annotations

import time
from pathlib import Path

from launcher.adapters.merge import merge_run, validate_adapter
from launcher.config.hardware import resolve_device
from launcher.evaluate.plan import plan_evaluation, systems_of
from launcher.evaluate.results import finish_if_complete, shard_markers
from launcher.evaluate.shards import run_shard
from launcher.evaluate.sweep_report import refresh_after_variant
from launcher.launch.executors.base import STOP_SIGNAL, task_index
from launcher.models.loading import quiet_libraries_for
from launcher.rundir import lifecycle
from launcher.rundir.checkpoints import stop_flag
from launcher.rundir.runs import RunDir, StageRecord, exclusive
from launcher.serve.server import serve
from launcher.train.worker import main


class TrainJob:
    """Train on this rank (RANK of WORLD_SIZE) until the final adapter is saved."""

    def __init__(self, run_dir: str, last_stage: bool = False):
        self.run_dir, self.last_stage = run_dir, last_stage

    def __call__(self) -> int:
        import signal

        stop_flag()  # first thing: a stop signal during start-up is acted on at the first step

        code = main([self.run_dir], last_stage=self.last_stage)
        if code == 0 and self.last_stage and task_index() == 0 and RunDir(Path(self.run_dir)).adapter.exists():
            refresh_after_variant(RunDir(Path(self.run_dir)))
        # A stop signal after the last step has nothing left to save. Python resets its own handlers
        # to the default (terminate) while shutting down, so ignore it: a late signal must not turn
        # a finished rank into a "crash" that requeues the job.
        signal.signal(STOP_SIGNAL, signal.SIG_IGN)
        if code != 0:
            # Exit (no second traceback): the rank's log already ends with the real error.
            raise SystemExit(code)
        return 0


class MergeJob:
    """Stream-merge the run's final adapter into the base model (RUN/merged)."""

    def __init__(self, run_dir: str, last_stage: bool = False):
        self.run_dir, self.last_stage = run_dir, last_stage

    def __call__(self) -> int:

        run = RunDir(Path(self.run_dir))
        recipe = run.load_recipe()
        quiet_libraries_for(recipe)
        if not run.merged.exists():
            merge_run(recipe, run)
        record = run.manifest().merge
        print(
            f"merged model: {run.merged} ({record.wall_s if record else '?'} s, "
            f"peak RSS {record.peak_rss_mib if record else '?'} MiB)"
        )
        lifecycle.stage_finished(run, "merge", self.last_stage)
        if self.last_stage:
            refresh_after_variant(run)
        return 0


class EvalJob:
    """Evaluate one shard per task: the run's end-of-training evaluation (`run_dir`: planned by the
    first task to arrive, into RUN/eval), or shards[task] of an evaluation already planned in `out`.
    The task that finishes the last shard writes the results."""

    def __init__(self, out: str, shards: list[int] | None = None, run_dir: str | None = None, last_stage: bool = False):
        self.out, self.shards, self.run_dir, self.last_stage = out, shards, run_dir, last_stage

    def __call__(self) -> int:

        started, out = time.time(), Path(self.out)
        if self.run_dir:
            self.plan_run_evaluation()
        shard = self.shards[task_index()] if self.shards else task_index()
        run_shard(out, shard, started=started)
        result = finish_if_complete(out)
        print(f"eval shard {shard}: done")
        if result is not None and self.run_dir:
            run = RunDir(Path(self.run_dir))
            lifecycle.stage_finished(run, "eval", self.last_stage, result_record(out))
            print(f"report: {run.evaluation.report_html}")
            if self.last_stage:
                refresh_after_variant(run)
        return 0

    def plan_run_evaluation(self) -> None:

        run = RunDir(Path(self.run_dir))
        recipe = run.load_recipe()
        quiet_libraries_for(recipe)
        validate_adapter(run.adapter)
        with exclusive(run.eval_plan_lock):
            if not run.evaluation.metrics.exists():
                # RUN/eval is this run's final evaluation: another one found there is kept, renamed
                systems = systems_of([run], [], recipe.eval.checkpoints)
                plan_evaluation(recipe, systems, run.eval, runs=[run], set_aside_other=True)


class ServeJob:
    """vLLM's OpenAI-compatible server on the run's base model and adapters, until the job is ended."""

    def __init__(self, run_dir: str, host: str, port: int | None):
        """`port` None: the server picks one (8000 when free)."""
        self.run_dir, self.host, self.port = run_dir, host, port

    def __call__(self) -> int:
        run = RunDir(Path(self.run_dir))
        recipe = run.load_recipe()
        quiet_libraries_for(recipe)
        return serve(run, self.host, self.port, resolve_device(recipe.distributed.device))


def result_record(out: Path):
    """The evaluation's cost: from the first shard's start to the last shard's end, and the largest
    peak of any shard's process."""

    markers = shard_markers(out)
    accelerator = [m.peak_accelerator_mib for m in markers if m.peak_accelerator_mib is not None]
    return StageRecord(
        wall_s=round(max(m.finished for m in markers) - min(m.started for m in markers), 1),
        peak_rss_mib=max(m.peak_rss_mib for m in markers),
        peak_accelerator_mib=max(accelerator) if accelerator else None,
    )

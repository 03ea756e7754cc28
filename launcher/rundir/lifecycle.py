"""The only functions that change a run's state (manifest.state), one per event of a run's life.

rendered -> training -> trained -> merged -> evaluated        (each stage's job moves it on;
               |  ^                                            the last enabled stage ends it
               v  |                                            as completed)
   preempted / requeued / stopped   (a stop signal's checkpoint, a crash restart, Ctrl-C)
any -> failed (why, in manifest.failure) | cancelled (launch cancel) -> training (relaunch)
"""

from __future__ import annotations

import json

from launcher.rundir.runs import RunDir, StageRecord, State, allocation, now

STAGE_DONE = {"train": State.TRAINED, "merge": State.MERGED, "eval": State.EVALUATED}


def training(run: RunDir) -> None:
    """A training job was submitted: the run trains (and the last failure is over)."""
    run.update_manifest(state=State.TRAINING, failure=None, updated=now())


def stage_finished(run: RunDir, stage: str, last_stage: bool, record: StageRecord | None = None) -> None:
    """A stage's job did its work: the run moves to that stage's state, or is completed when it was
    the last enabled stage; `record` is what the stage cost."""
    with run.editing_manifest() as manifest:
        if record is not None:
            setattr(manifest, stage, record)
        manifest.state = State.COMPLETED if last_stage else STAGE_DONE[stage]
        manifest.updated = now()


def preempted(run: RunDir) -> None:
    """The ranks saved a complete checkpoint after a stop signal; this allocation's job ends and is
    requeued (stopped_in names the allocation, so its teardown knows)."""
    with run.editing_manifest() as manifest:
        manifest.state, manifest.requeues, manifest.stopped_in = State.PREEMPTED, manifest.requeues + 1, allocation()
        manifest.updated = now()


def crash_requeued(run: RunDir, logged_steps: int) -> None:
    """A crashed job is requeued to resume from its newest complete checkpoint."""
    with run.editing_manifest() as manifest:
        manifest.state, manifest.crash_restarts, manifest.requeues = (
            State.REQUEUED,
            manifest.crash_restarts + 1,
            manifest.requeues + 1,
        )
        manifest.logged_steps_at_last_crash = logged_steps
        manifest.updated = now()


def stopped(run: RunDir) -> None:
    """`launch` was interrupted on purpose while the run trained: the same command resumes it."""
    if run.manifest().state in (State.TRAINING, State.PREEMPTED):
        run.update_manifest(state=State.STOPPED, updated=now())


def cancelled(run: RunDir) -> None:
    run.update_manifest(state=State.CANCELLED, updated=now())


def failed(run: RunDir, reason: str) -> None:
    """The run failed, and why. On a full disk a new manifest may not fit where the old one's blocks
    are: then it is rewritten in place, compact, still through the schema. OSError when even that fails."""
    try:
        run.update_manifest(state=State.FAILED, failure=reason, updated=now())
        return
    except OSError:
        pass
    manifest = run.manifest()
    manifest.state, manifest.failure, manifest.updated = State.FAILED, reason, now()
    text = json.dumps(json.loads(manifest.model_dump_json(exclude_none=True)), separators=(",", ":")) + "\n"
    with open(run.manifest_path, "r+") as handle:  # compact: it fits in the blocks the file has
        handle.write(text)
        handle.truncate()

"""The only functions that change a run's state (manifest.state), one per event of a run's life,
and the table of which state may follow which.

rendered -> training -> trained -> merged -> evaluated        (each stage's job moves it on;
               |  ^                                            the last enabled stage ends it
               v  |                                            as completed)
   preempted / requeued / stopped   (a stop signal's checkpoint, a crash restart, Ctrl-C)
any -> failed (why, in manifest.failure) | cancelled (launch cancel)
any -> training (a relaunch that trains) | trained (a relaunch that only merges or evaluates)

A cancelled run stays cancelled when a late event of the jobs it had arrives (a stop signal's save,
a crash's requeue, a stage that finished as the cancel went out): the event's record is kept, the
cancel wins, and only a new launch moves the run on. Any other move the table does not allow is a
bug of the launcher: TransitionError, the manifest unchanged.
"""

from __future__ import annotations

import json

from launcher.rundir.runs import Manifest, RunDir, StageRecord, State, allocation, now

STAGE_DONE = {"train": State.TRAINED, "merge": State.MERGED, "eval": State.EVALUATED}
TRAINING_NOW = {State.TRAINING, State.PREEMPTED, State.REQUEUED}
"""A training job is queued or running: a requeued attempt trains in the state its last one left."""
# A stage finishes in the state its own job found, or, for a job SLURM requeued after the launcher
# had recorded its failure, in "failed"; merge and eval also after the stage before them.
MAY_FOLLOW: dict[State, set[State]] = {
    State.TRAINING: set(State),
    State.TRAINED: set(State) - {State.RENDERED},
    State.PREEMPTED: TRAINING_NOW,
    State.REQUEUED: TRAINING_NOW,
    State.STOPPED: {State.TRAINING, State.PREEMPTED},
    State.MERGED: TRAINING_NOW | {State.TRAINED, State.MERGED, State.FAILED},
    State.EVALUATED: TRAINING_NOW | {State.TRAINED, State.MERGED, State.EVALUATED, State.FAILED},
    State.FAILED: set(State),
    State.CANCELLED: set(State),
    State.PAUSED: {State.TRAINING},
    State.PRUNED: {State.PAUSED},
}
LATE_EVENTS = {State.TRAINED, State.PREEMPTED, State.REQUEUED, State.MERGED, State.EVALUATED}
"""What a cancelled run's own jobs may still report (and the cancel then wins over)."""


class TransitionError(RuntimeError):
    """A state change the lifecycle does not allow: a bug of the launcher, not of a recipe."""


def move(manifest: Manifest, to: State, completes: bool = False, by_launch: bool = False) -> None:
    """Set manifest.state to `to` (to completed instead when `completes`: the last stage's end);
    `by_launch`: a new launch moves it, not one of the run's jobs."""
    was = State(manifest.state)
    if was == State.CANCELLED and to in LATE_EVENTS and not by_launch:
        print(f"{manifest.name}: was cancelled; a late {to.value} of its job is recorded, the run stays cancelled")
        manifest.updated = now()
        return
    allowed = MAY_FOLLOW[to] | ({State.COMPLETED} if completes else set())  # a second shard's finish
    if was not in allowed:
        raise TransitionError(f"{manifest.name}: a run that is {was.value} cannot become {to.value}")
    manifest.state, manifest.updated = (State.COMPLETED if completes else to), now()


def training(run: RunDir) -> None:
    """A training job was submitted: the run trains (and the last failure is over)."""
    with run.editing_manifest() as manifest:
        move(manifest, State.TRAINING, by_launch=True)
        manifest.failure = None


def relaunched_after_training(run: RunDir) -> None:
    """A launch whose training is done submitted only the stages after it: the run is trained again,
    not cancelled or failed, while they run (and the last failure is over)."""
    with run.editing_manifest() as manifest:
        move(manifest, State.TRAINED, by_launch=True)
        manifest.failure = None


def stage_finished(run: RunDir, stage: str, last_stage: bool, record: StageRecord | None = None) -> None:
    """A stage's job did its work: the run moves to that stage's state, or is completed when it was
    the last enabled stage; `record` is what the stage cost."""
    with run.editing_manifest() as manifest:
        if record is not None:
            setattr(manifest, stage, record)
        move(manifest, STAGE_DONE[stage], completes=last_stage)


def preempted(run: RunDir) -> None:
    """The ranks saved a complete checkpoint after a stop signal; this allocation's job ends and is
    requeued (stopped_in names the allocation, so its teardown knows; a cancelled run's is not)."""
    with run.editing_manifest() as manifest:
        move(manifest, State.PREEMPTED)
        if manifest.state == State.PREEMPTED:
            manifest.requeues, manifest.stopped_in = manifest.requeues + 1, allocation()


def crash_requeued(run: RunDir, logged_steps: int) -> None:
    """A crashed job is requeued to resume from its newest complete checkpoint."""
    with run.editing_manifest() as manifest:
        move(manifest, State.REQUEUED)
        manifest.crash_restarts, manifest.requeues = manifest.crash_restarts + 1, manifest.requeues + 1
        manifest.logged_steps_at_last_crash = logged_steps


def stopped(run: RunDir) -> None:
    """`launch` was interrupted on purpose while the run trained: the same command resumes it."""
    with run.editing_manifest() as manifest:
        if manifest.state in MAY_FOLLOW[State.STOPPED]:
            move(manifest, State.STOPPED)


def paused(run: RunDir) -> None:
    """The ranks saved a complete checkpoint at the run's halving rung (pause.json) and ended."""
    with run.editing_manifest() as manifest:
        move(manifest, State.PAUSED)


def pruned(run: RunDir) -> None:
    """Its rung's verdict: worse than the better half; it trains no further (its checkpoint stays)."""
    with run.editing_manifest() as manifest:
        move(manifest, State.PRUNED, by_launch=True)


def cancelled(run: RunDir) -> None:
    with run.editing_manifest() as manifest:
        move(manifest, State.CANCELLED)


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

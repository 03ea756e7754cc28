"""Checkpoint completeness: one marker, written last, and one function that reads it.

A checkpoint directory counts only when its marker exists. The marker is written by rank 0
after every rank has written and fsynced its files, with write-to-temp + fsync + rename, so a
job killed mid-save leaves a checkpoint without a marker, which resume, rotation, merge and
eval all ignore.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from launcher.rundir.files import fsync_tree, write_atomic

MARKER = "launcher-complete.json"
NAME = re.compile(r"^checkpoint-(\d+)$")
SET_ASIDE = "-incomplete-"


def is_complete(checkpoint: Path) -> bool:
    return (Path(checkpoint) / MARKER).is_file()


def step_of(checkpoint: Path) -> int:
    return int(NAME.match(Path(checkpoint).name).group(1))


def checkpoint_step(system: str) -> int:
    """The step of an evaluated system named after a checkpoint ("checkpoint-40", "run/checkpoint-40");
    -1 for base and adapters (which sort first)."""
    found = re.search(r"checkpoint-(\d+)$", system)
    return int(found.group(1)) if found else -1


def checkpoints_in(folder: Path) -> list[Path]:
    """checkpoint-N directories, oldest first (complete or not)."""
    if not Path(folder).is_dir():
        return []
    found = [p for p in Path(folder).iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=step_of)


def latest_complete_checkpoint(folder: Path) -> Path | None:
    complete = [c for c in checkpoints_in(folder) if is_complete(c)]
    return complete[-1] if complete else None


def mark_complete(checkpoint: Path, info: dict) -> None:
    write_atomic(Path(checkpoint) / MARKER, json.dumps(info | {"completed": time.time()}) + "\n")


def set_aside_incomplete(folder: Path, after_step: int) -> list[Path]:
    """Rename incomplete checkpoints newer than the resume point, so training does not write into them.

    They are kept (never deleted here) and removed by `tidy` once a newer complete checkpoint exists.
    """
    moved = []
    for checkpoint in checkpoints_in(folder):
        if step_of(checkpoint) > after_step and not is_complete(checkpoint):
            target = checkpoint.with_name(f"{checkpoint.name}{SET_ASIDE}{int(time.time())}")
            checkpoint.rename(target)
            moved.append(target)
    return moved


def rewind_to(checkpoint: Path) -> list[Path]:
    """Make `checkpoint` the newest: every newer one is renamed -superseded-<time> (kept, not deleted)."""
    moved = []
    for other in checkpoints_in(checkpoint.parent):
        if step_of(other) > step_of(checkpoint):
            target = other.with_name(f"{other.name}-superseded-{int(time.time())}")
            other.rename(target)
            moved.append(target)
    return moved


def tidy(folder: Path, keep: int | None) -> list[Path]:
    """Remove what a newer complete checkpoint makes useless; keep the `keep` newest complete ones."""
    newest = latest_complete_checkpoint(folder)
    if newest is None:
        return []
    removed = []
    for path in sorted(Path(folder).iterdir()):
        base = path.name.split(SET_ASIDE)[0]
        if not NAME.match(base) or path == newest:
            continue
        step, newest_step = step_of(Path(base)), step_of(newest)
        set_aside_and_redone = SET_ASIDE in path.name and step <= newest_step
        stale = set_aside_and_redone or (step < newest_step and not is_complete(path))
        if stale:
            shutil.rmtree(path)
            removed.append(path)
    if keep:
        complete = [c for c in checkpoints_in(folder) if is_complete(c)]
        for old in complete[:-keep]:
            shutil.rmtree(old)
            removed.append(old)
    return removed


class StopFlag:
    """Set by SLURM's pre-timeout / preemption signal. The handler only sets the flag: the ranks
    act on it together at the next step boundary (a collective save cannot run in a handler)."""

    def __init__(self, signals=("SIGUSR2",)):
        import signal

        self.raised = False
        for name in signals:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True


_installed: StopFlag | None = None


def stop_flag() -> StopFlag:
    """The process's one stop flag, installed on first use (the SLURM task does it first thing)."""
    global _installed
    if _installed is None:
        _installed = StopFlag()
    return _installed


def ranks_agree(flag: bool, device) -> bool:
    """True on every rank when any rank saw the flag (one all-reduce)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class PlanComplete(Exception):
    """Resumed from the checkpoint of the plan's last step: the model holds its weights, nothing is left to train."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"step {step} is the last of the plan")


def checkpoint_guard(run_checkpoints: Path, keep: int | None, stop: StopFlag, pause_at: int | None = None):
    """Trainer callback: marks each checkpoint complete once every rank wrote it; on a stop
    signal, saves at the step boundary and ends training (the worker then requeues). At step
    `pause_at` (a sweep's halving rung) it saves and ends the same way, and the run pauses there."""
    import torch.distributed as dist
    from transformers import TrainerCallback

    def barrier() -> None:
        if dist.is_initialized():
            dist.barrier()

    class CheckpointGuard(TrainerCallback):
        stopped_at: int | None = None
        paused_at: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            # Trainer would take one more step after resuming at the plan's last one (mid-epoch).
            if 0 < state.max_steps <= state.global_step:
                raise PlanComplete(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if ranks_agree(stop.raised, args.device):
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            elif state.global_step == pause_at:  # the same on every rank: no collective needed
                self.paused_at = state.global_step
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            checkpoint = run_checkpoints / f"checkpoint-{state.global_step}"
            fsync_tree(checkpoint)  # this rank's shards reach the disk before anyone says "complete"
            barrier()
            if state.is_world_process_zero:
                world = dist.get_world_size() if dist.is_initialized() else 1
                mark_complete(checkpoint, {"step": state.global_step, "world_size": world})
                for path in tidy(run_checkpoints, keep):
                    print(f"removed {path.name}")
            barrier()

    return CheckpointGuard()

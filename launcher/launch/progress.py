"""Following a training job from the outside: rank 0's metrics log -> a progress bar; failures -> log tails."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from launcher.launch.executors.base import PENDING, TERMINAL_STATES
from launcher.rundir.runs import RunDir


class StateWatcher:
    """Polls a job's state; prints each change (pending, running, requeued, ...)."""

    def __init__(self, job, console: Console):
        self.job, self.console, self.every_s = job, console, job.poll_interval_s
        self.state, self.checked, self.why = "SUBMITTED", 0.0, None

    def poll(self) -> str | None:
        """The state in a word while the job lasts; None once it ended."""
        if time.time() - self.checked >= self.every_s or self.state == "SUBMITTED":
            self.checked = time.time()
            state = self.job.state()
            why = self.job.waiting() if state == PENDING else None
            if state != self.state or why != self.why:  # a pending job says why it waits, and again when that changes
                self.console.print(f"job {self.job.id}: {state.lower()}{f' ({why})' if why else ''}", highlight=False)
                self.state, self.why = state, why
        return None if self.state in TERMINAL_STATES else self.state.lower()


def follow_training(run: RunDir, job_state: Callable[[], str | None], console: Console, poll_s: float = 0.5) -> dict | None:
    """Show steps, loss, tokens/s and ETA until the job ends; return the last metrics row.

    `job_state` answers the job's state in a word ("pending", "running"), or None once it ended.
    """
    tail, last = run.metrics, None
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TextColumn("MFU {task.fields[mfu]}"),
        TextColumn("{task.fields[rewards]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=None, loss="-", speed="-", mfu="-", rewards="")
        while True:
            state = job_state()
            bar.update(task, description="training" if last and state == "running" else state or "ended")
            for row in tail.new_rows():
                last = row
                bar.update(
                    task,
                    description="training",
                    completed=row["step"],
                    total=row["max_steps"],
                    loss=f"{row['loss']:.4f}",
                    speed=f"{row['tokens_per_second']:.0f}",
                    mfu=percent(row.get("mfu")),
                    rewards=rewards(row),
                )
            if state is None:
                return last
            time.sleep(poll_s)


def rewards(row: dict) -> str:
    """A preference run's step in words: its batch reward accuracy and margin ("" for other runs)."""
    if "rewards/accuracies" not in row:
        return ""
    return f"reward acc {row['rewards/accuracies']:.2f} margin {row['rewards/margins']:.2f}"


def percent(fraction: float | None) -> str:
    """MFU as a percentage ("-" where the device's peak is unknown)."""
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def failed_ranks(run: RunDir, lines: int = 25) -> list[tuple[Path, str, list[str]]]:
    """(log, error, its last lines) of every rank that recorded a failure (RankFailure), by rank."""
    failures = []
    for failure in run.rank_failures():
        log = run.rank_log(failure.rank)
        text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
        failures.append((log, failure.headline(), text))
    return failures


def report_failure(run: RunDir, console: Console, fallback_log: Path | None = None) -> str | None:
    """Print each failed rank's error and the last lines of its log; return the first one's error."""
    failures = failed_ranks(run)
    if not failures and fallback_log and fallback_log.exists():
        tail = fallback_log.read_text(errors="replace").splitlines()[-25:]
        failures = [(fallback_log, next((line for line in reversed(tail) if line.strip()), ""), tail)]
    headlines = [f"{log.stem}: {print_tail(log, tail, console, error)}" for log, error, tail in failures]
    return headlines[0] if headlines else None


def print_tail(log: Path, lines: list[str], console: Console, headline: str | None = None) -> str:
    """The failed task's error in one red line (its log's last line unless given), then the last lines
    of its log; returns the error line."""
    headline = headline or next((line for line in reversed(lines) if line.strip()), "")
    console.print(f"[red]{log.stem} failed[/red]: {escape(headline)}", highlight=False)
    console.print(f"last lines of {log}:", highlight=False)
    console.print("\n".join("    " + line for line in lines), markup=False, highlight=False)
    return headline

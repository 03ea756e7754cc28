"""Every path of an evaluation folder (RUN/eval, RUN/eval-<time>, or --out DIR), in one place.

plan.json is written last when the evaluation is planned (examples.jsonl first), each shard's
rows before its `.done` marker, and metrics.json last of the results: each file's presence says
how far the evaluation got.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def file_name_of(system: str) -> str:
    """A system's name as a file name ("run/adapter" with several runs -> "run__adapter")."""
    return system.replace("/", "__")


@dataclass(frozen=True)
class EvalDir:
    root: Path

    plan = property(lambda self: self.root / "plan.json")
    examples = property(lambda self: self.root / "examples.jsonl")
    predictions = property(lambda self: self.root / "predictions.jsonl")
    metrics = property(lambda self: self.root / "metrics.json")
    report_md = property(lambda self: self.root / "report.md")
    report_html = property(lambda self: self.root / "report.html")
    loss_plot = property(lambda self: self.root / "loss_curve.png")
    checkpoint_plot = property(lambda self: self.root / "checkpoint_metrics.png")
    logs = property(lambda self: self.root / "logs")
    finish_lock = property(lambda self: self.root / ".finish.lock")

    def shard_file(self, system: str, shard: int, shards: int) -> Path:
        """One system's answers on one shard."""
        return self.root / "shards" / file_name_of(system) / f"shard-{shard:05d}-of-{shards:05d}.jsonl"

    def benchmark_file(self, system: str) -> Path:
        """One system's lm-eval results."""
        return self.root / "benchmarks" / f"{file_name_of(system)}.json"

    @staticmethod
    def marker_of(path: Path) -> Path:
        """The completion marker of a shard's rows or a system's benchmarks, written after them."""
        return path.with_suffix(".done")

"""An evaluation folder (RUN/eval, RUN/eval-<time>, or --out DIR): every path in it, every
document written there as a typed model, and the only functions that read and write them.

plan.json is written last when the evaluation is planned (examples.jsonl first), each shard's
rows before its `.done` marker, and metrics.json last of the results: each file's presence says
how far the evaluation got.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from launcher.errors import UserError
from launcher.rundir.files import write_atomic


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def text(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"


class System(Document):
    """One evaluated system: the base model, or an adapter (a run's final one or a checkpoint's)."""

    name: str
    """"base", "adapter", "checkpoint-40", or "<run>/adapter" with several runs."""
    adapter: str | None = None
    """The adapter's folder; None is the base model."""


class BenchmarkSpec(Document):
    """The lm-eval tasks every system runs."""

    tasks: list[str]
    tasks_dir: str | None = None
    limit: int | None = None


class EvalPlan(Document):
    """plan.json: what is evaluated; a re-run with the same plan resumes its unfinished shards."""

    recipe: dict[str, Any]
    """The resolved recipe (it may differ from the plan's and still resume: only the rest must match)."""
    systems: list[System]
    data: str
    shards: int
    examples: int
    examples_sha256: str
    decoding: dict[str, Any]
    runs: list[str] = []
    """The evaluated runs' folders: their training curves and costs go in the report."""
    benchmarks: BenchmarkSpec | None = None

    def differences(self, other: EvalPlan) -> list[str]:
        """The fields, the recipe aside, in which `other` plans another evaluation."""
        mine, theirs = self.model_dump(exclude={"recipe"}), other.model_dump(exclude={"recipe"})
        return [key for key in mine if mine[key] != theirs[key]]

    def benchmark_shard(self, system: str) -> int:
        """The shard that runs a system's benchmarks: the systems spread over the shards."""
        return [s.name for s in self.systems].index(system) % self.shards


class ShardMarker(Document):
    """shards/S/shard-K.done, written after the rows: how the shard's answers were made."""

    examples: int
    new_tokens: int
    seconds: float
    backend: str = "hf"
    node: str
    started: float
    finished: float
    peak_rss_mib: float
    peak_accelerator_mib: float | None = None
    generation_failed: str | None = None
    """Why there are losses but no answers."""
    hf_because: str | None = None
    """Why HF generate answered although eval.backend = vllm."""


class BenchmarkRecord(Document):
    """benchmarks/S.json: one system's lm-eval results per task, or why there are none."""

    results: dict[str, Any] | None = None
    failed: str | None = None
    seconds: float


class Convention(Document):
    name: str
    why: str


class SystemSpeed(Document):
    generated_tokens: int
    shard_seconds: float
    backend: str
    """hf, vllm, or hf+vllm across shards."""
    hf_because: str | None = None
    """Why HF generate answered although eval.backend = vllm."""


class EvalResults(Document):
    """metrics.json, written last: the evaluation is done."""

    examples: int
    data: str
    shards: int
    metrics_convention: Convention
    systems: dict[str, dict[str, float | None]]
    """Per system: loss, perplexity and (with answers) the text scores."""
    speed: dict[str, SystemSpeed]
    generation_failed: dict[str, str] = {}
    benchmarks: dict[str, dict[str, Any]] = {}
    benchmarks_failed: dict[str, str] = {}


def file_name_of(system: str) -> str:
    """A system's name as a file name ("run/adapter" with several runs -> "run__adapter")."""
    return system.replace("/", "__")


def read_document(path: Path, model: type[Document]):
    """A document through its schema; one line when it is not one (cut short, edited, or older)."""
    try:
        return model.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else {"loc": (), "msg": str(err)}
        where = ".".join(map(str, first["loc"]))
        raise UserError(
            f"{path}: {where + ': ' if where else ''}{first['msg']}; it was not written by this launcher version, "
            f"or was edited by hand; pass --out DIR for a new evaluation, or --overwrite to replace it"
        ) from None


@dataclass(frozen=True)
class EvalDir:
    root: Path

    plan_path = property(lambda self: self.root / "plan.json")
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

    # ------------------------------------------------------------ the plan and its examples

    def plan(self) -> EvalPlan | None:
        """The planned evaluation, or None before it is planned."""
        return read_document(self.plan_path, EvalPlan) if self.plan_path.is_file() else None

    def write_plan(self, plan: EvalPlan, example_lines: list[str]) -> None:
        """The examples, then the plan (last: the plan stands)."""
        write_atomic(self.examples, "\n".join(example_lines) + "\n")
        write_atomic(self.plan_path, plan.text())

    def example_rows(self) -> list[dict]:
        return [json.loads(line) for line in self.examples.read_text().splitlines()]

    # ------------------------------------------------------------ shards

    def shard_done(self, system: str, shard: int, shards: int) -> bool:
        return self.marker_of(self.shard_file(system, shard, shards)).exists()

    def write_shard(self, system: str, shard: int, shards: int, rows: list[dict], marker: ShardMarker) -> None:
        """A system's rows on a shard, then its marker (last: the shard is done)."""
        path = self.shard_file(system, shard, shards)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        write_atomic(self.marker_of(path), marker.model_dump_json(exclude_none=True) + "\n")

    def shard_rows(self, system: str, shard: int, shards: int) -> list[dict]:
        return [json.loads(line) for line in self.shard_file(system, shard, shards).read_text().splitlines()]

    def shard_marker(self, system: str, shard: int, shards: int) -> ShardMarker:
        return read_document(self.marker_of(self.shard_file(system, shard, shards)), ShardMarker)

    # ------------------------------------------------------------ benchmarks

    def benchmarks_done(self, system: str) -> bool:
        return self.marker_of(self.benchmark_file(system)).exists()

    def write_benchmarks(self, system: str, record: BenchmarkRecord) -> None:
        path = self.benchmark_file(system)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, record.text())
        write_atomic(self.marker_of(path), json.dumps({"finished": time.time()}) + "\n")  # last: the results stand

    def benchmark_record(self, system: str) -> BenchmarkRecord:
        return read_document(self.benchmark_file(system), BenchmarkRecord)

    # ------------------------------------------------------------ results

    def results(self) -> EvalResults | None:
        return read_document(self.metrics, EvalResults) if self.metrics.is_file() else None

    def write_predictions(self, rows: list[dict]) -> None:
        write_atomic(self.predictions, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def write_results(self, results: EvalResults) -> None:
        """metrics.json, after the predictions and the report: the evaluation is done."""
        write_atomic(self.metrics, results.model_dump_json(indent=2, exclude_defaults=True) + "\n")  # no empty sections

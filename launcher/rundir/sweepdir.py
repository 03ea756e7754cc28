"""A sweep dir: the variants' run dirs side by side, and sweep.json, which is the sweep's state.

    runs/NAME/
      sweep.json          the recipe, every variant (its overrides and run dir), each array job, the best variant
      lr=1e-4,r=8/        a variant: a whole run dir (recipe.toml, manifest.json, checkpoints/, adapter/, eval/ ...)
      lr=3e-4,r=8/
      logs/slurm/         the array jobs' scripts and task logs
      arrays/             per array, which run dir each element trains (read by the requeue teardown)
      report.html         the comparison (launch report SWEEP), with loss.png
      sweep.sbatch        the training array's script (--dry-run)

Nothing lives only in the `launch sweep` process: sweep.json is written before anything is queued
and again after each submission, and every variant's state is its own run dir's manifest (moved on
by its jobs), so status, cancel, report and a re-run work after the login node's `launch` died.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from launcher.errors import UserError
from launcher.rundir.files import write_atomic
from launcher.rundir.runs import Record, RunDir, exclusive


class VariantRecord(Record):
    name: str
    overrides: dict[str, Any]
    run_dir: str
    """Relative to the sweep dir (its name)."""


class ArrayRecord(Record):
    """One SLURM job array: element i runs `members[i]`'s `stage`."""

    id: str
    stage: str
    members: list[str]
    submitted: str
    after: str | None = None
    """The array whose corresponding element it waits for (aftercorr)."""


class BestRecord(Record):
    variant: str
    metric: str
    value: float
    mode: str


class RungRecord(Record):
    """One halving rung: every variant that reached `step`, by held-out loss there; the worse half stopped."""

    step: int
    losses: dict[str, float]
    kept: list[str]
    pruned: list[str]
    saved_device_hours: float
    """What the pruned variants would have spent training from here to their last step (at their own speed)."""


class SweepManifest(Record):
    name: str
    recipe: str
    """The recipe file the sweep was made from (absolute)."""
    base_overrides: list[str] = []
    """The command's --set items, applied to every variant first."""
    created: str
    metric: str = "loss"
    mode: str = "min"
    max_parallel: int = 4
    executor: str = "local"
    variants: list[VariantRecord] = []
    arrays: list[ArrayRecord] = []
    best: BestRecord | None = None
    rungs: list[RungRecord] = []


class SweepDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    manifest_path = property(lambda self: self.root / "sweep.json")
    report_html = property(lambda self: self.root / "report.html")
    loss_plot = property(lambda self: self.root / "loss.png")
    array_script = property(lambda self: self.root / "sweep.sbatch")  # what --dry-run renders: the training array's script
    logs = property(lambda self: self.root / "logs")
    arrays = property(lambda self: self.root / "arrays")
    lock = property(lambda self: self.root / ".sweep.lock")

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def run(self, variant: str) -> RunDir:
        return RunDir(self.root / variant)

    def runs(self) -> list[tuple[VariantRecord, RunDir]]:
        return [(v, RunDir(self.root / v.run_dir)) for v in self.manifest().variants]

    def members_file(self, number: int) -> Path:
        """Array `number`'s element -> run dir list, one absolute path per line (the requeue teardown reads it)."""
        return self.arrays / f"array-{number}.txt"

    def manifest(self) -> SweepManifest:
        try:
            return SweepManifest.model_validate_json(self.manifest_path.read_text())
        except OSError:
            raise UserError(f"{self.root}: not a sweep dir (no sweep.json); pass the folder `launch sweep` wrote") from None
        except (ValidationError, ValueError) as err:
            raise UserError(
                f"{self.manifest_path}: not a sweep manifest ({str(err).splitlines()[0]}); it was edited by hand"
            ) from None

    def write(self, manifest: SweepManifest) -> None:
        """A new sweep's sweep.json."""
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive(self.lock):
            self.save(manifest)

    @contextmanager
    def editing(self):
        """Read, change and write sweep.json under its lock: the login node's command and the variants'
        jobs (each refreshing the best) never lose each other's changes."""
        with exclusive(self.lock):
            manifest = self.manifest()
            yield manifest
            self.save(SweepManifest.model_validate(manifest.model_dump()))

    def save(self, manifest: SweepManifest) -> None:
        write_atomic(self.manifest_path, manifest.model_dump_json(indent=2, exclude_none=True) + "\n")

    def add_array(self, record: ArrayRecord) -> None:
        with self.editing() as manifest:
            manifest.arrays.append(record)

    def add_rung(self, record: RungRecord) -> None:
        with self.editing() as manifest:
            manifest.rungs.append(record)

    def set_best(self, best: BestRecord | None) -> None:
        with self.editing() as manifest:
            manifest.best = best


def sweep_dirs_under(folder: Path) -> list[SweepDir]:
    """The sweep dirs directly inside `folder`, by name."""
    return [SweepDir(path.parent) for path in sorted(Path(folder).glob(f"*/{SweepDir(Path()).manifest_path.name}"))]


def sweep_of(run: RunDir) -> SweepDir | None:
    """The sweep a run dir belongs to (its parent holds sweep.json), or None."""
    parent = SweepDir(run.root.resolve().parent)
    return parent if parent.exists() else None


def member_of_array(members_file: Path, index: int) -> RunDir:
    """Element `index`'s run dir in an array's members file."""
    return RunDir(Path(members_file.read_text().splitlines()[index]))


def write_members(path: Path, runs: list[RunDir]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(f"{run.root.resolve()}\n" for run in runs))

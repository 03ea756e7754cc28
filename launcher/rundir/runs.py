"""The run directory: its layout, its manifest, and the rule that nothing in it is overwritten silently."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from launcher.config.recipe import Recipe, read_toml, validate_recipe, with_new_defaults
from launcher.errors import UserError
from launcher.rundir.evaldir import EvalDir
from launcher.rundir.files import fsync_tree, write_atomic

TRACKED_PACKAGES = ("torch", "transformers", "peft", "trl", "deepspeed", "accelerate", "datasets")


class State(StrEnum):
    """Where a run stands; each stage's job moves it on."""

    RENDERED = "rendered"
    TRAINING = "training"
    PREEMPTED = "preempted"
    STOPPED = "stopped"
    """Interrupted on purpose (Ctrl-C, SIGTERM, the terminal closing): the same command resumes it."""
    REQUEUED = "requeued"
    TRAINED = "trained"
    MERGED = "merged"
    EVALUATED = "evaluated"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"
    """At a sweep's halving rung: a complete checkpoint there, waiting for the rung's verdict."""
    PRUNED = "pruned"
    """Stopped for good at a halving rung (worse than half of its rung); its checkpoint is kept."""


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class JobRecord(Record):
    """One submitted job, as its executor can find it again (launch status / logs / cancel)."""

    executor: str
    id: str
    stage: str = "train"
    submitted: str
    nodes: int | None = None
    ranks: int | None = None
    after: str | None = None
    """The job it waits for (afterok)."""
    folder: str | None = None
    """Where its executor keeps its files, when not the run's logs/<executor>/ (a sweep's array: the sweep's)."""


class StageRecord(Record):
    """What one stage cost, measured in the stage's own process (rank 0 for training)."""

    wall_s: float
    peak_rss_mib: float
    peak_accelerator_mib: float | None = None
    merged_weights: int | None = None
    shards: int | None = None

    def cost(self) -> str:
        """ "12.3 s, peak RSS 812 MiB, GPU 3.1 GiB" (GPU only where the stage used one)."""
        gpu = f", GPU {self.peak_accelerator_mib / 1024:.1f} GiB" if self.peak_accelerator_mib else ""
        return f"{self.wall_s:g} s, peak RSS {self.peak_rss_mib:.0f} MiB{gpu}"


class Manifest(Record):
    """manifest.json: what the run is, where it stands, its jobs and what each stage cost."""

    name: str
    recipe_hash: str
    launcher_version: str | None = None
    git_sha: str | None = None
    versions: dict[str, str | None] = {}
    created: str
    updated: str | None = None
    state: State = State.RENDERED
    failure: str | None = None
    """Why the run failed last (its job's end and the failed rank's last log line); cleared when it goes on."""
    worker_command: list[str] = []
    recipe_changes: list[str] = []
    jobs: list[JobRecord] = []
    """Training jobs, one per launch."""
    chain: list[JobRecord] = []
    """The jobs after the newest training job (merge, eval), in order."""
    data: dict[str, Any] = {}
    attempts: int = 0
    requeues: int = 0
    crash_restarts: int = 0
    stopped_in: str | None = None
    logged_steps_at_last_crash: int | None = None
    launch_to_first_step_s: float | None = None
    train: StageRecord | None = None
    merge: StageRecord | None = None
    eval: StageRecord | None = None
    checkpoint_merges: dict[str, StageRecord] = {}
    """launch merge --checkpoint N: merged-checkpoint-N's record under "N"."""
    server: JobRecord | None = None
    """The newest `launch serve` job (launch cancel ends it too)."""


def exception_name(kind: type) -> str:
    """As a traceback's last line names it: "OSError", "safetensors._safetensors_rust.SafetensorError"."""
    return kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"


class RankFailure(Record):
    """logs/rank<N>.failure.json: why a rank ended with an error, written by the rank as it ends (its
    log is for people; `launch` reads this)."""

    rank: int
    exception: str
    """The exception's type as a traceback names it, e.g. "OSError"."""
    message: str
    """Its message's first line."""
    where: str
    """The innermost frame: "file.py:123 in function"."""
    user_error: bool = False
    """A mistake the user can fix (UserError): the message says how."""
    time: str

    def headline(self) -> str:
        return f"{self.exception}: {self.message}" if self.message else self.exception


class ServerRecord(Record):
    """server.json: where `launch serve`'s server answers, written by its task once it does."""

    host: str
    port: int
    pid: int
    """The task's process (the server is its child)."""
    models: list[str]
    since: str


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22): with the pid it
    names one process, whereas a pid alone is reused. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_process(command: str = "") -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid), "command": command, "since": now()}


def owner_alive(owner: dict[str, Any]) -> bool | None:
    """Whether the process that wrote `owner` still runs; None when it ran on another host (unknown here)."""
    if owner.get("host") != socket.gethostname():
        return None
    return process_start(int(owner.get("pid", 0))) == owner.get("start") is not None


def read_owner(lock: Path) -> dict[str, Any] | None:
    """A lock's owner, or None while it is still being written (or when it is not ours)."""
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def take_over(lock: Path) -> None:
    """Remove a lock whose owner is gone; of several takers, one wins the rename."""
    taken = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    with suppress(FileNotFoundError):
        lock.rename(taken)
        taken.unlink()


def try_lock(lock: Path, owner: dict[str, Any]) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.write(fd, json.dumps(owner).encode())
    os.close(fd)
    return True


def release(lock: Path, owner: dict[str, Any]) -> None:
    if read_owner(lock) == owner:  # not taken over meanwhile
        with suppress(FileNotFoundError):
            lock.unlink()


@contextmanager
def exclusive(lock: Path, stale_after_s: float = 120.0, timeout_s: float = 600.0):
    """Hold `lock` (a file created with O_EXCL) for the block, waiting for another holder to finish.

    O_EXCL creation is atomic on local disks, NFS and Lustre alike, unlike flock, which Lustre
    honours across nodes only when mounted with -o flock. A holder killed inside the block leaves
    the file behind: it is taken over at once when the holder ran on this host and is gone, and
    after stale_after_s otherwise (every holder here keeps it for milliseconds).
    """
    owner, deadline = this_process(), time.time() + timeout_s
    while not try_lock(lock, owner):
        holder = read_owner(lock)
        with suppress(FileNotFoundError):
            if (holder and owner_alive(holder) is False) or time.time() - lock.stat().st_mtime > stale_after_s:
                take_over(lock)
                continue
        if time.time() > deadline:
            raise TimeoutError(f"{lock}: held for more than {timeout_s:.0f} s (by {holder})")
        time.sleep(0.02)
    try:
        yield
    finally:
        release(lock, owner)


@contextmanager
def in_use(root: Path, command: str):
    """Hold ROOT/.in-use while `command` works in the run dir: a second command is refused at once,
    naming the first. A lock whose owner ran here and is gone (killed) is taken over, with a line."""
    lock, owner = Path(root) / IN_USE, this_process(command)
    for _ in range(100):  # a lock being written has no owner for a moment
        if try_lock(lock, owner):
            break
        holder = read_owner(lock)
        if holder is None:
            time.sleep(0.01)
            continue
        alive = owner_alive(holder)
        if alive is False:
            print(f"{lock}: left by `{holder['command']}` (pid {holder['pid']}), which ended; taken over")
            take_over(lock)
            continue
        elsewhere = f"; if that process is gone, remove {lock}" if alive is None else ""
        raise UserError(
            f"{root}: is in use by `{holder['command']}` (pid {holder['pid']} on {holder['host']}, since "
            f"{holder['since']}); wait for it, or stop it (Ctrl-C there, or launch cancel {root}){elsewhere}"
        )
    else:
        raise UserError(f"{lock}: unreadable lock file; if no launch uses {root}, remove it")
    try:
        yield
    finally:
        release(lock, owner)


IN_USE = ".in-use"


def staging_for(target: Path) -> Path:
    """An empty `TARGET.partial` folder to build `target` in. What an interrupted attempt left there
    is ours and unpublished: it is cleared, and the log says so."""
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        print(f"{staging}: left by an interrupted attempt; cleared and started again")
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


OUTPUT_MARKER = ".launcher-output"
"""In every folder the launcher publishes: --overwrite replaces only folders that hold it."""
# Outputs of launchers from before the marker, recognised by a file only they write.
LEGACY_OUTPUT_FILES = ("plan.json", "launcher-combined.json")


def mark_output(folder: Path, kind: str) -> None:
    write_atomic(Path(folder) / OUTPUT_MARKER, json.dumps({"kind": kind, "created": now()}) + "\n")


def made_by_launcher(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in (OUTPUT_MARKER, *LEGACY_OUTPUT_FILES))


def check_replaceable(target: Path, replace: bool) -> None:
    """Refuse early what publish would refuse: an existing target without --overwrite, or one the
    launcher did not write (whatever the flag)."""
    if not target.exists():
        return
    if not replace:
        raise UserError(f"{target}: exists; pass --overwrite to replace it (the old one is kept, renamed), or another --out")
    if not made_by_launcher(target):
        raise UserError(
            f"{target}: exists and was not written by the launcher (no {OUTPUT_MARKER}); it is never replaced: "
            f"move it away or choose another --out"
        )


def set_aside(target: Path) -> Path:
    """Rename an output that is being replaced to TARGET.replaced-<time> (kept, never deleted)."""
    moved = unused_name(target.with_name(f"{target.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"))
    target.rename(moved)
    print(f"{target}: replaced; the previous one is kept as {moved}")
    return moved


def publish(staging: Path, target: Path, replace: bool = False, kind: str = "output") -> Path:
    """Make a finished staging folder visible at `target` at once: marked as the launcher's, fsync,
    then rename. An existing target is replaced only when asked (--overwrite) and only when the
    launcher wrote it; the old one is moved aside, not deleted."""
    mark_output(staging, kind)
    fsync_tree(staging)
    check_replaceable(target, replace)
    if target.exists():
        set_aside(target)
    staging.rename(target)
    return target


# Written by launchers before the typed manifest: timings measured in the wrong process, and the
# flag that chose a second merge/eval path. Dropped on read; the rest of such a run resumes as usual.
LEGACY_KEYS = ("chained", "train_wall_s", "wall_s", "peak_rss_mib", "peak_accelerator_mib")


def without_legacy_keys(recorded: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in recorded.items() if k not in LEGACY_KEYS and not k.startswith("merge-checkpoint-")}
    if isinstance(kept.get("merge"), dict) and "wall_s" not in kept["merge"]:
        del kept["merge"]
    for job in kept.get("jobs", []) + kept.get("chain", []):
        if isinstance(job, dict) and "id" in job:
            job["id"] = str(job["id"])
    return kept


class MetricsLog:
    """logs/train_metrics.jsonl, rank 0's one row per logged step: its one reader."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def written(self) -> list[dict]:
        """Every complete row, of every attempt, in the order written."""
        if not self.path.exists():
            return []
        text = self.path.read_text(errors="replace")
        return [row for line in text[: text.rfind("\n") + 1].splitlines() if (row := parsed_row(line))]

    def rows(self) -> list[dict]:
        """One row per step, of the history that stands: a resumed attempt restarts at its checkpoint,
        so its first row supersedes the rows of that step and later ones that an earlier attempt wrote."""
        kept: list[dict] = []
        for row in self.written():
            while kept and kept[-1]["step"] >= row["step"]:
                kept.pop()
            kept.append(row)
        return kept

    def count(self) -> int:
        """Rows over all attempts: it grows with every step any attempt makes."""
        return len(self.written())

    def last(self) -> dict | None:
        rows = self.rows()
        return rows[-1] if rows else None

    def new_rows(self) -> list[dict]:
        """Rows appended since the last call (a row still being written waits for the next call)."""
        if not self.path.exists():
            return []
        with open(self.path) as handle:
            handle.seek(self.offset)
            text = handle.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete)
        return [row for line in complete.splitlines() if (row := parsed_row(line))]


def parsed_row(line: str) -> dict | None:
    """A metrics row, or None for a blank line or one torn by a kill mid-write (its step is redone)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


CHECKPOINT_OUTPUT_PREFIXES = ("merged-checkpoint-", "adapter-checkpoint-")


@dataclass(frozen=True)
class RunDir:
    root: Path

    recipe = property(lambda self: self.root / "recipe.toml")
    accelerate_config = property(lambda self: self.root / "accelerate.yaml")
    deepspeed_config = property(lambda self: self.root / "deepspeed.json")
    manifest_path = property(lambda self: self.root / "manifest.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter")
    initial_adapter = property(lambda self: self.root / "adapter-init")  # PiSSA / OLoRA: the start the base moved by
    merged = property(lambda self: self.root / "merged")
    eval = property(lambda self: self.root / "eval")
    evaluation = property(lambda self: EvalDir(self.root / "eval"))  # the run's own evaluation: its paths
    sbatch = property(lambda self: self.root / "sbatch.sh")
    tracking_ids = property(lambda self: self.root / "tracking.json")
    tensorboard = property(lambda self: self.root / "tensorboard")
    mlflow_store = property(lambda self: self.root / "mlruns")
    trackio = property(lambda self: self.root / "trackio")
    wandb = property(lambda self: self.root / "wandb")  # W&B makes it under WANDB_DIR = the run dir
    adapter_staging = property(lambda self: self.root / "adapter.partial")
    eval_plan_lock = property(lambda self: self.root / ".eval-plan.lock")
    server_path = property(lambda self: self.root / "server.json")
    pause_path = property(lambda self: self.root / "pause.json")  # a halving rung: {"step": N}, training pauses there

    def rung_eval(self, step: int) -> Path:
        """The held-out evaluation of checkpoint-N at a halving rung."""
        return self.root / f"eval-rung-{step}"

    def pause_step(self) -> int | None:
        with suppress(OSError, ValueError, KeyError, TypeError):
            return int(json.loads(self.pause_path.read_text())["step"])
        return None

    def pause_at(self, step: int | None) -> None:
        if step is None:
            self.pause_path.unlink(missing_ok=True)
        else:
            write_atomic(self.pause_path, json.dumps({"step": step}) + "\n")

    def write_server(self, record: ServerRecord) -> None:
        write_atomic(self.server_path, record.model_dump_json(indent=2) + "\n")

    def clear_server(self) -> None:
        self.server_path.unlink(missing_ok=True)

    def server(self) -> ServerRecord | None:
        """Where the run's server answers, or None when none runs."""
        with suppress(OSError, ValueError):
            return ServerRecord.model_validate_json(self.server_path.read_text())
        return None

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    def merged_checkpoint(self, step: int) -> Path:
        """`launch merge --checkpoint N`'s merged model."""
        return self.root / f"merged-checkpoint-{step}"

    def rebuilt_adapter(self, step: int) -> Path:
        """A checkpoint's adapter rebuilt from its ZeRO shards (its saved one was empty)."""
        return self.root / f"adapter-checkpoint-{step}"

    def checkpoint_outputs(self) -> list[Path]:
        """Every merged-checkpoint-N / adapter-checkpoint-N folder the run holds."""
        return sorted(p for p in self.root.glob("*-checkpoint-*") if p.name.startswith(CHECKPOINT_OUTPUT_PREFIXES))

    logs = property(lambda self: self.root / "logs")
    cache = property(lambda self: self.root / "cache")
    metrics = property(lambda self: MetricsLog(self.root / "logs" / "train_metrics.jsonl"))

    @property
    def metrics_log(self) -> Path:
        return self.metrics.path

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def failure_path(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.failure.json"

    def record_failure(self, rank: int, err: BaseException) -> None:
        """The rank's structured failure record (best effort: a full disk may refuse it too)."""
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
        record = RankFailure(
            rank=rank,
            exception=exception_name(type(err)),
            message=(str(err).strip().splitlines() or [""])[0][:500],
            where=where,
            user_error=isinstance(err, UserError),
            time=now(),
        )
        with suppress(OSError):
            write_atomic(self.failure_path(rank), record.model_dump_json(indent=2) + "\n")

    def clear_failure(self, rank: int) -> None:
        """A new attempt of the rank starts: the last one's record is over (the manifest keeps its line)."""
        self.failure_path(rank).unlink(missing_ok=True)

    def rank_failures(self) -> list[RankFailure]:
        """The failure records of the ranks that failed in their last attempt, by rank."""
        found = []
        for path in self.logs.glob("rank*.failure.json"):
            with suppress(OSError, ValueError):
                found.append(RankFailure.model_validate_json(path.read_text()))
        return sorted(found, key=lambda failure: failure.rank)

    def load_recipe(self) -> Recipe:
        """The run's resolved recipe, through the schema (every default from there)."""
        if not self.recipe.is_file():
            raise UserError(f"{self.root}: not a run dir (no recipe.toml); pass the folder a `launch` run wrote")
        return validate_recipe(read_toml(self.recipe), source=str(self.recipe))

    def manifest(self) -> Manifest:
        if not self.manifest_path.exists():
            raise UserError(f"{self.root}: not a run dir (no manifest.json); pass the folder a `launch` run wrote")
        try:
            recorded = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(
                f"{self.manifest_path}: not valid JSON ({err}); it was cut short (a full disk?) or edited by hand; "
                f"restore it from a backup, or start a new run with --run-dir"
            ) from None
        if not isinstance(recorded, dict):
            raise UserError(f"{self.manifest_path}: not a manifest (a JSON object); start a new run with --run-dir")
        try:
            return Manifest.model_validate(without_legacy_keys(recorded))
        except ValidationError as err:
            first = err.errors()[0]
            raise UserError(
                f"{self.manifest_path}: {'.'.join(map(str, first['loc']))}: {first['msg']}; "
                f"it was not written by this launcher version, or was edited by hand"
            ) from None

    @contextmanager
    def editing_manifest(self):
        """Read, change and write the manifest under its lock: writers on several nodes never lose
        each other's changes."""
        with exclusive(self.manifest_path.with_name(".manifest.lock")):
            manifest = self.manifest()
            yield manifest
            checked = Manifest.model_validate(manifest.model_dump())
            write_atomic(self.manifest_path, checked.model_dump_json(indent=2, exclude_none=True) + "\n")

    def create_manifest(self, manifest: Manifest) -> None:
        with exclusive(self.manifest_path.with_name(".manifest.lock")):
            if not self.manifest_path.exists():
                write_atomic(self.manifest_path, manifest.model_dump_json(indent=2, exclude_none=True) + "\n")

    def update_manifest(self, **changes: Any) -> Manifest:
        with self.editing_manifest() as manifest:
            for key, value in changes.items():
                setattr(manifest, key, value)
        return manifest


def run_dirs_under(folder: Path) -> list[Path]:
    """The run dirs directly inside `folder` (those with a manifest), by name."""
    return sorted(path.parent for path in Path(folder).glob(f"*/{RunDir(Path()).manifest_path.name}"))


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def allocation() -> str:
    """This attempt of a SLURM job: its id and how many times SLURM restarted it (a requeue keeps the id)."""
    return f"{os.environ.get('SLURM_JOB_ID')}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


# Set by an executor in its tasks' environment, read by the training ranks' rendezvous.
MASTER_FD_VARIABLE = "LAUNCHER_MASTER_FD"
"""Task 0's listening socket for the rendezvous store, bound and held by the executor that started it (local)."""
START_TOKEN_VARIABLE = "LAUNCHER_START_TOKEN"
"""The same in every task of one start of a job, another in the next (local: the job id)."""


def start_token() -> str:
    """This start of the job, alike on all its tasks: the executor's token, else the SLURM allocation."""
    return os.environ.get(START_TOKEN_VARIABLE) or allocation()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def make_run_root(root: Path) -> None:
    """Create the run dir, or find it; a path with control characters, a file, or a place that
    cannot be written is one line."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(root)):
        raise UserError(f"--run-dir {str(root)!r}: contains a newline or control character; choose a plain path")
    try:
        if root.exists() and not root.is_dir():
            raise UserError(f"{root}: exists and is a file, not a folder; choose another --run-dir")
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a name too long, a read-only file system, no permission
        raise UserError(f"{root}: cannot create the run dir ({err.strerror}); choose another --run-dir") from None


def claim_run_dir(run: RunDir, recipe: Recipe) -> list[str]:
    """Create the run dir for `recipe`, or accept it for a resume.

    Returns the recipe changes a resume accepted (empty for a new run or the same recipe).
    A run dir of a recipe that cannot resume into this one, or files that are not a run of
    ours, is refused: never overwritten.
    """
    make_run_root(run.root)
    if not any(p.name != IN_USE for p in run.root.iterdir()):
        return []
    if not run.manifest_path.is_file() or not run.recipe.is_file():
        raise UserError(f"{run.root}: exists and is not a run dir of this launcher; choose another --run-dir")
    if run.manifest().recipe_hash == recipe.fingerprint():
        return []
    changes = reconcile(read_toml(run.recipe), recipe.to_dict(), run.root)
    archive(run, [run.recipe, run.root / "sbatch.sh"])
    with run.editing_manifest() as manifest:
        manifest.recipe_hash = recipe.fingerprint()
        manifest.recipe_changes += changes
    return changes


# Keys a resume may change: they alter neither the checkpoint's shapes and sharding nor the data order.
RESUMABLE = (
    "train.max_steps",
    "train.epochs",
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "eval.",
    "merge.",
    "slurm.",
)
WHY_NOT = {
    "model.": "the checkpoint holds an adapter for that base model",
    "peft.": "the checkpoint's adapter shapes and target modules come from it",
    "distributed.": "the ZeRO checkpoint is sharded for the recorded ranks and stage",
    "data.": "the data order and position would no longer match the checkpoint",
    "train.": "the optimizer, schedule or data order in the checkpoint were made with the old value",
    "preference.": "the steps already taken followed the old objective",
    "name": "it names the run",
}


def reconcile(old: dict, new: dict, where: Path) -> list[str]:
    """Which keys changed since the run's recipe; refuse those a resume cannot honour."""
    changed = [(key, a, b) for key, a, b in differences(with_new_defaults(old, new), new)]
    refused = [(k, a, b) for k, a, b in changed if not k.startswith(RESUMABLE) and k not in RESUMABLE]
    if refused:
        raise UserError(
            [
                f"{key}: {json.dumps(a)} -> {json.dumps(b)} cannot change when resuming {where} "
                f"({next(v for p, v in WHY_NOT.items() if key.startswith(p))}); restore it, or start a new run with --run-dir"
                for key, a, b in refused
            ]
        )
    return [f"{key}: {json.dumps(a)} -> {json.dumps(b)} (the new value wins)" for key, a, b in changed]


def differences(old: dict, new: dict, prefix: str = ""):
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "deepspeed_overrides":
            yield from differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b


def archive(run: RunDir, paths: list[Path]) -> None:
    """Move superseded rendered files to history/ (kept, never overwritten)."""
    for path in paths:
        if path.exists():
            (run.root / "history").mkdir(exist_ok=True)
            path.rename(unused_name(run.root / "history" / f"{time.strftime('%Y%m%dT%H%M%S')}-{path.name}"))


def unused_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... : the first name nothing holds yet (two moves in one second keep both)."""
    candidate, number = path, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def new_manifest(recipe: Recipe, worker_command: list[str]) -> Manifest:
    return Manifest(
        name=recipe.name,
        recipe_hash=recipe.fingerprint(),
        launcher_version=package_version("peft-launcher"),
        git_sha=git_sha(),
        created=now(),
        worker_command=worker_command,
        versions={"python": platform.python_version()} | {p: package_version(p) for p in TRACKED_PACKAGES},
    )


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    """The launcher's own commit, so a run records which code produced it."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def accelerator_peak_mib() -> float | None:
    """This process's peak GPU memory, when it used torch with CUDA (None otherwise)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def stage_record(started: float, **extra: Any) -> StageRecord:
    """Wall time since `started` and this process's peaks: what the stage that ran here cost."""
    return StageRecord(
        wall_s=round(time.time() - started, 1), peak_rss_mib=peak_rss_mib(), peak_accelerator_mib=accelerator_peak_mib(), **extra
    )

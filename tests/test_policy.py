"""Pure decisions and arithmetic, with pinned numbers, on every machine in seconds: the requeue /
give-up decision, the memory estimate, planned steps, AdaLoRA's schedule, resume reconciliation,
SLURM times, the manifest lock, and the local executor's job semantics."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from conftest import tiny_recipe_text, write_recipe

from launcher.config.recipe import load_recipe, minutes
from launcher.errors import UserError
from launcher.launch.executors import requeue
from launcher.launch.render import render_run
from launcher.models.loading import planned_steps
from launcher.rundir import lifecycle
from launcher.rundir.runs import Manifest, RunDir, StageRecord, State, exclusive, in_use, process_start, reconcile, this_process


@pytest.fixture
def run(tmp_path, tiny_assets) -> RunDir:
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)), ["slurm.max_restarts=2"])
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    render_run(recipe, run)
    lifecycle.training(run)  # as `launch` leaves it when it submits the training job
    return run


@pytest.fixture
def requeued(monkeypatch) -> list[str]:
    """SLURM's requeue, recorded instead of called: this is a decision test, not a cluster test."""
    calls = []
    monkeypatch.setattr(requeue, "requeue_self", lambda: calls.append(os.environ["SLURM_JOB_ID"]) or True)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    return calls


def log_steps(run: RunDir, count: int) -> None:
    run.logs.mkdir(exist_ok=True)
    with open(run.metrics_log, "a") as handle:
        for _ in range(count):
            handle.write(json.dumps({"step": 1, "loss": 1.0}) + "\n")


def test_a_crash_is_requeued_up_to_max_restarts_while_steps_are_made(run, requeued, monkeypatch):
    assert requeue.after_job_step(run, 0) == "ok" and requeued == []
    log_steps(run, 3)
    assert requeue.after_job_step(run, 1) == "requeued"
    log_steps(run, 2)  # the second attempt trained on, then crashed
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeue.after_job_step(run, 1) == "requeued"
    manifest = run.manifest()
    assert (manifest.crash_restarts, manifest.requeues, manifest.logged_steps_at_last_crash) == (2, 2, 5)
    assert manifest.state == State.REQUEUED and requeued == ["77", "77"]
    log_steps(run, 1)
    assert requeue.after_job_step(run, 1) == "failed (exit code 1; 2 of 2 crash restarts used)"
    assert len(requeued) == 2


def test_a_crash_without_a_step_since_the_last_one_is_not_requeued(run, requeued):
    log_steps(run, 4)
    assert requeue.after_job_step(run, 137) == "requeued"
    assert requeue.after_job_step(run, 137).startswith("failed (exit code 137; no training step since")
    assert requeued == ["77"]


def test_a_stop_signal_requeues_even_after_a_clean_exit_and_a_cancelled_run_is_not_requeued(run, requeued):
    run.update_manifest(stopped_in="77.0", state=State.PREEMPTED)
    assert requeue.after_job_step(run, 0) == "requeued after the stop signal" and requeued == ["77"]
    run.update_manifest(stopped_in=None, state=State.CANCELLED)
    log_steps(run, 1)
    assert requeue.after_job_step(run, 143) == "failed (exit code 143; 0 of 2 crash restarts used)"
    assert requeued == ["77"]


def test_a_run_moves_through_its_lifecycle_and_a_move_the_table_forbids_is_refused(run, requeued):
    lifecycle.preempted(run)
    lifecycle.crash_requeued(run, logged_steps=3)
    lifecycle.stage_finished(run, "train", last_stage=False)
    lifecycle.stage_finished(run, "merge", last_stage=False)
    lifecycle.stage_finished(run, "eval", last_stage=True)
    lifecycle.stage_finished(run, "eval", last_stage=True)  # a second shard's task finishing the same evaluation
    manifest = run.manifest()
    assert (manifest.state, manifest.requeues, manifest.crash_restarts, manifest.stopped_in) == (State.COMPLETED, 2, 1, "77.0")
    for event in (
        lifecycle.preempted,
        lambda r: lifecycle.crash_requeued(r, 4),
        lambda r: lifecycle.stage_finished(r, "merge", False),
    ):
        with pytest.raises(lifecycle.TransitionError, match="completed cannot become"):
            event(run)
    assert run.manifest() == manifest  # unchanged by the refused moves
    lifecycle.training(run)  # a relaunch (a longer max_steps) trains on
    assert run.manifest().state == State.TRAINING


def test_a_cancelled_run_stays_cancelled_when_its_job_reports_late_and_a_relaunch_moves_it_on(run, requeued):
    lifecycle.cancelled(run)
    lifecycle.preempted(run)  # the stop signal's save arrived after the cancel
    assert requeue.after_job_step(run, 0) == "ok" and requeued == []  # not requeued: the cancel wins
    lifecycle.stage_finished(run, "train", last_stage=False, record=StageRecord(wall_s=3.0, peak_rss_mib=10.0))
    manifest = run.manifest()
    assert (manifest.state, manifest.requeues, manifest.stopped_in, manifest.train.wall_s) == (State.CANCELLED, 0, None, 3.0)
    lifecycle.failed(run, "the merge job ran out of memory")
    lifecycle.relaunched_after_training(run)  # the adapter exists: only merge and eval are submitted
    manifest = run.manifest()
    assert (manifest.state, manifest.failure) == (State.TRAINED, None)


def test_memory_estimates_match_the_documented_arithmetic(tmp_path, tiny_assets):
    from launcher.launch.preflight import run_preflight

    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    estimate = lambda *flags: run_preflight(load_recipe(path, list(flags)), examples=1000).memory_bytes  # noqa: E731
    # fp32 LoRA, ZeRO-2 over 2 ranks, tiny Llama (111,936 parameters, hidden 64, 2 layers, 4 heads,
    # vocab 296), 16,384 adapter parameters, 8 x 64 tokens per step:
    weights, adapter = 111_936 * 4, 16_384 * 4
    gradients, optimizer = adapter / 2, 16_384 * 8 / 2
    tokens = 8 * 64
    logits = tokens * 296 * 4 * 2
    fixed = weights + adapter + gradients + optimizer
    sdpa = 2 * (tokens * 64 * 34) * 2 + logits  # sdpa keeps no attention scores
    assert estimate() == fixed + sdpa == 6_280_448
    padded_eager = 2 * (tokens * 64 * 34 + 5 * 4 * tokens * 64) * 2 + logits  # scores over one example's 64 tokens
    assert estimate('train.attention="eager"', 'data.batching="padded"') == fixed + padded_eager == 8_901_888
    packed_eager = 2 * (tokens * 64 * 34 + 5 * 4 * tokens * tokens) * 2 + logits  # over the whole packed row
    assert estimate('train.attention="eager"', 'data.batching="packed"') == fixed + packed_eager
    qlora = run_preflight(
        load_recipe(
            path,
            ['peft.method="qlora"', 'model.dtype="bf16"', 'distributed.deepspeed="zero3"', "train.gradient_checkpointing=true"],
        ),
        examples=1000,
    )
    assert qlora.memory_bytes == pytest.approx(
        2_850_882.56
    )  # checkpointing: no scores either way  # pinned: a change to the estimate is deliberate


@pytest.mark.parametrize(
    "examples, overrides, steps",
    [
        (1000, [], 12),  # max_steps wins
        (1000, ["train.max_steps=-1"], 63),  # ceil(ceil(1000 / 2 ranks) / 8 per batch)
        (1000, ["train.max_steps=-1", "train.gradient_accumulation_steps=4", "train.epochs=3"], 45),  # 3 x (63 // 4)
        (5, ["train.max_steps=-1"], 1),  # fewer examples than a batch: one step
    ],
)
def test_planned_steps(tmp_path, tiny_assets, examples, overrides, steps):
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)), overrides)
    assert planned_steps(recipe, examples) == steps


def test_adalora_schedule_takes_fractions_or_steps(tmp_path, tiny_assets):
    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets, extra='[peft]\nmethod = "adalora"\n'))
    assert load_recipe(path).peft.adalora_steps(200) == (20, 40)  # defaults 0.1 and 0.2 of the run
    assert load_recipe(path, ["peft.tinit=15", "peft.tfinal=0.5"]).peft.adalora_steps(200) == (15, 100)


def test_resume_reconciliation_accepts_safe_changes_and_refuses_the_rest(tmp_path):
    old = {"train": {"max_steps": 10, "learning_rate": 1e-3}, "eval": {"shards": 1}, "peft": {"r": 8}}
    new = {"train": {"max_steps": 20, "learning_rate": 1e-3}, "eval": {"shards": 2}, "peft": {"r": 8}}
    assert reconcile(old, new, tmp_path) == [
        "eval.shards: 1 -> 2 (the new value wins)",
        "train.max_steps: 10 -> 20 (the new value wins)",
    ]
    with pytest.raises(UserError) as refused:
        reconcile(old, new | {"peft": {"r": 4}, "train": {"max_steps": 10, "learning_rate": 2e-3}}, tmp_path)
    assert [line.split(" cannot")[0] for line in refused.value.lines] == ["peft.r: 8 -> 4", "train.learning_rate: 0.001 -> 0.002"]


@pytest.mark.parametrize("text, expected", [("90", 90), ("01:00:00", 60), ("00:10:01", 11), ("2-00:30:00", 2910)])
def test_slurm_times_in_minutes(text, expected):
    assert minutes(text) == expected


def add_requeues(root: str, count: int) -> None:
    run = RunDir(__import__("pathlib").Path(root))
    for _ in range(count):
        with run.editing_manifest() as manifest:
            manifest.requeues += 1


def test_concurrent_manifest_updates_lose_nothing(run):
    writers = [multiprocessing.get_context("spawn").Process(target=add_requeues, args=(str(run.root), 25)) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [w.exitcode for w in writers] == [0] * 4
    assert run.manifest().requeues == 100


def dead_process() -> dict:
    """The owner record of a process of this host that has ended."""
    import subprocess

    child = subprocess.Popen(["true"])
    owner = this_process("launch recipe.toml") | {"pid": child.pid, "start": process_start(child.pid)}
    child.wait()
    return owner


def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text("n9 4242 0")  # another host's holder, by an older launcher, that died inside its block
    os.utime(lock, (time.time() - 600, time.time() - 600))
    with exclusive(lock, stale_after_s=60):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    lock.write_text(json.dumps(dead_process()))  # fresh, but its holder ran here and is gone: taken at once
    with exclusive(lock, stale_after_s=60, timeout_s=5):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps(this_process() | {"host": "n9"}))  # fresh, held on another host
    with pytest.raises(TimeoutError, match="held for more than"):
        with exclusive(lock, stale_after_s=60, timeout_s=0.3):
            pass


def test_a_run_dir_in_use_is_refused_at_once_naming_its_user(tmp_path, capsys):
    with in_use(tmp_path, "launch a.toml"):
        with pytest.raises(UserError, match=rf"is in use by `launch a.toml` \(pid {os.getpid()} on "):
            with in_use(tmp_path, "launch merge"):
                pass
    (tmp_path / ".in-use").write_text(json.dumps(dead_process()))  # its launch was killed
    with in_use(tmp_path, "launch b.toml"):
        assert json.loads((tmp_path / ".in-use").read_text())["command"] == "launch b.toml"
    assert "which ended; taken over" in capsys.readouterr().out
    assert not (tmp_path / ".in-use").exists()


def test_an_unknown_manifest_key_or_state_is_refused(run):
    with pytest.raises(ValueError):
        Manifest.model_validate(json.loads(run.manifest_path.read_text()) | {"chained": ["merge"]})
    with pytest.raises(ValueError):
        Manifest.model_validate(json.loads(run.manifest_path.read_text()) | {"state": "finished"})


def test_a_manifest_of_the_previous_launcher_still_reads(run):
    """Run dirs made before the typed manifest resume: their misattributed timings and the
    `chained` flag are dropped, the rest is kept."""
    recorded = json.loads(run.manifest_path.read_text())
    old = recorded | {
        "chained": ["merge", "eval"],
        "train_wall_s": 39.1,
        "wall_s": 39.2,
        "peak_rss_mib": 563.8,
        "merge": {"merged_weights": 14, "shards": 1, "peak_rss_mib": 565.8},
        "merge-checkpoint-10": {"merged_weights": 14},
        "requeues": 1,
        "jobs": [{"executor": "local", "id": 4242, "submitted": "2026-01-01T00:00:00", "ranks": 2}],
    }
    run.manifest_path.write_text(json.dumps(old))
    manifest = run.manifest()
    assert (manifest.requeues, manifest.merge, manifest.jobs[0].id) == (1, None, "4242")
    run.manifest_path.write_text(json.dumps(recorded | {"state": "finished"}))
    with pytest.raises(UserError, match="manifest.json: state: Input should be"):
        run.manifest()


def test_a_build_lock_left_by_a_killed_build_is_said_and_cleared(tmp_path, capsys):
    """torch's FileBaton (which DeepSpeed's op builds wait on, with no timeout) held by a build that
    was killed: the watcher removes it once its folder is idle, and the waiting process goes on."""
    import threading

    from torch.utils.file_baton import FileBaton

    from launcher.train.buildlocks import check_build_locks, watch_build_locks

    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir()
    (build / "main.o").write_bytes(b"")
    killed = FileBaton(str(build / "lock"))
    assert killed.try_acquire()  # and never released
    assert check_build_locks(tmp_path, stale_after_s=60) == []  # a live build is waited for, and said
    assert "waiting for" in capsys.readouterr().out
    old = time.time() - 120
    for path in (build, build / "main.o", build / "lock"):
        os.utime(path, (old, old))
    done = watch_build_locks(tmp_path, stale_after_s=60, every_s=0.05)
    waiter = threading.Thread(target=FileBaton(str(build / "lock"), wait_seconds=0.05).wait, daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    done.set()
    assert not waiter.is_alive() and not (build / "lock").exists()
    assert "left by an extension build that ended without finishing" in capsys.readouterr().out


def test_publish_replaces_only_the_launchers_own_output_and_keeps_the_old_one(tmp_path, capsys):
    from launcher.rundir.runs import publish

    def staged(text: str):
        staging = tmp_path / f"staging-{text}"
        staging.mkdir()
        (staging / "model.bin").write_text(text)
        return staging

    out = publish(staged("one"), tmp_path / "merged")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        publish(staged("two"), out)
    publish(tmp_path / "staging-two", out, replace=True)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("merged.replaced-")]
    assert (out / "model.bin").read_text() == "two" and [(k / "model.bin").read_text() for k in kept] == ["one"]
    assert "the previous one is kept as" in capsys.readouterr().out

    users = tmp_path / "mine"
    (users / "sub").mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="was not written by the launcher"):
        publish(staged("three"), users, replace=True)
    assert sorted(p.name for p in users.rglob("*")) == ["notes.txt", "sub"]


def test_two_archives_in_one_second_keep_both(run):
    from launcher.rundir.runs import archive

    for text in ("first", "second"):
        (run.root / "sbatch.sh").write_text(text)
        archive(run, [run.root / "sbatch.sh"])
    assert sorted(p.read_text() for p in (run.root / "history").glob("*sbatch.sh*")) == ["first", "second"]


def test_compiled_extensions_are_cached_per_python_environment(tmp_path, monkeypatch):
    """Two venvs used to share (and invalidate) one ~/.cache/torch_extensions: each now gets its own
    folder, keyed by its sys.prefix; a TORCH_EXTENSIONS_DIR the user set is kept."""
    import sys

    from launcher.train import buildlocks

    folders = []
    for prefix in ("/opt/venv-a", "/opt/venv-b", "/opt/venv-a"):
        monkeypatch.setattr(sys, "prefix", prefix)
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        folders.append(buildlocks.use_environment_extension_cache())
    assert folders[0] == folders[2] != folders[1] and folders[0].name.startswith("env-")
    from torch.utils.cpp_extension import get_default_build_root

    assert folders[0].parent == folders[1].parent == Path(get_default_build_root())  # under torch's own root
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert buildlocks.use_environment_extension_cache() == tmp_path / "mine"


def test_a_run_of_an_earlier_version_resumes_and_an_objective_change_is_one_line(tmp_path, tiny_assets):
    """A run dir written before train.objective and [preference] existed holds neither: at their
    defaults they are no change (an upgrade never strands a run); a DPO run's beta cannot change."""
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)))
    today = recipe.to_dict()
    earlier = {name: table for name, table in today.items() if name != "preference"}
    earlier["train"] = {key: value for key, value in today["train"].items() if key != "objective"}
    assert reconcile(earlier, today, tmp_path) == []
    with pytest.raises(UserError) as refused:
        reconcile({"preference": {"beta": 0.1}}, {"preference": {"beta": 0.2}}, tmp_path)
    assert refused.value.lines == [
        f"preference.beta: 0.1 -> 0.2 cannot change when resuming {tmp_path} (the steps already taken followed the old "
        "objective); restore it, or start a new run with --run-dir"
    ]
    with pytest.raises(UserError):  # a key that is not at its default is a change, even if the old recipe lacks it
        reconcile(earlier, today | {"train": today["train"] | {"objective": "dpo"}}, tmp_path)

"""The faults a user meets, each on a real run (2 ranks, ZeRO-2 on CPU): whatever ends `launch`,
no process of the run is left behind and the relaunch resumes with the losses of an uninterrupted
run; a cancelled run stays cancelled; a relaunch after the last checkpoint trains no extra step;
a second launch into a busy run dir is refused at once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_launch, train_tiny, wait_for_rows
from conftest import start_launch as launch_in_background
from safetensors.torch import load_file

from launcher.rundir.runs import RunDir

pytestmark = pytest.mark.e2e  # real processes end to end: the full tier

STEPS = 12
LONG = 160  # runs killed while training: at ~15 steps/s here, long enough that the kill lands mid-training


def args_for(recipe: Path, run_dir: Path, steps: int = STEPS) -> list:
    save = 4 if steps == STEPS else 40
    sets = [f"train.max_steps={steps}", f"train.save_steps={save}", "merge.enabled=false", "eval.enabled=false"]
    return [recipe, "--run-dir", run_dir, "--executor", "local"] + [x for s in sets for x in ("--set", s)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_assets):
    folder = tmp_path_factory.mktemp("faults")
    sets = [f"train.max_steps={STEPS}", "train.save_steps=4", "merge.enabled=false", "eval.enabled=false"]
    recipe, run, _, _ = train_tiny(tiny_assets, folder, *sets, run_dir=folder / "straight", flags=["--executor", "local"])
    return recipe, run


def start_launch(recipe: Path, run_dir: Path, extra: list[str] = (), steps: int = STEPS) -> subprocess.Popen:
    """`launch` in a session of its own (as from a terminal: its own process group)."""
    return launch_in_background(*args_for(recipe, run_dir, steps), *extra, start_new_session=True)


def processes_of(run: RunDir) -> list[str]:
    """Command lines of live processes that belong to the run (they name a file inside it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, NotADirectoryError):
            continue
        if str(run.root.resolve()) in line and entry.name != str(os.getpid()):
            found.append(f"{entry.name}: {line}")
    return found


@pytest.fixture(scope="module")
def long_straight(straight):
    recipe, short = straight
    run = RunDir(short.root.with_name("long-straight"))
    result = run_launch(*args_for(recipe, run.root, LONG))
    assert result.returncode == 0, result.stdout + result.stderr
    return recipe, run


def losses(run: RunDir, steps: int = STEPS) -> dict[int, float]:
    rows = run.metrics.rows()
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "one row per step, after any number of resumes"
    return {r["step"]: r["loss"] for r in rows}


WAYS = {
    "ctrl-c": lambda p: os.kill(p.pid, signal.SIGINT),
    "sigterm": lambda p: os.kill(p.pid, signal.SIGTERM),
    "hang-up": lambda p: os.kill(p.pid, signal.SIGHUP),
    "sigterm-group": lambda p: os.killpg(p.pid, signal.SIGTERM),
    "sigkill": lambda p: os.kill(p.pid, signal.SIGKILL),
    "sigkill-group": lambda p: os.killpg(p.pid, signal.SIGKILL),
}


RELAUNCHED = ("ctrl-c", "sigkill-group")


@pytest.mark.parametrize("way", WAYS)
def test_whatever_ends_launch_no_rank_is_left_and_the_relaunch_resumes_exactly(long_straight, way):
    recipe, uninterrupted = long_straight
    run = RunDir(uninterrupted.root.with_name(f"ended-by-{way}"))
    launch = start_launch(recipe, run.root, steps=LONG)
    wait_for_rows(run, 5)
    WAYS[way](launch)
    output, _ = launch.communicate(timeout=180)
    deadline = time.time() + 10
    while processes_of(run) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_of(run) == [], output
    if way.startswith("sigkill"):  # no handler ran in launch: the ranks saw their parent go, saved and ended
        assert json.loads(run.manifest_path.read_text())["state"] == "preempted"
    else:
        assert "stopped; newest complete checkpoint: checkpoint-" in output, output
        assert json.loads(run.manifest_path.read_text())["state"] == "stopped"
    assert "Traceback" not in output
    saved = max(int(p.name.split("-")[1]) for p in run.checkpoints.glob("checkpoint-*"))
    assert saved == len(run.metrics.written())  # the ranks saved at the step they were at: nothing to redo
    if way not in RELAUNCHED:
        return  # the resume itself is the same for every way (CI time): checked for one handled, one unhandled
    again = run_launch(*args_for(recipe, run.root, LONG))
    assert again.returncode == 0, again.stdout + again.stderr
    want, got = losses(uninterrupted, LONG), losses(run, LONG)
    assert max(abs(want[s] - got[s]) for s in want) == 0.0
    assert len(run.metrics.written()) == LONG


def test_cancel_ends_the_run_which_stays_cancelled_and_resumes(long_straight):
    recipe, uninterrupted = long_straight
    run = RunDir(uninterrupted.root.with_name("cancelled"))
    launch = start_launch(recipe, run.root, steps=LONG)
    wait_for_rows(run, 5)
    cancelled = run_launch("cancel", run.root)
    assert cancelled.returncode == 0, cancelled.stderr
    output, _ = launch.communicate(timeout=60)
    assert launch.returncode == 1 and "was cancelled" in output and "Traceback" not in output, output
    assert json.loads(run.manifest_path.read_text())["state"] == "cancelled"
    assert processes_of(run) == []
    again = run_launch(*args_for(recipe, run.root, LONG))
    assert again.returncode == 0 and "Traceback" not in again.stdout + again.stderr, again.stdout + again.stderr
    want, got = losses(uninterrupted, LONG), losses(run, LONG)
    assert max(abs(want[s] - got[s]) for s in want) == 0.0


def test_a_relaunch_after_the_last_checkpoint_trains_no_extra_step(straight, tmp_path):
    """Killed after the last checkpoint but before the final adapter was published: the relaunch
    publishes the adapter of the plan's last step, equal to the uninterrupted run's."""
    recipe, uninterrupted = straight
    run = RunDir(tmp_path / "killed-before-publish")
    shutil.copytree(uninterrupted.root, run.root, ignore=shutil.ignore_patterns("adapter", "local"))
    again = run_launch(*args_for(recipe, run.root))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing left to train" in run.rank_log(0).read_text()
    assert [r["step"] for r in run.metrics.written()] == list(range(1, STEPS + 1))  # no step 13
    want = load_file(str(uninterrupted.adapter / "adapter_model.safetensors"))
    got = load_file(str(run.adapter / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


def test_a_second_launch_into_a_busy_run_dir_is_refused_and_the_first_is_unharmed(straight):
    recipe, uninterrupted = straight
    run = RunDir(uninterrupted.root.with_name("busy"))
    first = start_launch(recipe, run.root, ["--set", "train.max_steps=20000"])  # busy throughout, even on a loaded machine
    wait_for_rows(run, 2)
    for command in (args_for(recipe, run.root), ["merge", run.root]):
        second = run_launch(*command)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "is in use by `launch" in second.stderr and f"(pid {first.pid} " in second.stderr, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert first.poll() is None and json.loads(run.manifest_path.read_text())["state"] == "training"
    wait_for_rows(run, 9)  # two complete checkpoints to evaluate
    evaluation = run_launch("eval", run.root, "--checkpoints", "all", "--no-base")
    assert evaluation.returncode == 0, evaluation.stdout + evaluation.stderr
    assert "stays its own: this one goes to" in evaluation.stdout and not run.eval.exists()  # eval/ is the run's
    assert [p.name for p in run.root.glob("eval-*/metrics.json")] == ["metrics.json"]
    written = len(run.metrics.written())
    wait_for_rows(run, written + 2)  # the first run trains on
    os.kill(first.pid, signal.SIGINT)
    output, _ = first.communicate(timeout=120)
    rows = run.metrics.written()
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and {r["attempt"] for r in rows} == {1}, output


def test_a_full_disk_fails_the_run_with_the_reason_and_it_resumes_once_there_is_room(long_straight, tmp_path):
    recipe, uninterrupted = long_straight
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", disk], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small file system of its own (mount, as root): {mounted.stderr.decode().strip()}")
    try:
        run = RunDir(disk / "run")
        launch = start_launch(recipe, run.root, steps=LONG)
        wait_for_rows(run, 1)
        with open(disk / "filler", "wb") as filler:  # the disk fills up while the run trains
            with pytest.raises(OSError):
                while True:
                    filler.write(b"\0" * 2**16)
                    filler.flush()
        output, _ = launch.communicate(timeout=240)
        assert launch.returncode == 1, output
        manifest = json.loads(run.manifest_path.read_text())
        assert manifest["state"] == "failed" and "file system is full" in manifest["failure"], manifest
        assert "disk full" in output and processes_of(run) == []
        (disk / "filler").unlink()
        again = run_launch(*args_for(recipe, run.root, LONG))
        assert again.returncode == 0, again.stdout + again.stderr
        want, got = losses(uninterrupted, LONG), losses(run, LONG)
        assert max(abs(want[s] - got[s]) for s in want) == 0.0
    finally:
        subprocess.run(["umount", "-l", disk], capture_output=True)


def test_an_evaluation_killed_midway_is_finished_by_the_relaunch_with_the_same_metrics(straight, tmp_path):
    recipe, uninterrupted = straight
    clean, killed = RunDir(tmp_path / "clean"), RunDir(tmp_path / "killed")
    for run in (clean, killed):
        shutil.copytree(uninterrupted.root, run.root, ignore=shutil.ignore_patterns("local"))
    evaluate = ["--set", "eval.enabled=true", "--set", "eval.shards=2"]
    assert run_launch(*args_for(recipe, clean.root), *evaluate).returncode == 0
    launch = start_launch(recipe, killed.root, evaluate)
    deadline = time.time() + 240
    while not list(killed.eval.glob("shards/*/*.done")):
        assert time.time() < deadline and launch.poll() is None, "no shard finished"
        time.sleep(0.02)
    os.killpg(launch.pid, signal.SIGKILL)  # launch and its group; the shard tasks are in a group of their own
    launch.wait()
    assert not (killed.eval / "metrics.json").exists(), "killed too late to test anything"
    deadline = time.time() + 10
    while processes_of(killed) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_of(killed) == []
    again = run_launch(*args_for(recipe, killed.root), *evaluate)
    assert again.returncode == 0, again.stdout + again.stderr
    want, got = (json.loads((run.eval / "metrics.json").read_text()) for run in (clean, killed))
    assert got["systems"] == want["systems"] and got["examples"] == want["examples"]


def test_four_local_runs_started_at_once_all_train_with_the_same_losses(straight):
    """Each run's ranks meet on the one port its executor held for it (no port chosen and let go, as
    the check-in's MASTER_PORT + 1 once was): four at once, eight ranks on this machine, all train."""
    recipe, uninterrupted = straight
    runs = [RunDir(uninterrupted.root.with_name(f"at-once-{i}")) for i in range(4)]
    launches = [start_launch(recipe, run.root) for run in runs]
    outputs = [launch.communicate(timeout=900)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0] * 4, "\n".join(outputs)
    ports = {re.search(r"master 127\.0\.0\.1:(\d+)", run.rank_log(0).read_text()).group(1) for run in runs}
    assert len(ports) == 4
    want = losses(uninterrupted, STEPS)
    assert all(losses(run, STEPS) == want for run in runs)

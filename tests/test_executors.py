"""The executor interface with real processes (local) and the installed submitit (SLURM rendering)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_recipe_text, write_recipe

from launcher.launch.executors.base import CANCELLED, COMPLETED, FAILED, STOP_SIGNAL, Resources
from launcher.launch.executors.local import LocalExecutor, processes_running


class WriteRank:
    """A body that records what its task saw."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self):
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "OMP_NUM_THREADS")
        Path(self.folder, f"task-{os.environ['RANK']}").write_text(" ".join(os.environ[k] for k in keys))


class FailOnRankOne:
    """Rank 1 fails at once; rank 0 would wait a minute (as a rank in a collective would)."""

    def __call__(self):
        if os.environ["RANK"] == "1":
            raise RuntimeError("rank 1 failed")
        time.sleep(60)


@pytest.fixture
def executor(tmp_path, monkeypatch) -> LocalExecutor:
    monkeypatch.setenv("PYTHONPATH", f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return LocalExecutor(tmp_path / "jobs")


def wait(job, timeout_s: float = 60) -> str:
    deadline = time.time() + timeout_s
    while job.active() and time.time() < deadline:
        time.sleep(job.poll_interval_s)
    return job.state()


def test_every_task_gets_its_rank_and_the_distributed_variables(executor, tmp_path):
    job = executor.submit(WriteRank(str(tmp_path)), Resources(name="t", stage="train", tasks_per_node=2))
    assert wait(job) == COMPLETED
    seen = [(tmp_path / f"task-{rank}").read_text().split() for rank in (0, 1)]
    assert [s[:4] for s in seen] == [["0", "0", "2", "127.0.0.1"], ["1", "1", "2", "127.0.0.1"]]
    assert int(seen[0][4]) == max(1, (os.cpu_count() or 1) // 2)


def test_one_failed_rank_ends_the_others_and_the_job_after_it_never_starts(executor, tmp_path):
    started = time.time()
    ranks = executor.submit(FailOnRankOne(), Resources(name="t", stage="train", tasks_per_node=2, all_or_nothing=True))
    after = executor.submit(WriteRank(str(tmp_path)), Resources(name="m", stage="merge"), after=ranks)
    assert after.state() == "PENDING"
    assert wait(ranks) == FAILED and time.time() - started < 30  # not rank 0's minute
    assert wait(after) == CANCELLED and not (tmp_path / "task-0").exists()
    assert "RuntimeError: rank 1 failed" in ranks.log(1).read_text()


def test_a_job_waits_for_the_one_before_it(executor, tmp_path):
    first = executor.submit(WriteRank(str(tmp_path / "a")), Resources(name="a", stage="train"))
    (tmp_path / "a").mkdir()
    second = executor.submit(WriteRank(str(tmp_path / "b")), Resources(name="b", stage="merge"), after=first)
    (tmp_path / "b").mkdir()
    assert wait(second) == COMPLETED and wait(first) == COMPLETED
    assert (tmp_path / "a" / "task-0").stat().st_mtime <= (tmp_path / "b" / "task-0").stat().st_mtime


def test_a_cancelled_job_ends_every_task_and_stays_cancelled(executor):
    job = executor.submit(FailOnRankOne(), Resources(name="t", stage="train", tasks_per_node=1))
    time.sleep(0.5)
    recorded = executor.job(job.record)  # as `launch cancel` finds it from the manifest
    assert recorded.active() and recorded.members()
    recorded.cancel()
    assert wait(job) == CANCELLED and not recorded.active() and not recorded.members()


class SaveOnStop:
    """Waits for the stop signal, then 'saves' (writes a file) and ends cleanly, as a training rank does."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self):
        import signal

        stopped = []
        signal.signal(STOP_SIGNAL, lambda *_: stopped.append(True))
        Path(self.folder, f"ready-{os.environ['RANK']}").write_text(str(os.getpid()))
        deadline = time.time() + 60
        while not stopped and time.time() < deadline:
            time.sleep(0.05)
        Path(self.folder, f"saved-{os.environ['RANK']}").write_text("stop" if stopped else "timeout")


def wait_for(path: Path, timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_stop_asks_every_task_to_save_then_waits_for_it(executor, tmp_path):
    job = executor.submit(SaveOnStop(str(tmp_path)), Resources(name="t", stage="train", tasks_per_node=2))
    for rank in (0, 1):
        wait_for(tmp_path / f"ready-{rank}")
    job.stop(grace_s=20)
    assert [(tmp_path / f"saved-{rank}").read_text() for rank in (0, 1)] == ["stop", "stop"]
    assert job.state() == COMPLETED and not job.members()


def test_tasks_whose_launcher_was_killed_save_and_end(tmp_path):
    """SIGKILL of the process that started the tasks (no handler can run): each task notices that
    its parent is gone, gets the stop signal, saves and ends; no process of the job is left."""
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from launcher.launch.executors.local import LocalExecutor; from launcher.launch.executors.base import Resources;"
            "from test_executors import SaveOnStop;"
            "job = LocalExecutor(sys.argv[1]).submit(SaveOnStop(sys.argv[2]), Resources(name='t', stage='train', tasks_per_node=2));"
            "print(job.body_file, flush=True); time.sleep(600)",
            str(tmp_path / "jobs"),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"},
    )
    body_file = parent.stdout.readline().strip()
    for rank in (0, 1):
        wait_for(tmp_path / f"ready-{rank}")
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for rank in (0, 1):
        wait_for(tmp_path / f"saved-{rank}", timeout_s=10)
    deadline = time.time() + 10
    while processes_running(body_file) and time.time() < deadline:
        time.sleep(0.1)
    assert [(tmp_path / f"saved-{rank}").read_text() for rank in (0, 1)] == ["stop", "stop"]
    assert processes_running(body_file) == []


def test_submitits_private_script_renderer_still_works(tmp_path, tiny_assets):
    """The one private submitit call (executors/slurm.rendered_script), against the installed submitit."""
    from launcher.config.recipe import load_recipe
    from launcher.launch.executors.slurm import SlurmExecutor

    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)), ['slurm.partition="gpu"'])
    script = SlurmExecutor(recipe.slurm, tmp_path / "slurm").submission_script(
        Resources(
            name="tiny", stage="train", nodes=2, tasks_per_node=4, time_minutes=30, requeue_run="/runs/x", all_or_nothing=True
        )
    )
    assert script.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --requeue" in script and "--kill-on-bad-exit=1" in script
    assert "-m launcher.launch.executors.requeue /runs/x" in script and "submitit.core._submit" in script


class IgnoreStop:
    """A task that cannot save (it ignores the stop signal), as one stuck in a collective."""

    def __init__(self, ready: Path):
        self.ready = ready

    def __call__(self):
        import signal

        signal.signal(STOP_SIGNAL, signal.SIG_IGN)
        (self.ready / os.environ["RANK"]).touch()  # the handler is in place
        time.sleep(60)


def test_a_task_that_does_not_stop_in_its_grace_is_cancelled(executor, tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    job = executor.submit(IgnoreStop(ready), Resources(name="t", stage="train", tasks_per_node=2))
    deadline = time.time() + 60
    while time.time() < deadline and len(list(ready.iterdir())) < 2:  # a loaded machine starts them late
        time.sleep(0.1)
    started = time.time()
    job.stop(grace_s=1.0)
    assert job.state() == CANCELLED and not job.members() and time.time() - started < 15


def fake_scheduler(folder, name: str, hang_first: int) -> None:
    """A stand-in for a SLURM command whose controller is slow: the first `hang_first` calls hang."""
    script = folder / name
    script.write_text(
        "#!/bin/sh\n"
        f'count=$(cat "{folder}/{name}.calls" 2>/dev/null || echo 0); echo $((count + 1)) > "{folder}/{name}.calls"\n'
        f'if [ "$count" -lt {hang_first} ]; then exec sleep 30; fi\n'
        'echo "JobId=7 JobName=x JobState=PENDING Reason=Priority"\n'
    )
    script.chmod(0o755)


def test_a_slow_scheduler_is_asked_again_with_back_off_and_never_a_traceback(tmp_path, monkeypatch):
    """A real controller that takes longer than the timeout (here a script on PATH, as no cluster here can
    be made slow on purpose): asked again after 2 s; when it never answers, one line and the job untouched."""
    from launcher.errors import UserError
    from launcher.launch.executors import slurm

    monkeypatch.setattr(slurm, "SCHEDULER_TIMEOUT_S", 0.5)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    fake_scheduler(tmp_path, "scontrol", hang_first=1)
    started = time.time()
    assert slurm.job_state("7") == "PENDING"
    assert (tmp_path / "scontrol.calls").read_text().strip() == "2" and 2.0 <= time.time() - started < 10
    fake_scheduler(tmp_path, "squeue", hang_first=99)
    (tmp_path / "scontrol.calls").write_text("0\n")
    monkeypatch.setattr(slurm, "SCHEDULER_TRIES", 2)
    with pytest.raises(UserError) as refused:
        slurm.scheduler(["squeue", "-h", "-j", "7"])
    assert str(refused.value).startswith("SLURM did not answer `squeue -h -j 7` within 0.5 s, 2 times")


def test_a_pending_jobs_reason_reads_in_words_with_its_expected_start():
    from launcher.launch.executors.slurm import waiting_reason

    assert waiting_reason({"JobState": "PENDING", "Reason": "Resources", "StartTime": "2026-11-24T03:00:00"}) == (
        "Resources: waiting for nodes to free up; expected start 2026-11-24T03:00:00"
    )
    assert (
        waiting_reason({"Reason": "QOSGrpNodeLimit", "StartTime": "Unknown"}) == "QOSGrpNodeLimit"
    )  # not in words: as SLURM says it
    assert waiting_reason({"Reason": "None", "StartTime": "2026-11-24T03:00:00"}) == "expected start 2026-11-24T03:00:00"
    assert waiting_reason({"Reason": "None", "StartTime": "Unknown"}) is None


def test_a_gpu_recipe_bound_for_slurm_without_a_gpu_request_is_warned(tmp_path, tiny_assets):
    from launcher.config.recipe import load_recipe
    from launcher.launch.preflight import gpu_request_warning

    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    gpu = ['distributed.device="cuda"', "distributed.nodes=2"]
    warning = gpu_request_warning(load_recipe(path, gpu), queued=True)
    assert warning.startswith("slurm.gpus_per_node: this recipe trains on GPUs (distributed.device = cuda) but its SLURM")
    assert "set slurm.gpus_per_node = 2 (one rank per GPU)" in warning and "--profile SITE" in warning
    assert gpu_request_warning(load_recipe(path, [*gpu, "slurm.gpus_per_node=2"]), queued=True) is None
    assert gpu_request_warning(load_recipe(path), queued=False) is None  # a CPU recipe on this machine

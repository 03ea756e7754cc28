"""Multi-node runs through submitit on a real SLURM: the dev cluster (slurmctld + nodes n1, n2 on this machine)."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from conftest import (
    GOLDEN,
    REPO,
    assert_matches_golden,
    dpo_recipe_text,
    free_port,
    in_vllm_env,
    lines_until,
    needs_vllm_env,
    run_launch,
    start_in_vllm_env,
    start_launch,
    tiny_recipe_text,
    train_tiny,
    wait_for_rows,
    write_recipe,
)

from launcher.adapters.merge import validate_adapter
from launcher.config.recipe import load_recipe
from launcher.rundir.runs import RunDir

# One dev cluster, one test at a time: under `-n 2 --dist loadgroup` these run in order on one
# worker (mostly waiting on SLURM) while the other worker runs the rest of the suite.
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.e2e]

HOSTILE_ENV = "$(touch pwned); `touch pwned` 'single' \"double\" $HOME \\"


CLUSTER_LOCK = Path("/tmp/launcher-dev-cluster.lock")  # beside the cluster's state dir, which `down` removes
USERS = Path("/tmp/launcher-dev-cluster.users")


@contextmanager
def cluster_lock():
    """flock on the cluster, held exclusive by each test while it uses the cluster and by bringing
    the cluster up or down: xdist_group keeps these tests on one worker, and the lock keeps them one
    at a time however the suite is split (a test that fills both nodes blocks any other job, and a
    `down` would end another test's jobs)."""
    with open(CLUSTER_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def users(joining: bool) -> list[int]:
    """The live test processes using the cluster, after this one joins or leaves (under the
    exclusive lock; a killed suite's entry does not count)."""
    listed = {int(pid) for pid in USERS.read_text().split()} if USERS.exists() else set()
    alive = {pid for pid in listed if Path(f"/proc/{pid}").exists() and pid != os.getpid()}
    alive |= {os.getpid()} if joining else set()
    USERS.write_text(" ".join(map(str, sorted(alive))))
    return sorted(alive)


@pytest.fixture(scope="module")
def dev_cluster_up():
    """The cluster, up for this module; the last module to leave it takes it down."""
    if os.geteuid() != 0:
        pytest.skip("the dev cluster needs root (apt packages, munge key, /etc/hosts)")
    with cluster_lock():
        up = subprocess.run([REPO / "slurm" / "dev-cluster", "up"], capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stderr
        users(joining=True)
    saved = dict(os.environ)
    for line in up.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        os.environ[name] = value
    yield
    os.environ.clear()
    os.environ.update(saved)
    with cluster_lock():
        if not users(joining=False):
            subprocess.run([REPO / "slurm" / "dev-cluster", "down"], capture_output=True, timeout=120)
            USERS.unlink(missing_ok=True)


@pytest.fixture
def dev_cluster(dev_cluster_up):
    """The cluster, held for one test."""
    with cluster_lock():
        yield


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in RunDir(run_dir).metrics_log.read_text().splitlines()]


def test_two_nodes_train_and_match_a_local_run(dev_cluster, tmp_path, tiny_assets, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    zero3 = ["--set", "distributed.deepspeed=zero3"]
    secrets = {"HF_TOKEN": "hf_slurmSECRET0123456789", "WANDB_API_KEY": "0123456789abcdef-slurm-secret-key"}
    for key, value in secrets.items():  # the jobs inherit the environment; no file may hold it
        monkeypatch.setenv(key, value)
    slurm = run_launch(
        recipe,
        "--run-dir",
        tmp_path / "slurm",
        "--nodes",
        "2",
        "--procs-per-node",
        "1",
        "--profile",
        "dev",
        "--set",
        "eval.shards=2",
        "--set",
        "train.report_to=tensorboard",  # the default, which the tests' tiny recipe turns off
        *zero3,
    )
    assert slurm.returncode == 0, slurm.stdout + slurm.stderr
    run = RunDir(tmp_path / "slurm")
    # Merge and eval ran as their own jobs, each queued to start after the previous one succeeded.
    manifest = json.loads(run.manifest_path.read_text())
    train_id = manifest["jobs"][-1]["id"]
    merge, evaluation = manifest["chain"]
    assert (merge["stage"], merge["after"], evaluation["stage"], evaluation["after"]) == ("merge", train_id, "eval", merge["id"])
    assert f"queued eval as SLURM job {evaluation['id']} (after {merge['id']} succeeds)" in slurm.stdout
    assert "merged model" in (run.logs / "slurm" / f"{merge['id']}_0_log.out").read_text()  # not the ranks: the chain
    markers = [json.loads(p.read_text()) for p in (run.eval / "shards").rglob("*.done")]
    assert len(markers) == 4 and {m["node"] for m in markers} <= {"n1", "n2"}  # 2 shards x (base, adapter) as SLURM tasks
    assert manifest["state"] == "completed" and "report: " in run_launch("status", run.root).stdout
    assert "rank 0 of 2 on node n1" in run.rank_log(0).read_text()
    assert "rank 1 of 2 on node n2" in run.rank_log(1).read_text()
    assert "topology: 2 nodes, 2 ranks, backend gloo; n1: ranks [0], n2: ranks [1]" in run.rank_log(0).read_text()
    assert "valid" in validate_adapter(run.adapter)
    assert (run.merged / "model.safetensors").exists() and (run.eval / "report.md").exists()
    assert json.loads(run.manifest_path.read_text())["jobs"][-1]["executor"] == "slurm"
    assert "job " in slurm.stdout and ": running" in slurm.stdout and ": completed" in slurm.stdout
    said = " ".join(slurm.stdout.split())
    board = f"tensorboard --logdir {run.root / 'tensorboard'}"
    assert f"follow: launch status {run.root} | launch logs {run.root} -f | {board} | end: launch cancel {run.root}" in said
    assert f"next: launch status {run.root} | launch logs {run.root} | {board} | launch eval {run.root} --checkpoints all" in said
    # sbatch scripts, submitit's pickles, logs, event files: the secrets of the environment are in none.
    for path in (p for p in run.root.rglob("*") if p.is_file()):
        assert not any(secret.encode() in path.read_bytes() for secret in secrets.values()), path
    assert list((run.logs / "slurm").glob("*.pkl")) and list((run.logs / "slurm").glob("*.sh"))

    local = run_launch(recipe, "--run-dir", tmp_path / "local", "--executor", "local", *zero3)
    assert local.returncode == 0, local.stdout + local.stderr
    on_slurm, on_local = losses(tmp_path / "slurm"), losses(tmp_path / "local")
    assert len(on_slurm) == len(on_local) == 12
    assert max(abs(a - b) / abs(b) for a, b in zip(on_slurm, on_local)) <= 1e-4


TWO_NODES = ("--nodes", "2", "--procs-per-node", "1", "--profile", "dev")  # one rank on each dev-cluster node


def submitits_master_port(job_id: str) -> int:
    """The MASTER_PORT submitit derives for a job (helpers.TorchDistributedEnvironment)."""
    return random.Random(job_id).randint(20000, 60000)


def test_a_two_node_run_whose_master_port_is_taken_meets_on_a_derived_one_and_trains(dev_cluster, tmp_path, tiny_assets):
    """MASTER_PORT on SLURM comes from the job id; here another process holds it on n1 (this machine)
    for each of the next job ids: rank 0 listens on a port derived from the allocation instead, and
    rank 1, on the other node, finds it there (passing over the holder, which never answers)."""
    probe = subprocess.run(
        ["sbatch", "--parsable", "--output", "/dev/null", "--wrap", "true"], capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    last = int(probe.stdout.strip().split(";")[0])
    held = {}
    try:
        for job in range(last + 1, last + 12):  # the cluster is ours while the test holds its lock
            with suppress(OSError):
                sock = socket.socket()
                sock.bind(("0.0.0.0", submitits_master_port(str(job))))
                sock.listen()
                held[str(job)] = sock
        recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
        run = RunDir(tmp_path / "run")
        sets = ["merge.enabled=false", "eval.enabled=false"]
        result = run_launch(recipe, "--run-dir", run.root, *TWO_NODES, *[x for s in sets for x in ("--set", s)])
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for sock in held.values():
            sock.close()
    job = job_id_of(run)
    assert job in held, f"job {job}: not one of the jobs whose port was held ({sorted(held)})"
    taken = submitits_master_port(job)
    rank0, rank1 = run.rank_log(0).read_text(), run.rank_log(1).read_text()
    assert f"master n1:{taken}" in rank0 and f"rendezvous: ports [{taken}] are in use on n1; listening on " in rank0
    assert f"rendezvous: port {taken} on n1 is held by something that is not a store: passed over" in rank1
    assert "topology: 2 nodes, 2 ranks, backend gloo" in rank0 and len(losses(run.root)) == 12


def test_a_dpo_run_on_two_nodes_matches_a_local_one(dev_cluster, tmp_path, tiny_assets):
    """DPO (TRL's trainer inside the worker) across two SLURM nodes: its ranks meet, train with the
    reference forward on each, log rewards, and the losses equal a local 2-rank run's (fp32)."""
    recipe = write_recipe(tmp_path, dpo_recipe_text(tiny_assets), "dpo.toml")
    sets = [x for s in ("merge.enabled=false", "eval.enabled=false") for x in ("--set", s)]
    slurm = run_launch(
        recipe, "--run-dir", tmp_path / "slurm", "--nodes", "2", "--procs-per-node", "1", "--profile", "dev", *sets
    )
    assert slurm.returncode == 0, slurm.stdout + slurm.stderr
    run = RunDir(tmp_path / "slurm")
    assert "topology: 2 nodes, 2 ranks, backend gloo; n1: ranks [0], n2: ranks [1]" in run.rank_log(0).read_text()
    assert all("rewards/accuracies" in row for row in run.metrics.rows()) and "valid" in validate_adapter(run.adapter)
    local = run_launch(recipe, "--run-dir", tmp_path / "local", "--executor", "local", *sets)
    assert local.returncode == 0, local.stdout + local.stderr
    on_slurm, on_local = losses(tmp_path / "slurm"), losses(tmp_path / "local")
    assert len(on_slurm) == len(on_local) == 12
    assert max(abs(a - b) / abs(b) for a, b in zip(on_slurm, on_local)) <= 1e-4


def test_the_transnormer_seed_recipe_on_two_nodes(dev_cluster, tmp_path):
    """The headline recipe, with a tiny model of TransNormerLLM's real remote code, on 2 SLURM nodes (ZeRO-3)."""
    from seed_models import build_seed_model, require_upstream

    require_upstream()
    model = build_seed_model("transnormer", tmp_path / "model")
    sets = [f"model.name_or_path={model}", "distributed.deepspeed=zero3", "train.max_steps=8", "train.save_steps=4"]
    sets += ["train.logging_steps=1", "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "eval.max_new_tokens=4"]
    result = run_launch(
        REPO / "recipes" / "transnormer-lora.toml",
        *("--run-dir", tmp_path / "run", "--nodes", "2", "--procs-per-node", "1", "--profile", "dev"),
        *(a for s in sets for a in ("--set", s)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run = RunDir(tmp_path / "run")
    assert "topology: 2 nodes, 2 ranks, backend gloo; n1: ranks [0], n2: ranks [1]" in run.rank_log(0).read_text()
    rows = run.metrics.rows()
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(r["loss"] == r["loss"] for r in rows)
    assert "valid" in validate_adapter(run.adapter) and (run.merged / "modeling_transnormer.py").exists()
    metrics = json.loads((run.eval / "metrics.json").read_text())
    assert set(metrics["systems"]) == {"base", "adapter"} and "generation_failed" not in metrics


def test_a_failing_rank_fails_the_job_with_its_log_lines(dev_cluster, tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets) + '[slurm]\nenvironment = { LAUNCHER_FAIL_RANK = "1" }\n')
    started = time.time()
    result = run_launch(recipe, "--run-dir", tmp_path / "run", "--nodes", "2", "--procs-per-node", "1", "--profile", "dev")
    assert result.returncode == 1
    assert "ended FAILED" in result.stdout
    assert "rank1 failed: RuntimeError: injected failure on rank 1 (LAUNCHER_FAIL_RANK=1)" in result.stdout
    assert f"last lines of {tmp_path / 'run' / 'logs' / 'rank1.log'}" in result.stdout
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["state"] == "failed"
    # The crash is requeued once (slurm.max_restarts = 2); failing again with no step made, it is not.
    assert manifest["crash_restarts"] == 1 and manifest["logged_steps_at_last_crash"] == 0
    assert (
        "no training step since the previous crash"
        in (tmp_path / "run" / "logs" / "slurm").joinpath(f"{manifest['jobs'][-1]['id']}_0_log.out").read_text()
    )
    # Not a timing target: rank 0 must not sit in a collective until its 30-minute timeout.
    assert time.time() - started < 300


def test_status_logs_and_cancel_on_a_running_job(dev_cluster, tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    run_dir = tmp_path / "run"
    submitted = run_launch(
        recipe,
        "--run-dir",
        run_dir,
        "--nodes",
        "2",
        "--procs-per-node",
        "1",
        "--profile",
        "dev",
        "--detach",
        "--set",
        "train.max_steps=100000",
        "--set",
        "train.save_steps=100000",
    )
    assert submitted.returncode == 0 and "detached" in submitted.stdout, submitted.stderr
    run = RunDir(run_dir)
    wait_for_rows(run, 2, timeout_s=180)
    status = run_launch("status", run_dir)
    assert status.returncode == 0
    assert f"{run_dir}: training, step " in status.stdout and "/100000" in status.stdout
    job_id = json.loads(run.manifest_path.read_text())["jobs"][-1]["id"]
    assert f"SLURM job {job_id} running, 2 nodes, 2 ranks" in status.stdout

    logs = run_launch("logs", run_dir, "--rank", "1")
    assert logs.returncode == 0 and "rank 1 of 2 on node n2" in logs.stdout
    follower = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "logs", str(run_dir), "-f"], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    cancelled = run_launch("cancel", run_dir)
    assert cancelled.returncode == 0 and f"cancelled slurm job {job_id}" in cancelled.stdout
    followed, _ = follower.communicate(timeout=60)  # -f stops by itself once the job ended
    assert "rank 0 of 2 on node n1" in followed
    after = run_launch("status", run_dir)
    assert f"{run_dir}: cancelled" in after.stdout and f"SLURM job {job_id} cancelled" in after.stdout
    assert run_launch("cancel", run_dir).returncode == 2  # nothing left to cancel


# Each at the edge of what SLURM accepts for the key (lists, features with operators).
EDGE = {"partition": "gpu-a.1,debug_2", "account": "lab_x.y", "qos": "normal,high", "constraint": "[a100|h100]&ib*2"}
# sbatch splits #SBATCH lines with its own tokenizer: shell quoting cannot keep these on one option.
HOSTILE_DIRECTIVES = [
    "x; touch pwned",
    "$(touch pwned)",
    "a'b\"c $HOME",
    "a\\'\"'\"'b'\"'\"' --comment=X #",
    "a\\ --comment=X",
    "gpu --comment=X",
    "gpu\t--comment=X",
]


def sbatch_options(script: str) -> list[list[str]]:
    """The options sbatch reads from each #SBATCH line: it splits the rest of the line on blanks,
    honouring quotes and backslashes, and takes every word that starts with - as an option."""
    return [shlex.split(line.removeprefix("#SBATCH")) for line in script.splitlines() if line.startswith("#SBATCH")]


def test_every_sbatch_directive_is_one_option_and_hostile_values_never_get_there(tmp_path, tiny_assets):
    """Golden sbatch.sh with values at the edge of what SLURM accepts; each #SBATCH line parses to
    exactly one option. Values that would add an option are refused with their key; the
    environment (script body, shell-quoted) is run by real bash with a recording `srun` stand-in,
    and nothing hostile executes."""

    from launcher.errors import UserError
    from launcher.launch.executors.factory import make_executor
    from launcher.launch.pipeline import stage_resources

    slurm = "".join(f"{key} = {json.dumps(value)}\n" for key, value in EDGE.items())
    text = (
        tiny_recipe_text(tiny_assets, name="tiny.v2-a_b") + f'[slurm]\n{slurm}mem = "64G"\ntime = "00:10:00"\n'
        f"environment = {{ EVIL = {json.dumps(HOSTILE_ENV)} }}\n"
    )
    recipe = load_recipe(write_recipe(tmp_path, text), ["distributed.nodes=2"])
    run = RunDir(tmp_path / "run+@,=:x")
    script = make_executor("slurm", recipe, run.logs).submission_script(stage_resources(recipe, "train", run))
    assert_matches_golden(
        script.replace(str(run.root.resolve()), "{RUN_DIR}").replace(sys.executable, "{PYTHON}"), GOLDEN / "sbatch.sh"
    )
    options = sbatch_options(script)
    assert all(len(words) == 1 and words[0].startswith("--") for words in options), options
    for key, value in EDGE.items():
        assert [f"--{key}={value}"] in options
    assert [f"--job-name={recipe.name}"] in options

    for key in EDGE:
        for value in HOSTILE_DIRECTIVES:
            with pytest.raises(UserError, match=rf"slurm(\.|: ){key}: .*(as SLURM accepts on an #SBATCH line|control character)"):
                load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)), [f"slurm.{key}={json.dumps(value)}"])

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$EVIL" > "$RECORD"\nprintf "%s\\n" "$@" >> "$RECORD"\n')
    (bin_dir / "srun").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(tmp_path / "record"), "HOME": "/home-x"}
    subprocess.run(["bash", "-c", script], cwd=work, env=env, check=True)
    recorded = (tmp_path / "record").read_text().splitlines()
    assert recorded[0] == HOSTILE_ENV
    assert recorded[-1] == str((run.root / "logs" / "slurm").resolve())
    assert not list(work.iterdir()) and not (tmp_path / "pwned").exists()


def test_sbatch_itself_accepts_the_rendered_directives(dev_cluster, tmp_path, tiny_assets):
    """sbatch --test-only parses sbatch.sh as it would submit it (nothing runs)."""
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets, name="tiny.v2-a_b"))
    run_dir = tmp_path / "run+@,=:x"
    rendered = run_launch(recipe, "--dry-run", "--executor", "slurm", "--profile", "dev", "--run-dir", run_dir)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    checked = subprocess.run(["sbatch", "--test-only", run_dir / "sbatch.sh"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "to start at" in checked.stderr, checked.stdout + checked.stderr


def job_id_of(run: RunDir) -> str:
    return str(json.loads(run.manifest_path.read_text())["jobs"][-1]["id"])


def rows_per_step(run: RunDir) -> dict[int, list[dict]]:
    rows: dict[int, list[dict]] = {}
    for line in run.metrics_log.read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], []).append(row)
    return rows


def test_preemption_signal_saves_requeues_and_resumes_with_the_same_losses(dev_cluster, tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    steps = [
        "--set",
        "train.max_steps=40",
        "--set",
        "train.save_steps=100",
        "--set",
        "eval.enabled=false",
        "--set",
        "merge.enabled=false",
    ]
    straight = run_launch(recipe, "--run-dir", tmp_path / "straight", "--executor", "local", "--procs-per-node", "2", *steps)
    assert straight.returncode == 0, straight.stderr
    run = RunDir(tmp_path / "run")
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            str(recipe),
            "--run-dir",
            str(run.root),
            "--nodes",
            "2",
            "--procs-per-node",
            "1",
            "--profile",
            "dev",
            *steps,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_rows(run, 10)
    subprocess.run(["scancel", "--signal=USR2", job_id_of(run)], check=True)
    output, _ = follower.communicate(timeout=400)
    assert follower.returncode == 0, output
    assert ": pending" in output.split(": running", 1)[1]  # requeued, then ran again

    rows = rows_per_step(run)
    assert sorted(rows) == list(range(1, 41))  # every planned step ran
    assert sum(len(r) - 1 for r in rows.values()) <= 1  # at most one step repeated
    want = rows_per_step(RunDir(tmp_path / "straight"))
    assert max(abs(rows[s][-1]["loss"] - want[s][-1]["loss"]) / abs(want[s][-1]["loss"]) for s in want) <= 1e-4
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["requeues"] == 1 and manifest["state"] == "completed"
    assert "stop signal: saved a complete checkpoint at step" in run.rank_log(0).read_text()
    status = run_launch("status", run.root).stdout
    assert "completed, step 40/40" in status and "last complete checkpoint: checkpoint-40; requeues: 1" in status


def logged_a_step(run: RunDir, attempt: int) -> bool:
    """This attempt is past start-up and training."""
    rows = rows_per_step(run).values() if run.metrics_log.exists() else []
    return any(row["attempt"] == attempt for per_step in rows for row in per_step)


def test_killed_ranks_are_requeued_and_resume_from_the_newest_complete_checkpoint(dev_cluster, tmp_path, tiny_assets):
    """SIGKILL of a random rank at random moments (some during checkpoint writes): each time the
    job is requeued (slurm.max_restarts), resumes from the newest complete checkpoint, and the
    run ends with the same final loss as an uninterrupted one."""
    import random

    trials = 4  # each is a SIGKILL, a SLURM requeue and a resume (~30-50 s): 4 keep the suite under CI's 30 minutes
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    steps = [
        "--set",
        "train.max_steps=400",
        "--set",
        "train.save_steps=3",
        "--set",
        "eval.enabled=false",
        "--set",
        "merge.enabled=false",
    ]
    straight = run_launch(recipe, "--run-dir", tmp_path / "straight", "--executor", "local", "--procs-per-node", "2", *steps)
    assert straight.returncode == 0, straight.stderr
    run = RunDir(tmp_path / "run")
    submitted = run_launch(
        recipe,
        "--run-dir",
        run.root,
        "--nodes",
        "2",
        "--procs-per-node",
        "1",
        "--profile",
        "dev",
        "--detach",
        "--set",
        f"slurm.max_restarts={trials}",
        *steps,
    )
    assert submitted.returncode == 0, submitted.stderr
    rng, job = random.Random(0), job_id_of(run)
    for attempt in range(1, trials + 1):
        deadline = time.time() + 180
        while time.time() < deadline and not logged_a_step(run, attempt):
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 1.5))  # save_steps=3: some kills land inside a checkpoint write
        rank = rng.choice([0, 1])
        os.kill(int(re.findall(r"pid (\d+)", run.rank_log(rank).read_text())[-1]), signal.SIGKILL)
    from launcher.launch.executors.slurm import job_state

    deadline = time.time() + 400
    while time.time() < deadline and job_state(job).split()[0] != "COMPLETED":
        time.sleep(2)
    assert job_state(job).split()[0] == "COMPLETED", job_state(job)
    rows = rows_per_step(run)
    assert sorted(rows) == list(range(1, 401))
    want = rows_per_step(RunDir(tmp_path / "straight"))
    assert abs(rows[400][-1]["loss"] - want[400][-1]["loss"]) <= 1e-4 * abs(want[400][-1]["loss"])
    resumed = [int(s) for s in re.findall(r"resuming from \S+ \(step (\d+)\)", run.rank_log(0).read_text())]
    assert len(resumed) == trials and resumed == sorted(resumed)  # each relaunch: the newest complete one
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["state"] == "completed" and manifest["crash_restarts"] == trials
    assert manifest["attempts"] == trials + 1
    assert (run.adapter / "adapter_model.safetensors").exists()


def test_a_time_limit_shorter_than_the_training_spans_several_allocations(dev_cluster, tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    run = RunDir(tmp_path / "run")
    result = run_launch(
        recipe,
        "--run-dir",
        run.root,
        "--nodes",
        "2",
        "--procs-per-node",
        "1",
        "--profile",
        "dev",
        "--time",
        "1",
        "--set",
        "slurm.signal_lead_s=20",
        "--set",
        "train.max_steps=900",
        "--set",
        "train.save_steps=1000",
        "--set",
        "eval.enabled=false",
        "--set",
        "merge.enabled=false",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads(run.manifest_path.read_text())
    rows = rows_per_step(run)
    assert sorted(rows) == list(range(1, 901))
    assert manifest["requeues"] >= 1 and manifest["state"] == "completed"
    assert run.rank_log(0).read_text().count("stop signal: saved a complete checkpoint") == manifest["requeues"]
    assert sum(len(r) - 1 for r in rows.values()) <= manifest["requeues"]  # at most one step per interruption
    assert len({row["attempt"] for r in rows.values() for row in r}) == manifest["requeues"] + 1


def readme_dev_cluster_commands() -> list[str]:
    """The `launch` lines of the README's dev-cluster block, as a newcomer copies them."""
    text = (REPO / "README.md").read_text()
    block = text.split("### A real SLURM on a laptop", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("launch ")]


def test_the_readmes_dev_cluster_commands_work_as_written(dev_cluster, tmp_path):
    """Run where a newcomer runs them (a checkout's recipes/, its runs/ already holding the
    quickstart's run dir), the README's commands train on two nodes, merge and evaluate."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)  # what the quickstart left
    commands = list(dict.fromkeys(readme_dev_cluster_commands()))  # the same command in two sections runs once
    assert commands and all("--run-dir" in command for command in commands)
    for command in commands:
        result = run_launch(*shlex.split(command)[1:], cwd=tmp_path)
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        assert "done in " in result.stdout and "report:" in result.stdout


def test_a_job_the_cluster_cannot_run_is_refused_before_the_queue(dev_cluster, tmp_path, tiny_assets):
    """4 ranks per node on the dev cluster's 2-CPU nodes would pend forever (PartitionConfig):
    sbatch --test-only says so before anything is queued, in one line, in seconds."""
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    started = time.time()
    result = run_launch(recipe, "--run-dir", tmp_path / "run", "--nodes", "2", "--procs-per-node", "4", "--profile", "dev")
    seconds = time.time() - started
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, text
    assert "slurm: the train job (2 node(s) x 4 task(s)) cannot run on this cluster (sbatch --test-only: " in text
    assert "nothing was queued" in text and not RunDir(tmp_path / "run").manifest().jobs
    print(f"refused before the queue in {seconds:.1f} s (pre-flight included)")


def test_a_job_that_waits_says_why_and_ctrl_c_says_what_stays_queued(dev_cluster, tmp_path, tiny_assets):
    """Both nodes taken by another job: the run waits for them (Resources). `launch` and
    `launch status` say so in words; Ctrl-C says what is left queued and how to end it."""
    blocker = subprocess.run(
        ["sbatch", "--parsable", "-N", "2", "--ntasks-per-node", "2", "-o", "/dev/null", "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert blocker.returncode == 0, blocker.stderr
    try:
        recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
        run = RunDir(tmp_path / "run")
        launch = start_launch(recipe, "--run-dir", run.root, "--nodes", "2", "--profile", "dev")
        lines, deadline = [], time.time() + 120
        while time.time() < deadline and not any(re.search(r": pending \((Resources|Priority): ", line) for line in lines):
            lines.append(launch.stdout.readline())
        assert any(": pending (Resources: waiting for nodes to free up" in line for line in lines), lines
        status = run_launch("status", run.root)
        assert f"SLURM job {job_id_of(run)} pending (Resources: " in " ".join(status.stdout.split())
        launch.send_signal(signal.SIGINT)
        output, _ = launch.communicate(timeout=60)
        text = " ".join(output.split())
        assert launch.returncode == 130, output
        assert f"interrupted: train SLURM job {job_id_of(run)} (pending)" in text
        assert f"end with `launch cancel {run.root}`" in text
        assert run_launch("cancel", run.root).returncode == 0
    finally:
        subprocess.run(["scancel", blocker.stdout.strip()], timeout=60)


def wait_until_running(job_id: str, limit_s: float = 900) -> None:
    """Until the controller itself says the job runs. Each question is retried while the controller is
    slow to answer (launcher.launch.executors.slurm.scheduler), so a loaded machine makes the wait longer,
    not the test red; the limit is only there for a job that would never start."""
    from launcher.launch.executors.slurm import job_state

    deadline, state = time.time() + limit_s, "PENDING"
    while time.time() < deadline:
        state = job_state(job_id).split()[0]
        if state == "RUNNING":
            return
        assert state in ("PENDING", "CONFIGURING"), f"job {job_id} is {state}, not started"
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {state} after {limit_s:g} s")


def test_dev_cluster_down_ends_its_jobs_processes_too(dev_cluster_up, tmp_path):
    """`down` used to stop the daemons only: a running job's tasks trained on, headless, for an hour.
    It holds the cluster exclusively (no other test's jobs are there to be ended), takes it down,
    then brings it back for the fixture to end."""
    with cluster_lock():
        down_ends_the_jobs_processes(tmp_path)


def down_ends_the_jobs_processes(tmp_path) -> None:
    marker = f"launcher-down-test-{os.getpid()}"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-N",
            "1",
            "-o",
            str(tmp_path / "out"),
            "--wrap",
            f"{sys.executable} -c 'import time; time.sleep(600)' {marker}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    wait_until_running(submitted.stdout.strip())
    deadline = time.time() + 60  # once SLURM says RUNNING, its task is a fork away
    while time.time() < deadline and not subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout:
        time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout, "the job runs but its task is not found"
    down = subprocess.run([REPO / "slurm" / "dev-cluster", "down"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout  # nothing of the job is left
    up = subprocess.run([REPO / "slurm" / "dev-cluster", "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr


@needs_vllm_env
def test_launch_serve_runs_as_a_slurm_job_answers_on_its_node_and_launch_cancel_ends_it(dev_cluster, tmp_path, vllm_assets):
    """The server as a SLURM job: where it answers is printed (node, port), it answers there with
    the base model and the adapter, and `launch cancel` ends it without touching the run's state."""
    _, run, _, _ = train_tiny(vllm_assets, tmp_path, "eval.enabled=false", "merge.enabled=false")  # trained locally
    port = free_port()
    server = start_in_vllm_env("serve", run.root, "--executor", "slurm", "--port", port, "--time", "00:10:00")
    try:
        said = "".join(lines_until(server, "serving on "))
        record = run.server()
        assert "submitted SLURM job " in said and f"serving on http://{record.host}:{port}/v1" in said, said
        texts = {}
        for model in ("base", "adapter"):
            body = json.dumps({"model": model, "prompt": "Is this number even or odd?", "max_tokens": 4, "temperature": 0})
            request = urllib.request.Request(
                f"http://{record.host}:{port}/v1/completions", body.encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as reply:
                texts[model] = json.load(reply)["choices"][0]["text"]
        assert texts["base"] != texts["adapter"], texts  # the adapter is applied
        cancel = in_vllm_env("-m", "launcher.cli", "cancel", run.root)
        assert cancel.returncode == 0 and "(serve)" in cancel.stdout, cancel.stdout + cancel.stderr
    finally:
        rest, _ = server.communicate(timeout=180)
    assert server.returncode == 0 and "ended CANCELLED" in rest, rest
    assert run.server() is None and run.manifest().state == "completed"  # ending its server leaves the run as it was


def wait_until_idle(timeout_s: float = 600) -> None:
    """Until the dev cluster's queue is empty (every array element ended)."""
    deadline = time.time() + timeout_s
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        time.sleep(1)


def test_a_sweep_runs_as_job_arrays_a_cancelled_element_resumes_alone_and_the_best_is_marked(dev_cluster, tmp_path, tiny_assets):
    """A 2 x 2 grid as job arrays of 2-node runs, 2 at a time; one element scancelled mid-training; the same
    sweep command again submits only that variant, which resumes from its checkpoint with the losses of an
    uninterrupted run; the comparison lists all four and marks the best held-out loss."""
    text = tiny_recipe_text(tiny_assets, extra="[merge]\nenabled = false\n").replace("max_steps = 12", "max_steps = 16")
    recipe = write_recipe(tmp_path, text.replace("save_steps = 5", "save_steps = 4"))
    grid = ["--grid", "train.learning_rate=[1e-3,5e-3]", "--grid", "peft.r=[4,8]"]
    sweep = ["sweep", recipe, *grid, "--nodes", "2", "--procs-per-node", "1", "--profile", "dev"]
    straight = run_launch(
        recipe, "--run-dir", tmp_path / "straight", "--executor", "local", "--procs-per-node", "2",
        "--set", "train.learning_rate=1e-3", "--set", "peft.r=8", "--set", "eval.enabled=false",
    )  # fmt: skip
    assert straight.returncode == 0, straight.stdout + straight.stderr
    (tmp_path / "sweep.toml").write_text(recipe.read_text() + "[sweep]\nmax_parallel = 2\n")
    sweep[1] = tmp_path / "sweep.toml"

    first = run_launch(*sweep, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    # The dev cluster's MaxArraySize is 3: the four variants go out as two arrays, each chained to its eval array.
    arrays = re.findall(r"submitted train array (\d+) \((\d) variants, at most 2 at once\)", first.stdout)
    assert [count for _, count in arrays] == ["3", "1"], first.stdout
    assert (
        len(re.findall(r"submitted eval array \d+ \(\d variants, at most 2 at once, each after its element of", first.stdout))
        == 2
    )
    folder = tmp_path / "runs" / "tiny"
    victim = RunDir(folder / "lr=0.001,r=8")
    element = job_id_of(victim)
    assert re.fullmatch(r"\d+_1", element), element  # the array's element 1
    wait_for_rows(victim, 7)  # past checkpoint-4
    subprocess.run(["scancel", element], check=True)
    wait_until_idle()
    status = run_launch("status", folder, cwd=tmp_path).stdout
    assert status.count("completed") == 3 and "its job ended" in status, status

    again = run_launch(*sweep, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count(": complete, kept") == 3, again.stdout
    assert re.search(r"submitted train array \d+ \(1 variants", again.stdout), again.stdout
    wait_until_idle()
    rows, want = rows_per_step(victim), rows_per_step(RunDir(tmp_path / "straight"))
    resumed = re.search(r"resuming from \S+checkpoint-(\d+) \(step", victim.rank_log(0).read_text())
    assert resumed and int(resumed.group(1)) >= 4, victim.rank_log(0).read_text()[-2000:]
    second = min(step for step, per_step in rows.items() if any(row["attempt"] == 2 for row in per_step))
    assert sorted(rows) == list(range(1, 17)) and second == int(resumed.group(1)) + 1  # it went on from its checkpoint
    assert max(abs(rows[s][-1]["loss"] - want[s][-1]["loss"]) / abs(want[s][-1]["loss"]) for s in want) <= 1e-4

    report = run_launch("report", folder, cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    runs = [RunDir(p.parent) for p in sorted(folder.glob("*/manifest.json"))]
    held_out = {run.root.name: run.evaluation.results().systems["adapter"]["loss"] for run in runs}
    best = min(held_out, key=held_out.get)
    assert len(held_out) == 4 and all(run.manifest().state == "completed" for run in runs)
    assert json.loads((folder / "sweep.json").read_text())["best"]["variant"] == best
    assert (
        f"best: {best} (held-out loss" in report.stdout
        and f"<tr class=best><td>{best} *</td>" in (folder / "report.html").read_text()
    )

"""The check-in before any model loads: a missing rank, a wrong world, a loopback master fail in seconds;
and the job's one port: held from its choice to its use (local), moved past a taken one (SLURM)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import REPO
from torch.distributed import TCPStore

from launcher.launch.executors.base import COMPLETED, Resources
from launcher.launch.executors.local import LocalExecutor
from launcher.rundir.runs import START_TOKEN_VARIABLE
from launcher.train.rendezvous import RendezvousError, candidate_ports, check_in, check_master_address, open_store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world(rank: int, size: int, port: int, **extra) -> dict:
    return {
        "rank": rank,
        "world_size": size,
        "local_rank": rank,
        "master_addr": "127.0.0.1",
        "master_port": port,
        "node": f"n{rank + 1}",
        "nodes": 1,
    } | extra


def meet(w: dict, expected: int, timeout_s: int) -> list[dict]:
    return check_in(open_store(w, timeout_s), w, expected, timeout_s)


def in_threads(*targets) -> None:
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


@pytest.fixture(autouse=True)
def start_token(monkeypatch):
    """Each test is its own start of a job: its own token, so its own derived ports."""
    monkeypatch.setenv(START_TOKEN_VARIABLE, f"test-{time.time_ns()}")


def test_a_rank_that_never_checks_in_is_named_within_the_timeout():
    started = time.time()
    with pytest.raises(RendezvousError, match=r"ranks \[1, 2\] did not check in within 2 s \(of 3\)"):
        meet(world(0, 3, free_port()), expected=3, timeout_s=2)
    assert time.time() - started < 10


def test_ranks_that_disagree_on_the_world_all_fail():
    port, errors = free_port(), {}

    def rank(r: int, size: int) -> None:
        try:
            meet(world(r, size, port), expected=2, timeout_s=20)
        except RendezvousError as err:
            errors[r] = str(err)

    in_threads(lambda: rank(0, 2), lambda: rank(1, 3))
    assert set(errors) == {0, 1}
    assert all(
        e.startswith("ranks disagree on the world: world sizes [2, 3] seen, the recipe renders 2") for e in errors.values()
    )


def test_agreeing_ranks_get_everyones_node():
    port, results = free_port(), {}
    in_threads(*[lambda r=r: results.__setitem__(r, meet(world(r, 2, port), 2, timeout_s=20)) for r in (0, 1)])
    assert [rec["node"] for rec in results[0]] == [rec["node"] for rec in results[1]] == ["n1", "n2"]


def test_a_world_of_one_listens_on_no_port():
    port = free_port()
    with socket.socket() as squatter:  # MASTER_PORT taken: a single rank does not care
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        assert [r["rank"] for r in meet(world(0, 1, port), 1, timeout_s=5)] == [0]


def test_a_rank_whose_master_never_listens_is_told_within_the_timeout():
    started = time.time()
    with pytest.raises(RendezvousError, match=r"rank 1 on n2: rank 0's store did not answer at 127.0.0.1 ports \["):
        meet(world(1, 2, free_port()), 2, timeout_s=3)
    assert time.time() - started < 15


def test_ranks_pass_over_taken_ports_and_another_jobs_store_to_meet_on_a_derived_one():
    """MASTER_PORT held by a process that never answers, the first derived port by another job's store
    (what shares a SLURM node): rank 0 listens on the second derived port, and rank 1 finds it there."""
    port = free_port()
    ports = candidate_ports(port)
    results, errors = {}, {}
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", port))
        squatter.listen()
        other_job = TCPStore("127.0.0.1", ports[1], 2, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
        other_job.set("launcher/token", "another job")

        def rank(r: int) -> None:
            try:
                w = world(r, 2, port)
                results[r] = (meet(w, 2, timeout_s=30), w["master_port"])
            except Exception as err:  # noqa: BLE001  (the assertion below names it)
                errors[r] = err

        in_threads(lambda: rank(0), lambda: rank(1))
    assert not errors, errors
    assert results[0][1] == results[1][1] == ports[2]
    assert [rec["node"] for rec in results[1][0]] == ["n1", "n2"]


def test_every_candidate_taken_is_one_line_naming_the_ports():
    port = free_port()
    held = []
    try:
        for candidate in candidate_ports(port):
            sock = socket.socket()
            sock.bind(("0.0.0.0", candidate))
            sock.listen()
            held.append(sock)
        with pytest.raises(RendezvousError, match=r"rank 0 on n1: ports \[.*\] \(MASTER_PORT and the ones derived"):
            meet(world(0, 2, port), 2, timeout_s=5)
    finally:
        for sock in held:
            sock.close()


class FormTheGroup:
    """A body that meets as the worker does, all-reduces, and records the port its store listens on and
    every TCP port its process listens on."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self):
        import torch
        import torch.distributed as dist

        from launcher.train.rendezvous import rendezvous, world_from_env

        w = world_from_env()
        given = w["master_port"]
        rendezvous(w, 2, "gloo", timeout_s=60)
        total = torch.ones(1)
        dist.all_reduce(total)
        listening = sorted(listening_ports(os.getpid()))
        dist.barrier()
        dist.destroy_process_group()
        Path(self.folder, f"rank-{w['rank']}").write_text(
            f"{given} {w['master_port']} {int(total.item())} {json.dumps(listening)}"
        )


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on: its socket inodes matched against /proc/net/tcp{,6} (state 0A)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


def test_a_local_job_listens_on_the_one_port_its_executor_held(tmp_path, monkeypatch):
    """The check-in store and torch.distributed share rank 0's store on the port the executor bound
    and passed on open: rank 0 listens on exactly that port (gloo's own pairs aside, which the OS
    picks at bind), and it is the MASTER_PORT every rank was given."""
    monkeypatch.setenv("PYTHONPATH", f"{REPO / 'tests'}{os.pathsep}{REPO}")
    job = LocalExecutor(tmp_path / "jobs").submit(
        FormTheGroup(str(tmp_path)), Resources(name="t", stage="train", tasks_per_node=2)
    )
    deadline = time.time() + 120
    while job.active() and time.time() < deadline:
        time.sleep(0.2)
    assert job.state() == COMPLETED, job.log(0).read_text() + job.log(1).read_text()
    seen = [(tmp_path / f"rank-{r}").read_text().split(" ", 3) for r in (0, 1)]
    given = seen[0][0]
    assert [s[:3] for s in seen] == [[given, given, "2"]] * 2
    assert int(given) in json.loads(seen[0][3])


def test_two_processes_that_meet_on_a_squatted_master_port_form_a_group(monkeypatch):
    """The SLURM path (no held socket; MASTER_PORT derived and taken by someone else), as real processes
    that form torch.distributed's group over the rendezvous store and all-reduce."""
    port = free_port()
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", START_TOKEN_VARIABLE: "job-7.0"}
    body = (
        "import torch, torch.distributed as dist\n"
        "from launcher.train.rendezvous import rendezvous, world_from_env\n"
        "w = world_from_env(); rendezvous(w, 2, 'gloo', timeout_s=60)\n"
        "t = torch.ones(1); dist.all_reduce(t); print(w['master_port'], int(t.item()))\n"
        "dist.barrier(); dist.destroy_process_group()\n"
    )
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", port))
        squatter.listen()
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", body],
                env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for r in (0, 1)
        ]
        outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    monkeypatch.setenv(START_TOKEN_VARIABLE, "job-7.0")
    moved = candidate_ports(port)[1]
    assert f"ports [{port}] are in use on" in outputs[0] and f"listening on {moved}" in outputs[0]
    assert [o.strip().splitlines()[-1] for o in outputs] == [f"{moved} 2"] * 2


def test_loopback_master_in_a_multi_node_job_fails_fast(monkeypatch):
    monkeypatch.delenv("LAUNCHER_SINGLE_HOST_CLUSTER", raising=False)
    with pytest.raises(RendezvousError, match="resolves to loopback 127.0.0.1 in a 2-node job"):
        check_master_address(world(1, 2, 1234, master_addr="localhost", nodes=2))
    monkeypatch.setenv("LAUNCHER_SINGLE_HOST_CLUSTER", "1")  # the dev cluster: all nodes on one host
    check_master_address(world(1, 2, 1234, master_addr="localhost", nodes=2))
    with pytest.raises(RendezvousError, match="does not resolve"):
        check_master_address(world(1, 2, 1234, master_addr="no-such-host.invalid", nodes=2))

"""The check-in before any model loads: a missing rank, a wrong world, a loopback master fail in seconds."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from launcher.train.rendezvous import RendezvousError, check_in, check_master_address


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


def test_a_rank_that_never_checks_in_is_named_within_the_timeout():
    started = time.time()
    with pytest.raises(RendezvousError, match=r"ranks \[1, 2\] did not check in within 2 s \(of 3\)"):
        check_in(world(0, 3, free_port()), expected_world_size=3, timeout_s=2)
    assert time.time() - started < 10


def test_ranks_that_disagree_on_the_world_all_fail():
    port, errors = free_port(), {}

    def rank(r: int, size: int) -> None:
        try:
            check_in(world(r, size, port), expected_world_size=2, timeout_s=20)
        except RendezvousError as err:
            errors[r] = str(err)

    threads = [threading.Thread(target=rank, args=(0, 2)), threading.Thread(target=rank, args=(1, 3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(errors) == {0, 1}
    assert all(
        e.startswith("ranks disagree on the world: world sizes [2, 3] seen, the recipe renders 2") for e in errors.values()
    )


def test_agreeing_ranks_get_everyones_node():
    port, results = free_port(), {}
    threads = [
        threading.Thread(target=lambda r=r: results.__setitem__(r, check_in(world(r, 2, port), 2, timeout_s=20))) for r in (0, 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [rec["node"] for rec in results[0]] == [rec["node"] for rec in results[1]] == ["n1", "n2"]


def test_loopback_master_in_a_multi_node_job_fails_fast(monkeypatch):
    monkeypatch.delenv("LAUNCHER_SINGLE_HOST_CLUSTER", raising=False)
    with pytest.raises(RendezvousError, match="resolves to loopback 127.0.0.1 in a 2-node job"):
        check_master_address(world(1, 2, 1234, master_addr="localhost", nodes=2))
    monkeypatch.setenv("LAUNCHER_SINGLE_HOST_CLUSTER", "1")  # the dev cluster: all nodes on one host
    check_master_address(world(1, 2, 1234, master_addr="localhost", nodes=2))
    with pytest.raises(RendezvousError, match="does not resolve"):
        check_master_address(world(1, 2, 1234, master_addr="no-such-host.invalid", nodes=2))

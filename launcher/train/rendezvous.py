"""Before any model loads: every rank checks in with rank 0 within seconds, and all agree on the world.

A broken network or a wrong world size then fails in about a minute with the ranks that did not
answer, instead of after torch.distributed's 30-minute collective timeout.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from datetime import timedelta

from launcher.errors import UserError

CHECK_IN_TIMEOUT_S = int(os.environ.get("LAUNCHER_RENDEZVOUS_TIMEOUT_S", "60"))


class RendezvousError(UserError):
    """The ranks cannot form the job's world (a user can fix it: the network, the hosts file, the world
    size); the message says which ranks and why, and how."""


def world_from_env() -> dict:
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "master_addr": os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "master_port": int(os.environ.get("MASTER_PORT", "29500")),
        "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "nodes": int(os.environ.get("SLURM_JOB_NUM_NODES", "1")),
    }


def check_master_address(world: dict) -> None:
    """A multi-node job whose master resolves to loopback would wait forever on the other nodes."""
    try:
        resolved = socket.gethostbyname(world["master_addr"])
    except OSError as err:
        raise RendezvousError(
            f"rank {world['rank']} on {world['node']}: master address {world['master_addr']!r} "
            f"does not resolve ({err}); fix DNS or /etc/hosts on the nodes"
        ) from None
    single_host = os.environ.get("LAUNCHER_SINGLE_HOST_CLUSTER") == "1"  # set by slurm/dev-cluster
    if world["nodes"] > 1 and ipaddress.ip_address(resolved).is_loopback and not single_host:
        raise RendezvousError(
            f"rank {world['rank']} on {world['node']}: master {world['master_addr']!r} resolves to loopback "
            f"{resolved} in a {world['nodes']}-node job, so the other nodes cannot reach it; map the node names "
            "to their network addresses in DNS or /etc/hosts"
        )


def check_in(world: dict, expected_world_size: int, timeout_s: int = CHECK_IN_TIMEOUT_S) -> list[dict]:
    """Every rank posts (node, world size) to a store on rank 0; rank 0 checks them and posts a verdict.

    Returns every rank's record (ordered by rank). Raises RendezvousError on every rank when a
    rank is missing after timeout_s or the ranks disagree on the world.
    """
    from torch.distributed import TCPStore

    check_master_address(world)
    if world["world_size"] == 1 and expected_world_size == 1:
        return [world]
    rank, size = world["rank"], world["world_size"]
    store = TCPStore(
        world["master_addr"],
        world["master_port"] + 1,
        size,
        is_master=rank == 0,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    store.set(f"rank/{rank}", json.dumps(world))
    if rank == 0:
        verdict = judge(store, size, expected_world_size, timeout_s)
        store.set("verdict", json.dumps(verdict))
    else:
        store.wait(["verdict"])
        verdict = json.loads(store.get("verdict"))
    store.add("read", 1)
    if rank == 0:  # the store lives in this process: keep it up until every rank has read the verdict
        deadline = time.time() + timeout_s
        while store.add("read", 0) < size and time.time() < deadline:
            time.sleep(0.05)
    if "error" in verdict:
        raise RendezvousError(verdict["error"])
    return verdict["records"]


def judge(store, size: int, expected: int, timeout_s: int) -> dict:
    deadline = time.time() + timeout_s
    keys = [f"rank/{r}" for r in range(size)]
    while time.time() < deadline and not store.check(keys):
        time.sleep(0.2)
    missing = [r for r, key in enumerate(keys) if not store.check([key])]
    if missing:
        return {
            "error": f"ranks {missing} did not check in within {timeout_s} s (of {size}); their nodes cannot "
            "reach the master or did not start: see their logs"
        }
    records = [json.loads(store.get(key)) for key in keys]
    sizes = sorted({r["world_size"] for r in records})
    if sizes != [expected]:
        return {
            "error": f"ranks disagree on the world: world sizes {sizes} seen, the recipe renders {expected} "
            "ranks (distributed.nodes x distributed.procs_per_node); re-render or fix the job's task count"
        }
    return {"records": records}


def smoke_all_reduce(timeout_s: int = CHECK_IN_TIMEOUT_S) -> None:
    """One small all-reduce on a group with a short timeout: the backend really moves data."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    group = dist.new_group(timeout=timedelta(seconds=timeout_s))
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.ones(1, device=device)
    dist.all_reduce(value, group=group)
    if int(value.item()) != dist.get_world_size():
        raise RendezvousError(f"all-reduce returned {value.item()}, expected {dist.get_world_size()}")


def topology_line(records: list[dict], backend: str) -> str:
    nodes: dict[str, list[int]] = {}
    for record in records:
        nodes.setdefault(record["node"], []).append(record["rank"])
    layout = ", ".join(f"{node}: ranks {ranks}" for node, ranks in nodes.items())
    return f"topology: {len(nodes)} nodes, {len(records)} ranks, backend {backend}; {layout}"

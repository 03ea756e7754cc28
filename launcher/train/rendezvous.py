"""Before any model loads: every rank checks in with rank 0 within seconds, and all agree on the world.

A broken network or a wrong world size then fails in about a minute with the ranks that did not
answer, instead of after torch.distributed's 30-minute collective timeout.

One port per job, never chosen and let go: rank 0's store is both the check-in's and torch.distributed's
(the default group is formed over it), so nothing else of the job listens on a port picked earlier.
Rank 0 listens on
  - the socket the local executor bound and holds for it (LAUNCHER_MASTER_FD): no other process can
    take that port between its choice and the listen;
  - else (SLURM, where the port is derived from the job id, or `accelerate launch` by hand) the first
    free one of MASTER_PORT and FALLBACK_PORTS more derived from this start of the job, which every rank
    computes alike. The other ranks try the same list and take the store that holds this start's token,
    so another job's store on a port (the usual collision on a shared node) is passed over.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
import threading
import time
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

from launcher.errors import UserError
from launcher.rundir.runs import MASTER_FD_VARIABLE, start_token

CHECK_IN_TIMEOUT_S = int(os.environ.get("LAUNCHER_RENDEZVOUS_TIMEOUT_S", "60"))
FALLBACK_PORTS = 3
PORT_RANGE = (20000, 60000)  # submitit derives MASTER_PORT in the same range
PROBE_S = 5.0  # the longest a store takes to answer a new client before its listener is taken for something else
TOKEN_KEY = "launcher/token"


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


def rendezvous(world: dict, expected_world_size: int, backend: str, timeout_s: int = CHECK_IN_TIMEOUT_S) -> list[dict]:
    """The worker's: check in, then form torch.distributed's default group over the same store (so
    accelerate and DeepSpeed find it formed and open no port of their own). Returns every rank's record."""
    import torch.distributed as dist

    store = open_store(world, timeout_s)
    records = check_in(store, world, expected_world_size, timeout_s)
    if backend == "nccl":
        import torch

        torch.cuda.set_device(world["local_rank"])
    dist.init_process_group(
        backend, store=dist.PrefixStore("default_pg", store), rank=world["rank"], world_size=world["world_size"]
    )
    return records


def open_store(world: dict, timeout_s: int = CHECK_IN_TIMEOUT_S):
    """Rank 0 listens (see the module's docstring for where); the others find it. A world of one
    meets nobody and listens on no port. `world["master_port"]` becomes the port in use."""
    from torch.distributed import HashStore

    check_master_address(world)
    if world["world_size"] == 1:
        os.environ.pop(MASTER_FD_VARIABLE, None)
        return HashStore()
    token = start_token()
    store = listen(world, timeout_s) if world["rank"] == 0 else find_master(world, token, timeout_s)
    if world["rank"] == 0:
        store.set(TOKEN_KEY, token)
    world["master_port"] = store.port
    os.environ["MASTER_PORT"] = str(store.port)  # what the logs and anything reading the variable see
    return store


def candidate_ports(first: int) -> list[int]:
    """MASTER_PORT, then FALLBACK_PORTS more that every rank of this start of the job derives alike."""
    draw = random.Random(f"{start_token()}/ports")  # a str seed is hashed with SHA-512: the same in every process
    return [first] + [draw.randint(*PORT_RANGE) for _ in range(FALLBACK_PORTS)]


def listen(world: dict, timeout_s: int):
    from torch.distributed import TCPStore

    options = {
        "world_size": world["world_size"],
        "is_master": True,
        "timeout": timedelta(seconds=timeout_s),
        "wait_for_workers": False,
    }
    held = os.environ.pop(MASTER_FD_VARIABLE, None)  # popped: no child process of this rank inherits the name
    if held:
        return TCPStore(world["master_addr"], world["master_port"], master_listen_fd=int(held), **options)
    busy = []
    for port in candidate_ports(world["master_port"]):
        try:
            store = TCPStore(world["master_addr"], port, **options)
        except RuntimeError as err:  # torch's DistNetworkError
            if "EADDRINUSE" not in str(err) and "in use" not in str(err):
                raise
            busy.append(port)
            continue
        if busy:
            print(f"rendezvous: ports {busy} are in use on {world['node']}; listening on {port}")
        return store
    raise RendezvousError(
        f"rank 0 on {world['node']}: ports {busy} (MASTER_PORT and the ones derived from this job) are all in use; "
        "set another MASTER_PORT in slurm.environment, or find what holds them (ss -ltnp)"
    )


def find_master(world: dict, token: str, timeout_s: int):
    """The store that holds this start's token, on the first candidate port where one answers."""
    deadline, ports, taken = time.time() + timeout_s, candidate_ports(world["master_port"]), set()
    while time.time() < deadline:
        for port in [p for p in ports if p not in taken]:
            answered, store = ask(world, port, token)
            if store is not None:
                store.set_timeout(timedelta(seconds=timeout_s))
                return store
            if not answered:  # a listener that is no store: rank 0 cannot be there
                taken.add(port)
                print(f"rendezvous: port {port} on {world['master_addr']} is held by something that is not a store: passed over")
    raise RendezvousError(
        f"rank {world['rank']} on {world['node']}: rank 0's store did not answer at {world['master_addr']} ports "
        f"{ports} within {timeout_s} s; rank 0 did not start, or this node cannot reach {world['master_addr']}: see its log"
    )


def ask(world: dict, port: int, token: str) -> tuple[bool, object]:
    """(whether what listens on `port` answered, a client of it if it is this job's store).

    A plain connect first: where nothing listens (yet) it fails at once and quietly, where torch's
    client would retry and log each failure. Then torch's client, in a thread of its own: against a
    listener that never answers (no store) its handshake waits forever, so after PROBE_S its socket
    is shut down here, which ends the handshake and the thread, and the port is reported unanswered."""
    from torch.distributed import TCPStore

    try:
        socket.create_connection((world["master_addr"], port), timeout=PROBE_S).close()
    except OSError:
        time.sleep(0.1)
        return True, None
    found = []

    def client() -> None:
        try:
            store = TCPStore(
                world["master_addr"],
                port,
                world["world_size"],
                is_master=False,
                timeout=timedelta(seconds=PROBE_S),
                wait_for_workers=False,
            )
            found.append(store if store.check([TOKEN_KEY]) and store.get(TOKEN_KEY).decode() == token else None)
        except RuntimeError:  # it ended meanwhile, or shut down below
            found.append(None)

    thread = threading.Thread(target=client, name=f"rendezvous-probe-{port}", daemon=True)
    thread.start()
    thread.join(PROBE_S + 0.5)  # past the client's own deadline: a shut-down handshake is not retried
    if thread.is_alive():
        shut_down_connections_to(port)
        thread.join(PROBE_S)
        return False, None
    return True, found[0]


def shut_down_connections_to(port: int) -> None:
    """Shut down this process's TCP connections to `port` (found through /proc: their socket inodes)."""
    mine = {}
    for fd in Path("/proc/self/fd").iterdir():
        with suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                mine[target[8:-1]] = int(fd.name)
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in mine:
                with suppress(OSError), socket.socket(fileno=os.dup(mine[fields[9]])) as sock:
                    sock.shutdown(socket.SHUT_RDWR)


def check_in(store, world: dict, expected_world_size: int, timeout_s: int = CHECK_IN_TIMEOUT_S) -> list[dict]:
    """Every rank posts (node, world size) to the store; rank 0 checks them and posts a verdict.

    Returns every rank's record (ordered by rank). Raises RendezvousError on every rank when a
    rank is missing after timeout_s or the ranks disagree on the world.
    """
    rank, size = world["rank"], world["world_size"]
    store.set(f"rank/{rank}", json.dumps(world))
    if rank == 0:
        verdict = judge(store, size, expected_world_size, timeout_s)
        store.set("verdict", json.dumps(verdict))
    else:
        store.wait(["verdict"])
        verdict = json.loads(store.get("verdict"))
    store.add("read", 1)
    if rank == 0:  # the store may end with this process (an error verdict): first every rank reads the verdict
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

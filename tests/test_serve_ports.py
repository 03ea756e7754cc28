"""launch serve's port: the one asked for or a one-line refusal; else 8000, or a free one when another
process holds 8000; and the server counts as up only when the one answering is this run's (real
sockets and a real HTTP server standing in for another process's)."""

from __future__ import annotations

import socket
from contextlib import contextmanager

import pytest
from conftest import models_server

from launcher.errors import UserError
from launcher.serve.server import DEFAULT_PORT, pick_port, port_free, serves_this_run


@contextmanager
def held(port: int):
    """Another process's listener on `port` (None when the port could not be taken: someone has it)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        yield None
        return
    with sock:
        yield sock


def test_a_port_asked_for_and_held_by_another_process_is_refused_in_one_line():
    with held(0) as sock:
        port = sock.getsockname()[1]
        assert not port_free("127.0.0.1", port)
        with pytest.raises(UserError, match=rf"^--port {port}: another process listens on it on .*; choose another port"):
            pick_port("127.0.0.1", port)
    assert pick_port("127.0.0.1", port) == port  # free again


def test_without_a_port_8000_is_taken_when_free_else_a_free_one():
    with held(DEFAULT_PORT):
        chosen = pick_port("127.0.0.1", None)
        assert chosen != DEFAULT_PORT and port_free("127.0.0.1", chosen)
    if port_free("127.0.0.1", DEFAULT_PORT):
        assert pick_port("127.0.0.1", None) == DEFAULT_PORT


def test_a_server_counts_as_this_runs_only_when_it_serves_this_runs_base_and_adapters():
    modules = {"adapter": "/runs/a/adapter", "checkpoint-5": "/runs/a/checkpoints/checkpoint-5"}
    ours = [{"id": "base", "root": "/models/tiny"}] + [{"id": n, "root": f} for n, f in modules.items()]
    another_run = [{"id": "base", "root": "/models/tiny"}, {"id": "adapter", "root": "/runs/b/adapter"}]
    for cards, expected in ((ours, True), (another_run, False), (ours[:1], False)):
        server = models_server(cards)
        try:
            assert serves_this_run(server.server_address[1], "/models/tiny", modules) is expected
        finally:
            server.shutdown()
            server.server_close()
    with held(0) as silent:  # a listener that never answers
        assert serves_this_run(silent.getsockname()[1], "/models/tiny", modules) is False

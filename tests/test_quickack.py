"""quickack.py on real sockets; the daemon-level behaviour is in test_supervisor.py
(test_workers_acknowledge_a_nagle_mta_promptly_over_tcp)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from authmilter.quickack import QuickAck, _tcp_port_of


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener


def test_a_tcp_listener_turns_it_on_for_its_port(tcp_listener: socket.socket) -> None:
    port = tcp_listener.getsockname()[1]
    policy = QuickAck.for_listener(f"fd:{tcp_listener.fileno()}")
    assert policy.enabled
    with socket.create_connection(("127.0.0.1", port)) as client:
        accepted, _ = tcp_listener.accept()
        with accepted:
            # An accepted socket shares the listener's port; the client's end does not.
            assert _tcp_port_of(accepted.fileno()) == port
            assert _tcp_port_of(client.fileno()) != port
            policy.acknowledge(accepted.fileno())  # no error on a live connection
    assert tcp_listener.fileno() >= 0, "the descriptor looked at is never closed"


@pytest.mark.parametrize("connection", ["inet:8990@127.0.0.1", "inet6:8990@[::1]", "fd:"])
def test_sockets_libmilter_opens_itself_are_left_alone(connection: str) -> None:
    assert not QuickAck.for_listener(connection).enabled


def test_unix_sockets_and_other_descriptors_turn_it_off(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "milter.sock"))
        listener.listen()
        assert not QuickAck.for_listener(f"fd:{listener.fileno()}").enabled
    assert not QuickAck.for_listener(f"unix:{tmp_path / 'milter.sock'}").enabled
    assert not QuickAck.for_listener("fd:not-a-number").enabled
    read_end, write_end = os.pipe()
    try:
        assert _tcp_port_of(read_end) is None
    finally:
        os.close(read_end)
        os.close(write_end)
    assert _tcp_port_of(read_end) is None  # closed by now
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        assert _tcp_port_of(udp.fileno()) is None


def test_only_a_pymilter_context_is_looked_into(tcp_listener: socket.socket) -> None:
    policy = QuickAck.for_listener(f"fd:{tcp_listener.fileno()}")
    assert policy.connection_fd(object()) is None
    assert policy.connection_fd(None) is None
    assert QuickAck(None).connection_fd(object()) is None
    QuickAck(None).acknowledge(tcp_listener.fileno())  # off: does nothing
    policy.acknowledge(None)

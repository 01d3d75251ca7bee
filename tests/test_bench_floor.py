"""The benchmark's floor milter (bench/floor_milter.py, ``bench/run.py --floor``).

Its figures stand for what libmilter and pymilter cost by themselves, below authmilter's. That holds
only if the MTA meets it as it meets authmilter: every event before end of message sent without a
wait for a reply, and a header field added at end of message, which the benchmark then looks for in
every delivered message.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmodules import BENCH, load_bench_module
from milterclient import MilterClient, check_message
from processes import stop_process

FLOOR_SCRIPT = BENCH / "floor_milter.py"
MESSAGE = (
    b"From: Bob <bob@sender.example>\r\nTo: alice@receiver.example\r\nSubject: Hello\r\n"
    b"Message-ID: <floor@sender.example>\r\n\r\nHi Alice.\r\n"
)


FLOOR_FIELD = load_bench_module("floor_milter").FLOOR_FIELD


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture
def floor_address(tmp_path: Path) -> Iterator[str]:
    """The floor milter running on a unix socket of its own."""
    path = tmp_path / "floor.sock"
    process = subprocess.Popen(
        [sys.executable, str(FLOOR_SCRIPT), f"unix:{path}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers(path):
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "the floor milter did not listen within 10 s"
            time.sleep(0.05)
        yield f"unix:{path}"
    finally:
        stop_process(process, 0.0)  # as the benchmark stops it (harness.FloorMilter)


def test_the_floor_milter_adds_its_field_and_accepts(floor_address: str) -> None:
    result = check_message(floor_address, MESSAGE)
    assert (result.stage, result.response.kind) == ("eom", "accept")
    added = [(m.name, m.value.strip()) for m in result.modifications]
    assert added == [FLOOR_FIELD]


def test_the_mta_waits_for_the_floor_milter_only_at_end_of_message(floor_address: str) -> None:
    with MilterClient.connect(floor_address) as client:
        negotiated = client.negotiate()
        client.quit()
    stages = ("connect", "helo", "mail", "rcpt", "header", "eoh", "body")
    assert [stage for stage in stages if negotiated.replies(stage)] == []


def test_the_floor_milter_refuses_a_socket_it_cannot_use() -> None:
    process = subprocess.run(
        [sys.executable, str(FLOOR_SCRIPT), "/no/scheme.sock"], capture_output=True, timeout=30
    )
    assert process.returncode == 2
    assert b"usage: floor_milter.py" in process.stderr

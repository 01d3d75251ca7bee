"""[log] format = "json": one JSON object per record, one line, with the structured fields."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

import pytest

from authmilter.config import LogSettings
from authmilter.logformat import FIELDS, JsonFormatter
from authmilter.supervisor import configure_logging


def record(text: str, *args: object, **fields: object) -> logging.LogRecord:
    made = logging.LogRecord("authmilter.milter_app", logging.INFO, __file__, 1, text, args, None)
    if fields:
        setattr(made, FIELDS, fields)
    return made


def test_a_record_is_one_object_with_time_level_and_message() -> None:
    line = JsonFormatter().format(record("queue_id=%s accepted", "4XyZ1"))
    entry = json.loads(line)
    assert entry["message"] == "queue_id=4XyZ1 accepted"
    assert entry["level"] == "info" and entry["logger"] == "authmilter.milter_app"
    assert entry["pid"] == os.getpid()
    assert entry["time"].endswith("+00:00") and "T" in entry["time"]


def test_structured_fields_are_top_level_keys_and_cannot_replace_the_base_ones() -> None:
    fields = {"queue_id": "4XyZ1", "check_ms": {"spf": 0.4}, "dkim": [{"result": "pass"}], "message": "x"}
    entry = json.loads(JsonFormatter().format(record("m", **fields)))
    assert entry["queue_id"] == "4XyZ1" and entry["check_ms"] == {"spf": 0.4}
    assert entry["dkim"] == [{"result": "pass"}]
    assert entry["message"] == "m"


def test_values_from_the_network_stay_on_one_ascii_line() -> None:
    hostile = 'bob\r\n{"level":"error"}\x00\x1b[31m\u2028é'
    line = JsonFormatter().format(record("client=%s", hostile, helo=hostile))
    assert "\n" not in line and "\r" not in line and line.isascii()
    entry = json.loads(line)
    assert entry["helo"] == hostile and entry["message"] == f"client={hostile}"


def test_an_exception_is_a_field_not_more_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("authmilter", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(failed)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_json_to_syslog_keeps_the_tag(tmp_path: Path) -> None:
    address = str(tmp_path / "log")
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
            syslog.bind(address)
            syslog.settimeout(5)
            configure_logging(LogSettings(destination="syslog", format="json"), address)
            logging.getLogger("authmilter.test").info("ready")
            datagram = syslog.recv(4096).decode()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    prefix = f"<22>authmilter[{os.getpid()}]: "  # mail (2) * 8 + info (6)
    assert datagram.startswith(prefix) and datagram.endswith("\0")
    assert json.loads(datagram[len(prefix) : -1])["message"] == "ready"


def test_json_to_the_journal_keeps_the_priority_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = (tmp_path / "stderr").open("w")
    monkeypatch.setattr(sys, "stderr", stream)
    info = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(LogSettings(format="json"))
        logging.getLogger("authmilter.test").error("boom")
        stream.flush()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    [line] = (tmp_path / "stderr").read_text().splitlines()
    assert line.startswith("<3>{")
    assert json.loads(line[3:])["level"] == "error"

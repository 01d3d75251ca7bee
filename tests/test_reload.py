"""`authmilter reload` against the real daemon: it returns once the new configuration serves,
and fails visibly (exit 1, with the reason) when the daemon refuses the new configuration."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from authmilter.cli import main
from authmilter.reload import Outcome, StatusFile, read_status
from milterclient import check_message
from test_supervisor import AUTHORISED_IP, MESSAGE, Daemon, authentication_results_id, start_daemon


@pytest.fixture(autouse=True)
def runtime_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """As systemd's RuntimeDirectory= does, for the daemon and for `authmilter reload` alike."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    return tmp_path


@pytest.fixture
def daemons(tmp_path: Path, runtime_directory: Path) -> Iterator[Callable[..., Daemon]]:
    """test_supervisor's daemons, started once RUNTIME_DIRECTORY is set."""
    yield from start_daemon.__wrapped__(tmp_path)


def reload(daemon: Daemon, *extra: str) -> subprocess.CompletedProcess[str]:
    """`authmilter reload` as systemd's ExecReload= runs it: another process, with $MAINPID."""
    return subprocess.run(
        [sys.executable, "-m", "authmilter", "reload", "--config", str(daemon.config), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_reload_returns_once_the_new_configuration_serves(
    daemons: Callable[..., Daemon], runtime_directory: Path
) -> None:
    daemon = daemons(authserv_id="old.receiver.example")
    daemon.notification("READY=1")
    status = read_status(runtime_directory / "status")
    assert status is not None and (status.pid, status.reloads, status.outcome) == (daemon.pid, 0, "ready")

    daemon.write_config("new.receiver.example")
    done = reload(daemon, "--pid", str(daemon.pid))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("configuration reloaded: serving"), done.stdout
    # No waiting here: when the command has returned, every new connection meets the new config.
    result = check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP)
    assert authentication_results_id(result) == "new.receiver.example"

    daemon.write_config("third.receiver.example")
    done = reload(daemon)  # the PID from the status file
    assert done.returncode == 0, done.stderr
    result = check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP)
    assert authentication_results_id(result) == "third.receiver.example"

    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(20) == 0
    assert not (runtime_directory / "status").exists(), "removed at a clean stop"


def test_reload_fails_visibly_when_the_daemon_refuses_the_configuration(
    daemons: Callable[..., Daemon],
) -> None:
    daemon = daemons(authserv_id="kept.receiver.example")
    daemon.notification("READY=1")
    daemon.write_config("new.receiver.example", extra="workers = 3\n")  # the key twice: invalid TOML
    done = reload(daemon, "--pid", str(daemon.pid))
    assert done.returncode == 1
    assert re.match(
        rf"authmilter: reload refused: {re.escape(str(daemon.config))}:\d+: TOML syntax error", done.stderr
    ), done.stderr
    result = check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP)
    assert authentication_results_id(result) == "kept.receiver.example"

    daemon.write_config("new.receiver.example")  # fixed: the next reload is taken
    done = reload(daemon, "--pid", str(daemon.pid))
    assert done.returncode == 0, done.stderr


def test_reload_fails_when_a_file_the_configuration_names_is_broken(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons()
    daemon.notification("READY=1")
    daemon.zone.write_text("this is not a zone file\n")  # a valid config naming a broken zone file
    done = reload(daemon)
    assert done.returncode == 1
    # Loaded by the supervisor before any new worker is forked: refused, naming file and line.
    assert "reload refused:" in done.stderr and "sender.example.zone:1:" in done.stderr


def test_reload_without_a_daemon_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "authmilter.toml"
    config.write_text("")
    assert main(["reload", "--config", str(config)]) == 1
    assert "no status file: is authmilter running?" in capsys.readouterr().err
    # A status file left by a daemon that is gone (killed): its PID no longer exists.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "status").write_text(
        json.dumps({"pid": gone.pid, "reloads": 0, "outcome": "ready", "status": "serving"})
    )
    assert main(["reload", "--config", str(config)]) == 1
    assert f"no process {gone.pid}: authmilter is not running" in capsys.readouterr().err


def test_reload_times_out_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A process that ignores SIGHUP and never writes an outcome."""
    deaf = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
         "print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert deaf.stdout is not None and deaf.stdout.readline()  # SIGHUP is ignored from now on
        config = tmp_path / "authmilter.toml"
        config.write_text(f'[milter]\nstatus_file = "{tmp_path}/elsewhere"\n')
        started = time.monotonic()
        assert main(["reload", "--config", str(config), "--pid", str(deaf.pid), "--timeout", "0.5"]) == 1
        assert time.monotonic() - started < 10
        assert f"no outcome within 0.5 s (the new workers may still be starting, or {tmp_path}/elsewhere" in (
            capsys.readouterr().err
        )
    finally:
        deaf.kill()
        deaf.wait()


def test_the_status_file_is_replaced_whole_and_left_alone_by_another_daemon(tmp_path: Path) -> None:
    path = tmp_path / "status"
    status = StatusFile(path)
    status.write(2, Outcome.REFUSED, "reload refused: x.toml:3: bad")
    assert read_status(path) is not None and read_status(path) == read_status(path)
    assert json.loads(path.read_text())["outcome"] == "refused"
    assert [p.name for p in tmp_path.iterdir()] == ["status"], "no temporary file is left"
    path.write_text(json.dumps({"pid": 1, "reloads": 0, "outcome": "ready", "status": "serving"}))
    status.remove()
    assert path.exists(), "another daemon's file is not ours to remove"

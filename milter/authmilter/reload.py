"""``authmilter reload``: SIGHUP to the running daemon, then wait for what it made of it.

systemd before 253 has no ``Type=notify-reload``: with ``ExecReload=kill -HUP $MAINPID`` the
reload "succeeds" as soon as the signal is sent, whether the daemon then takes the new
configuration or refuses it. So the supervisor keeps a small status file (its PID, how many
SIGHUPs it has answered, and the last outcome), replaced atomically after every start and every
reload; ``authmilter reload`` reads it before and after the signal and reports the outcome that
answers its own SIGHUP: ``ready`` (the new workers serve every new connection), ``refused`` (an
invalid configuration; the running one stays) or ``failed`` (the new workers could not start).

Where the file is: ``[milter] status_file``, else ``$RUNTIME_DIRECTORY/status`` (systemd sets
``RUNTIME_DIRECTORY`` for every command of a unit with ``RuntimeDirectory=``: /run/authmilter).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)

STATUS_FILE_NAME = "status"
# Seconds between looks at the status file while a reload is under way.
POLL_INTERVAL = 0.1


class Outcome(StrEnum):
    """What became of the daemon's start or of a SIGHUP."""

    READY = "ready"  # the new workers serve every new connection
    REFUSED = "refused"  # an invalid configuration; the running one stays
    FAILED = "failed"  # the new workers could not start; the running ones stay


class ReloadError(Exception):
    """The reload was refused or failed, or its outcome could not be learnt; the message says why."""


@dataclass(frozen=True)
class DaemonStatus:
    """One state of the status file.

    Attributes:
        pid: the supervisor's PID.
        reloads: SIGHUPs answered so far (0: the first start).
        outcome: ``ready``, ``refused`` or ``failed``.
        status: the line the supervisor also gives systemd (STATUS=) and its log.
    """

    pid: int
    reloads: int
    outcome: str
    status: str


def status_path(configured: str) -> Path | None:
    """The status file: ``[milter] status_file``, else in systemd's runtime directory, else none."""
    if configured:
        return Path(configured)
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) / STATUS_FILE_NAME if runtime else None


class StatusFile:
    """The supervisor's side: writes each outcome; a failure to write is logged, never fatal."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, reloads: int, outcome: Outcome, status: str) -> None:
        if self.path is None:
            return
        record = {"pid": os.getpid(), "reloads": reloads, "outcome": str(outcome), "status": status}
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")
            os.replace(temporary, self.path)  # readers see the old state or the new, never half
        except OSError as e:
            log.warning(
                "cannot write the status file %s (authmilter reload reads it): %s", self.path, e.strerror
            )

    def remove(self) -> None:
        """At a clean stop: remove the file, unless another daemon has written it since."""
        if self.path is None:
            return
        current = read_status(self.path)
        if current is not None and current.pid == os.getpid():
            with contextlib.suppress(OSError):
                self.path.unlink()


def read_status(path: Path) -> DaemonStatus | None:
    """The status file's state; None when it is missing or unreadable (not written yet)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return DaemonStatus(
            int(record["pid"]), int(record["reloads"]), str(record["outcome"]), str(record["status"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def configured_status_file(config: Path) -> str:
    """``[milter] status_file`` of a config file, read leniently: a config the daemon will refuse
    must still let ``reload`` find the daemon and report the refusal."""
    with contextlib.suppress(OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        value = tomllib.loads(config.read_text(encoding="utf-8")).get("milter", {}).get("status_file", "")
        return value if isinstance(value, str) else ""
    return ""


def reload_daemon(path: Path, pid: int | None, timeout: float) -> DaemonStatus:
    """Send SIGHUP to the daemon and wait for the outcome of that reload.

    Args:
        path: the daemon's status file.
        pid: the supervisor's PID (systemd's $MAINPID); None: the one in the status file.
        timeout: seconds to wait for the outcome.

    Returns:
        the status once the new configuration serves every new connection.

    Raises:
        ReloadError: refused (with the reason), failed, timed out, or no daemon to signal.
    """
    before = read_status(path)
    if pid is None:
        if before is None:
            raise ReloadError(f"{path}: no status file: is authmilter running? (give --pid PID)")
        pid = before.pid
    answered = before.reloads if before is not None and before.pid == pid else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadError(f"no process {pid}: authmilter is not running (status file {path})") from None
    except PermissionError:
        raise ReloadError(
            f"not permitted to signal process {pid}: run as root or as the daemon's user"
        ) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = read_status(path)
        if current is not None and current.pid == pid and current.reloads > answered:
            if current.outcome != Outcome.READY:
                raise ReloadError(current.status)
            return current
        if not _alive(pid):
            raise ReloadError(f"authmilter (process {pid}) exited during the reload: see its log")
        time.sleep(POLL_INTERVAL)
    raise ReloadError(
        f"no outcome within {timeout:g} s (the new workers may still be starting, or {path} is not "
        "the daemon's status file): see the daemon's log (journalctl -u authmilter)"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still takes signals.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return True

"""A real PostgreSQL server (Debian's package) on loopback, in a temporary data directory.

``initdb`` and ``postgres`` from /usr/lib/postgresql/<version>/bin, TCP on 127.0.0.1 at a free
port, no unix socket, trust authentication for the superuser ``postgres``. PostgreSQL refuses to
run as root, so under root both run as the unprivileged user ``nobody``, which owns the data
directory. Everything lives in one directory under the system's temporary folder (not pytest's,
which is mode 0700 and closed to ``nobody``), removed by :meth:`PostgresServer.stop`.

``make test`` installs the Debian package ``postgresql`` (its own cluster service is disabled).
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

from dnsserver import free_port

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
UNPRIVILEGED_USER = "nobody"
SUPERUSER = "postgres"
PR_SET_PDEATHSIG = 1
LOG_TAIL_CHARS = 4000


class PostgresError(RuntimeError):
    """The server could not be set up or started; the message carries its log."""


def find_postgres() -> Path:
    """The folder of Debian's PostgreSQL binaries (the newest version installed).

    Raises:
        PostgresError: PostgreSQL is not installed.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise PostgresError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres); the tests need a "
            "real one. Run `make test`, which installs the Debian package `postgresql`."
        )
    return Path(found[-1]).parent


def _die_with_parent() -> None:
    """In the child before exec: a killed test run must not leave the server running."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


class PostgresServer:
    """One PostgreSQL cluster: ``start()``, ``create_database(name)`` → URL, ``stop()``.

    Args:
        durable: keep fsync on (the benchmark); tests turn it off for speed.
    """

    def __init__(self, *, durable: bool = False) -> None:
        self.bin = find_postgres()
        self.host = "127.0.0.1"
        self.port = 0
        self.durable = durable
        self.workdir = Path(tempfile.mkdtemp(prefix="authmilter-pg-"))
        self.datadir = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._user = UNPRIVILEGED_USER if os.geteuid() == 0 else None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        """The connection URL of ``database`` on this server."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        """initdb, then start and wait until it accepts connections.

        Raises:
            PostgresError: initdb failed, or the server exited or did not answer in time.
        """
        self.workdir.chmod(0o755)
        self.datadir.mkdir()
        self.log_path.touch()
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            for path in (self.datadir, self.log_path):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        initdb = self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        if initdb.returncode != 0:
            raise PostgresError(f"initdb failed:\n{initdb.stdout.decode(errors='replace')[-LOG_TAIL_CHARS:]}")
        self.port = free_port(self.host)
        options = [
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            "unix_socket_directories=",
            "-c",
            f"port={self.port}",
        ]
        if not self.durable:
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.datadir), *options],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                user=self._user,
                preexec_fn=_die_with_parent,
            )
        self._wait_until_ready()

    def _run(self, command: list[str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            user=self._user,
            timeout=120,
            check=False,
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise PostgresError(f"postgres exited while starting:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise PostgresError(
            f"postgres did not accept connections within {READY_TIMEOUT} s:\n{self.log_tail()}"
        )

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), SIGKILL after a timeout; remove the files."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

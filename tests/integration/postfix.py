"""The integration harness: a private Postfix, authmilter's daemon and an SMTP client, all on loopback.

- :class:`PostfixInstance`: Debian's Postfix run as ``postfix -c DIR`` with its own main.cf, master.cf,
  queue and data directories and log file, all under one private folder. Nothing under /etc/postfix is
  read or changed beyond the compiled-in defaults (daemon_directory, meta_directory); root may point
  ``postfix -c`` anywhere, so no ``alternate_config_directories`` entry is needed. Its smtpd listens on
  127.0.0.1 at a free port with authmilter as its milter, and on a second port without any milter
  (a baseline for the harness itself). Everything is relayed to the sink (sink.py).
- :class:`AuthmilterProcess`: ``python -m authmilter run --config FILE`` with a generated config.
- :func:`send`: smtplib with XCLIENT, so a message can claim an outside client address and SPF is
  evaluated for that address.

``make test`` installs the Debian package ``postfix`` (with its service disabled).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sink import DeliveredMessage, MessageStore

from processes import stop_process
from signing import SigningKey

# Bounded waits: long enough for a loaded CI machine, short enough to fail a broken set-up quickly.
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
COMMAND_TIMEOUT = 30.0
SMTP_TIMEOUT = 60.0
LOG_TAIL_CHARS = 6000
# Seconds from Postfix's 250 to the message in the sink (queue manager + smtp client + sink).
DELIVERY_TIMEOUT = 20.0
PR_SET_PDEATHSIG = 1
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
# Postfix's smtpd exposes the milter macros the adapter reads (issue 3: {auth_type}, {auth_authen}, i).
MILTER_MAIL_MACROS = "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}"
MILTER_CONNECT_MACROS = "j {daemon_name} {daemon_addr} v _ {client_addr} {client_name}"
# The {daemon_name} of each MTA's submission port, which authmilter's sign_daemon_names lists in the
# signing tests: mail through it is outbound whoever sends it.
SUBMISSION_DAEMON = "submission"
# The SASL mechanism both MTAs offer the tests: ANONYMOUS (RFC 4505) needs no password database, so
# neither MTA needs SASL files outside its private folder. authmilter sees only what the MTA then
# sends as {auth_authen} ("anonymous"); the mechanism does not matter to it. A real site allows no
# anonymous AUTH (Postfix's default smtpd_sasl_security_options = noanonymous).
SASL_MECHANISM = "ANONYMOUS"


class HarnessError(RuntimeError):
    """A server of the harness could not be set up; the message carries its log."""


def find_program(name: str) -> str:
    """The path of a Debian program that may live in an sbin directory off a user's PATH.

    Raises:
        HarnessError: it is not installed.
    """
    path = shutil.which(name) or shutil.which(name, path=SBIN_PATH)
    if path is None:
        raise HarnessError(
            f"{name} is not installed; the integration tests need Debian's postfix package. "
            "Run `make test`, which installs it."
        )
    return path


def tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log file, or a note that it is missing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"({path}: no log)"
    return text[-chars:]


def read_from(path: Path, offset: int) -> str:
    """A log file's text from byte ``offset`` on (what a test added to it)."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")
    except OSError:
        return ""


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _die_with_parent() -> None:
    """Runs in the child before exec: a killed test run must not leave the milter bound to its port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def smtp_banner_ready(host: str, port: int) -> bool:
    """True once a server on ``host:port`` greets with 220."""
    try:
        with socket.create_connection((host, port), timeout=2) as connection:
            return connection.recv(512).startswith(b"220")
    except OSError:
        return False


# --- Postfix -----------------------------------------------------------------------------------


class PostfixInstance:
    """A private Postfix: ``postfix -c ROOT/conf``, queue, data and log under its own ROOT.

    ROOT is a fresh directory under the system's temporary folder, not under the caller's: the
    daemons run as the ``postfix`` user and open the data directory by absolute path, so every
    parent must be searchable by that user (pytest's own base folder is mode 0700).
    :meth:`stop` removes ROOT after copying the log into ``log_dir``.

    Args:
        log_dir: where the log is kept after the instance is gone.
        smtp_port: where the milter-protected smtpd listens on 127.0.0.1.
        bare_smtp_port: a second smtpd on 127.0.0.1 without milters (checks the harness itself).
        sink_port: the sink on 127.0.0.1 that every message is relayed to.
        milter: Postfix's milter address (``inet:127.0.0.1:PORT``), or "" for none.
        submission_port: a third smtpd whose {daemon_name} is :data:`SUBMISSION_DAEMON`, or 0 for none.

    Raises:
        HarnessError: Postfix is not installed, or we are not root.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        smtp_port: int,
        bare_smtp_port: int,
        sink_port: int,
        milter: str,
        submission_port: int = 0,
    ) -> None:
        if os.geteuid() != 0:
            # master(8) must start as root: it binds, then runs its daemons as mail_owner.
            raise HarnessError("the integration tests start a private Postfix and need root (as in CI)")
        self._postfix = find_program("postfix")
        self._postqueue = find_program("postqueue")
        self._postsuper = find_program("postsuper")
        self.root = Path(tempfile.mkdtemp(prefix="authmilter-postfix-"))
        self.root.chmod(0o755)
        self.log_dir = log_dir
        self.config_dir = self.root / "conf"
        self.sasl_dir = self.config_dir / "sasl"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_path = self.root / "maillog"
        self.host = "127.0.0.1"
        self.smtp_port = smtp_port
        self.bare_smtp_port = bare_smtp_port
        self.sink_port = sink_port
        self.milter = milter
        self.submission_port = submission_port

    def write_config(self) -> None:
        """Write main.cf and master.cf (both replaced wholesale)."""
        for directory in (self.config_dir, self.queue_dir, self.data_dir, self.sasl_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # Cyrus SASL's application config, read by smtpd from cyrus_sasl_config_path.
        (self.sasl_dir / "smtpd.conf").write_text(f"mech_list: {SASL_MECHANISM}\n", encoding="utf-8")
        postfix_user = pwd.getpwnam("postfix")
        # postfix check wants the data directory owned by mail_owner.
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        (self.config_dir / "main.cf").write_text(self._main_cf(), encoding="utf-8")
        (self.config_dir / "master.cf").write_text(self._master_cf(), encoding="utf-8")

    def _main_cf(self) -> str:
        return f"""# Written by tests/integration/postfix.py: a private, loopback-only instance.
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.receiver.example
mydomain = receiver.example
myorigin = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# XCLIENT from loopback: a test client claims an outside address so SPF is evaluated for it.
smtpd_authorized_xclient_hosts = 127.0.0.0/8
# An inbound MX for receiver.example: its mail (and, should a test need it, any other) goes to the
# sink. The claimed client is outside mynetworks, so only relay_domains lets it in.
mydestination =
relay_domains = receiver.example
local_recipient_maps =
alias_maps =
alias_database =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# AUTH for the signing tests ({{auth_authen}}): Cyrus SASL, configured in our folder only.
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {self.sasl_dir}
smtpd_sasl_security_options =
relayhost = [127.0.0.1]:{self.sink_port}
relay_transport = smtp:[127.0.0.1]:{self.sink_port}
default_transport = smtp:[127.0.0.1]:{self.sink_port}
# Postfix itself never asks DNS; only authmilter does (at the test DNS server).
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtputf8_enable = no
biff = no
# A sink hiccup must not park a message for minutes.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 5s
# Logs into the work directory (postlogd), not syslog.
maillog_file = {self.log_path}
maillog_file_prefixes = {self.root}
smtpd_milters = {self.milter}
milter_default_action = tempfail
milter_protocol = 6
milter_mail_macros = {MILTER_MAIL_MACROS}
milter_connect_macros = {MILTER_CONNECT_MACROS}
milter_connect_timeout = 5s
milter_command_timeout = 15s
milter_content_timeout = 60s
"""

    def _master_cf(self) -> str:
        # No chroot (the queue is not laid out as a chroot); the standard services otherwise.
        bare = "-o smtpd_milters= -o syslog_name=postfix/bare"
        # Postfix sends milter_macro_daemon_name as {daemon_name} (default: $myhostname).
        submission = f"-o milter_macro_daemon_name={SUBMISSION_DAEMON} -o syslog_name=postfix/submission"
        submission_line = (
            f"{self.host}:{self.submission_port} inet n - n - - smtpd {submission}\n"
            if self.submission_port
            else ""
        )
        return f"""# Written by tests/integration/postfix.py.
{self.host}:{self.smtp_port} inet n - n - - smtpd
{self.host}:{self.bare_smtp_port} inet n - n - - smtpd {bare}
{submission_line}pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [program, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def start(self) -> None:
        """Check the configuration, start the master, return once both smtpd ports greet.

        Raises:
            HarnessError: ``postfix check`` or ``start`` failed, or smtpd did not answer in time.
        """
        self.write_config()
        for command in ("check", "start"):
            done = self._run(self._postfix, command)
            if done.returncode != 0:
                # Without a terminal, postfix(1) reports only to its log file.
                raise HarnessError(
                    f"postfix -c {self.config_dir} {command} failed ({done.returncode}): "
                    f"{done.stdout}{done.stderr}\n{tail(self.log_path)}"
                )
        for port in (p for p in (self.smtp_port, self.bare_smtp_port, self.submission_port) if p):
            if not _wait_for(lambda p=port: smtp_banner_ready(self.host, p), READY_TIMEOUT):  # type: ignore[misc]
                raise HarnessError(
                    f"Postfix smtpd on {self.host}:{port} did not greet within {READY_TIMEOUT} s:\n"
                    f"{tail(self.log_path)}"
                )

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the master and its children; SIGKILL it if it does not exit in time."""
        pid = self.master_pid()
        if pid is None:
            return
        self._run(self._postfix, "stop")
        if _wait_for(lambda: not _alive(pid), STOP_TIMEOUT):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Delete ROOT (call after :meth:`stop`); the log is copied into ``log_dir`` first."""
        self.log_path = remove_keeping_log(self.root, self.log_path, self.log_dir)

    def hold_queue(self) -> HoldQueue:
        return HoldQueue(lambda args: self._run(args[0], *args[1:]), self._postqueue, self._postsuper)


def remove_keeping_log(root: Path, log_path: Path, log_dir: Path) -> Path:
    """Delete a server's private ROOT after copying its log into ``log_dir``; returns where the log is."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if not log_path.exists():
        shutil.rmtree(root, ignore_errors=True)
        return log_path
    kept = log_dir / log_path.name
    shutil.copyfile(log_path, kept)
    shutil.rmtree(root, ignore_errors=True)
    return kept


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, already dead but not yet reaped by its parent, is not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class HoldQueue:
    """Postfix's hold queue, read through postqueue (locally or via a command prefix).

    Args:
        run: runs a Postfix command (program first) against the right instance and returns its result.
        postqueue, postsuper: the programs' names or paths.
    """

    def __init__(
        self,
        run: Callable[[list[str]], subprocess.CompletedProcess[str]],
        postqueue: str = "postqueue",
        postsuper: str = "postsuper",
    ) -> None:
        self._run = run
        self._postqueue = postqueue
        self._postsuper = postsuper

    def queue_ids(self) -> list[str]:
        """The ids of the messages in the hold queue."""
        done = self._checked([self._postqueue, "-j"])
        entries = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        return [e["queue_id"] for e in entries if e.get("queue_name") == "hold"]

    def delete(self, queue_id: str) -> None:
        self._checked([self._postsuper, "-d", queue_id, "hold"])

    def _checked(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        done = self._run(args)
        if done.returncode != 0:
            raise HarnessError(f"{' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done


def external_hold_queue(command_prefix: str) -> HoldQueue:
    """The hold queue of a Postfix started elsewhere, reached by a command prefix (``podman exec pf``)."""
    prefix = shlex.split(command_prefix)

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )

    return HoldQueue(run)


# --- authmilter ----------------------------------------------------------------------------------

HISTORY_FILE = "history.jsonl"
# The authmilter image's state directory (docker/Dockerfile), where the config puts the history.
CONTAINER_STATE_DIR = Path("/var/lib/authmilter")

# The milter protocol's option negotiation (libmilter's mfdef.h): the MTA sends SMFIC_OPTNEG with
# version 6, the actions it allows and the protocol steps it offers; a serving milter answers with
# its own SMFIC_OPTNEG packet. SMFIC_QUIT then closes the session cleanly.
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
MILTER_VERSION = 6
ALL_ACTIONS = 0x1FF
ALL_PROTOCOL_STEPS = 0x1FFFFF


def milter_answers(host: str, port: int) -> bool:
    """True once a milter worker at ``host:port`` completes option negotiation.

    A plain connect is not enough: the supervisor's listening socket accepts into its backlog before
    any worker serves it.
    """
    body = SMFIC_OPTNEG + struct.pack("!III", MILTER_VERSION, ALL_ACTIONS, ALL_PROTOCOL_STEPS)
    try:
        with socket.create_connection((host, port), timeout=2) as connection:
            connection.sendall(struct.pack("!I", len(body)) + body)
            header = connection.recv(5)
            answered = len(header) == 5 and header[4:5] == SMFIC_OPTNEG
            quit_packet = struct.pack("!I", 1) + SMFIC_QUIT
            connection.sendall(quit_packet)
            return answered
    except OSError:
        return False


def authmilter_config(
    *,
    milter_port: int,
    dns_port: int,
    workers: int = 2,
    authserv_id: str = "mx.receiver.example",
    history_path: Path | None = None,
    extra: str = "",
    milter: str = "",
    metrics_port: int = 0,
) -> str:
    """The TOML the integration tests run authmilter with.

    Args:
        milter_port: TCP port on 127.0.0.1.
        dns_port: the test DNS server's port on 127.0.0.1.
        workers: worker processes.
        authserv_id: the id in our Authentication-Results.
        history_path: the history file (``[history] path``), or None for none.
        extra: more TOML appended (e.g. a broken line, to test SIGHUP).
        milter: more ``[milter]`` keys (TOML allows each table once).
        metrics_port: the Prometheus endpoint's port on 127.0.0.1; 0: no metrics.
    """
    metrics = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n' if metrics_port else ""
    return f"""# Written by tests/integration/postfix.py.
[milter]
socket = "inet:{milter_port}@127.0.0.1"
workers = {workers}
shutdown_timeout = 5.0
authserv_id = "{authserv_id}"
quarantine = "hold"
{milter}
[log]
destination = "stderr"
level = "debug"

[dns]
nameservers = ["127.0.0.1"]
port = {dns_port}
# A stopped DNS server must turn into a 451 quickly, not after Postfix's milter timeout.
timeout = 1.0

[history]
path = "{history_path or ""}"
{metrics}{extra}"""


class Authmilter(ABC):
    """An authmilter daemon the tests drive: its config file, its signals and workers, its log and
    history file. :class:`AuthmilterProcess` is started by the tests, :class:`ContainerAuthmilter`
    by ``make test-docker``.

    Args:
        config_path: the config file it reads (rewritten by :meth:`write_config`).
        log_path: its output.
        history_path: its history file, as the tests read it.
        milter_port: TCP port on 127.0.0.1 (must match the MTA's milter setting).
        dns_port: the test DNS server's port on 127.0.0.1.
        workers: worker processes.
        config_history_path: the history file as its config names it (default ``history_path``).
        metrics_port: the Prometheus endpoint's port on 127.0.0.1 (``[metrics] listen``); 0: none.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        config_path: Path,
        log_path: Path,
        history_path: Path,
        milter_port: int,
        dns_port: int,
        workers: int = 2,
        config_history_path: Path | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.history_path = history_path
        self.milter_port = milter_port
        self.dns_port = dns_port
        self.workers = workers
        self.config_history_path = config_history_path or history_path
        self.metrics_port = metrics_port

    @property
    @abstractmethod
    def pid(self) -> int:
        """The supervisor's pid (on this machine's /proc)."""

    @property
    @abstractmethod
    def running(self) -> bool:
        """The supervisor is alive."""

    def write_config(
        self, *, authserv_id: str = "mx.receiver.example", extra: str = "", milter: str = ""
    ) -> None:
        """(Re)write the config file in place; a running daemon reads it on SIGHUP."""
        self.config_path.write_text(
            authmilter_config(
                milter_port=self.milter_port,
                dns_port=self.dns_port,
                workers=self.workers,
                authserv_id=authserv_id,
                history_path=self.config_history_path,
                extra=extra,
                milter=milter,
                metrics_port=self.metrics_port,
            ),
            encoding="utf-8",
        )

    def wait_until_serving(self, timeout: float = READY_TIMEOUT) -> None:
        """Return once a worker answers option negotiation.

        Raises:
            HarnessError: the supervisor exited or no worker answered in time.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise HarnessError(f"authmilter exited while starting:\n{tail(self.log_path)}")
            if milter_answers(self.host, self.milter_port):
                return
            time.sleep(0.1)
        raise HarnessError(
            f"authmilter on {self.host}:{self.milter_port} did not serve within {timeout} s:\n"
            f"{tail(self.log_path)}"
        )

    def worker_pids(self) -> list[int]:
        """The supervisor's live child processes (its workers)."""
        return children_of(self.pid)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the supervisor."""
        os.kill(self.pid, signum)

    def kill_worker(self, pid: int) -> None:
        """SIGKILL one worker (a crash the supervisor must notice and repair).

        Raises:
            HarnessError: ``pid`` is not one of the supervisor's workers.
        """
        if pid not in self.worker_pids():
            raise HarnessError(f"{pid} is not a worker of authmilter {self.pid}")
        os.kill(pid, signal.SIGKILL)

    def log_size(self) -> int:
        return size_of(self.log_path)

    @abstractmethod
    def folder_for_files(self, name: str) -> Path:
        """A folder for files the daemon reads (signing keys), at a path it sees as the tests do."""

    @abstractmethod
    def hand_over(self, folder: Path) -> None:
        """Give the files in ``folder`` to the daemon's user, as a deployment gives it its keys."""


class AuthmilterProcess(Authmilter):
    """``python -m authmilter run --config FILE`` with its output in ``workdir/authmilter.log``.

    Args:
        workdir: a directory this process owns.
        milter_port: TCP port on 127.0.0.1 (must match the MTA's milter setting).
        dns_port: the test DNS server's port on 127.0.0.1.
        workers: worker processes.
        metrics_port: the Prometheus endpoint's port on 127.0.0.1; 0: none.
    """

    def __init__(
        self, workdir: Path, *, milter_port: int, dns_port: int, workers: int = 2, metrics_port: int = 0
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            config_path=workdir / "authmilter.toml",
            log_path=workdir / "authmilter.log",
            history_path=workdir / HISTORY_FILE,
            milter_port=milter_port,
            dns_port=dns_port,
            workers=workers,
            metrics_port=metrics_port,
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise HarnessError("authmilter is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def folder_for_files(self, name: str) -> Path:
        folder = self.config_path.parent / name
        folder.mkdir(exist_ok=True)
        return folder

    def hand_over(self, folder: Path) -> None:
        """Nothing to do: the daemon runs as the tests' own user."""

    def start(self) -> None:
        """Start the supervisor; return once a worker completes milter option negotiation.

        Raises:
            HarnessError: it exited or did not serve within :data:`READY_TIMEOUT`; the message has its log.
        """
        self.write_config()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            log.write(f"--- authmilter run on {self.host}:{self.milter_port}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [sys.executable, "-m", "authmilter", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
            )
        self.wait_until_serving()

    def stop(self) -> None:
        """SIGTERM the supervisor (it stops its workers); SIGKILL whatever is left after the timeout."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        workers = children_of(process.pid)
        stop_process(process, STOP_TIMEOUT)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


class ContainerAuthmilter(Authmilter):
    """The authmilter of the containerised set-up (``make test-docker``), driven from the host.

    Rootful podman runs the container's processes in the host's pid view too, so the supervisor
    (the container's first process) is signalled and its workers are found by host pid. Its config
    file and state directory are host paths mounted into the container; podman writes its output.

    Args:
        pid: the supervisor's pid on the host.
        config_path: the host file mounted as its config.
        state_dir: the host folder mounted as its state directory, ``/var/lib/authmilter``; its
            owner is the container's authmilter user.
        shared_dir: a host folder mounted at the same path in the container (signing keys).
        log_path: the file podman writes its output to.
        milter_port, dns_port: what its config names.
    """

    def __init__(
        self,
        *,
        pid: int,
        config_path: Path,
        state_dir: Path,
        shared_dir: Path,
        log_path: Path,
        milter_port: int,
        dns_port: int,
    ) -> None:
        super().__init__(
            config_path=config_path,
            log_path=log_path,
            history_path=state_dir / HISTORY_FILE,
            milter_port=milter_port,
            dns_port=dns_port,
            config_history_path=CONTAINER_STATE_DIR / HISTORY_FILE,
        )
        self._pid = pid
        self._shared_dir = shared_dir
        self._user_id = state_dir.stat().st_uid

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def running(self) -> bool:
        return _alive(self._pid)

    def folder_for_files(self, name: str) -> Path:
        folder = self._shared_dir / name
        folder.mkdir(exist_ok=True)
        return folder

    def hand_over(self, folder: Path) -> None:
        for path in (folder, *folder.iterdir()):
            os.chown(path, self._user_id, -1)


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (read from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(entry.name))
    return sorted(children)


# --- SMTP client -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """Who the message claims to come from, via XCLIENT (RFC-less Postfix extension, XCLIENT_README).

    An MTA without XCLIENT (Sendmail) sees the client's real address instead: the client then
    connects from :attr:`loopback`, its own address on the loopback network, which the MTA's
    hosts file names :attr:`name`. SPF records of the test senders authorise both addresses.
    """

    address: str = "203.0.113.5"
    name: str = "mx.sender.example"
    helo: str = "mx.sender.example"
    loopback: str = "127.0.0.5"

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address this client may appear with (XCLIENT's, then the loopback one)."""
        return (self.address, self.loopback) if self.loopback else (self.address,)


# The claimed client of every test sender: the addresses their SPF records authorise.
SENDING_CLIENT = Client()


def spf_record(client: Client) -> str:
    """An SPF record (RFC 7208) authorising ``client`` at each of its addresses, failing the rest."""
    return "v=spf1 " + " ".join(f"ip4:{address}" for address in client.addresses) + " -all"


@dataclass(frozen=True)
class Outcome:
    """The server's final answer to one message: the end-of-DATA reply, or the first refusal."""

    code: int
    text: str

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def queue_id(self) -> str:
        """The queue id from Postfix's "250 2.0.0 Ok: queued as ID" or Sendmail's
        "250 2.0.0 ID Message accepted for delivery", or ""."""
        found = _ACCEPTED_AS.search(self.text)
        return next((group for group in found.groups() if group), "") if found else ""


_ACCEPTED_AS = re.compile(r"queued as (\S+)|^\d\.\d+\.\d+ (\S+) Message accepted for delivery")


def send(
    host: str,
    port: int,
    message: bytes,
    *,
    mail_from: str,
    rcpt_to: Sequence[str] = ("alice@receiver.example",),
    client: Client | None = SENDING_CLIENT,
    xclient: bool = True,
    authenticate: bool = False,
    timeout: float = SMTP_TIMEOUT,
) -> Outcome:
    """Send one message over one connection and report the server's answer (never raises on a refusal).

    Args:
        host, port: the SMTP server.
        message: the message, CRLF line ends.
        mail_from: the envelope sender.
        rcpt_to: the envelope recipients.
        client: the client identity to claim, or None to send as ourselves (from 127.0.0.1).
        xclient: claim ``client`` with XCLIENT (Postfix); else connect from its loopback address.
        authenticate: log in with AUTH (:data:`SASL_MECHANISM`) before MAIL FROM.
        timeout: seconds per SMTP command.

    Returns:
        the reply to DATA (or to the command that refused the transaction); code 0 if the
        connection broke without a reply.
    """
    source: tuple[str, int] | None = None
    if client is not None and not xclient:
        if not client.loopback:
            raise HarnessError(f"client {client.name} has no loopback address to connect from (no XCLIENT)")
        source = (client.loopback, 0)
    try:
        with smtplib.SMTP(host, port, timeout=timeout, source_address=source) as smtp:
            if client is None:
                smtp.ehlo("client.test-harness.example")
            elif source is not None:
                # The connection itself is the client's identity: greet as it.
                smtp.ehlo(client.helo)
            else:
                _claim_with_xclient(smtp, client)
            if authenticate:
                _authenticate(smtp)
            return _transaction(smtp, message, mail_from, rcpt_to)
    except smtplib.SMTPServerDisconnected as e:
        return Outcome(0, f"disconnected: {e}")


def _claim_with_xclient(smtp: smtplib.SMTP, client: Client) -> None:
    smtp.ehlo("client.test-harness.example")
    code, text = smtp.docmd("XCLIENT", f"ADDR={client.address} NAME={client.name} HELO={client.helo}")
    if code != 220:
        raise HarnessError(f"XCLIENT refused: {code} {text.decode(errors='replace')}")
    # XCLIENT resets the session (Postfix XCLIENT_README): greet again as the claimed host.
    smtp.ehlo(client.helo)


def _authenticate(smtp: smtplib.SMTP) -> None:
    # RFC 4505 §2: the initial response is optional trace information (here: who is testing).
    trace = base64.b64encode(b"authmilter-tests").decode()
    code, text = smtp.docmd("AUTH", f"{SASL_MECHANISM} {trace}")
    if code != 235:
        raise HarnessError(f"AUTH {SASL_MECHANISM} refused: {code} {text.decode(errors='replace')}")


def _transaction(smtp: smtplib.SMTP, message: bytes, mail_from: str, rcpt_to: Sequence[str]) -> Outcome:
    code, text = smtp.mail(mail_from)
    if code != 250:
        return Outcome(code, text.decode(errors="replace"))
    for recipient in rcpt_to:
        code, text = smtp.rcpt(recipient)
        if code not in (250, 251):
            return Outcome(code, text.decode(errors="replace"))
    try:
        code, text = smtp.data(message)
    except smtplib.SMTPDataError as e:
        return Outcome(e.smtp_code, _decode(e.smtp_error))
    return Outcome(code, text.decode(errors="replace"))


def _decode(text: bytes | str) -> str:
    return text.decode(errors="replace") if isinstance(text, bytes) else text


# --- what the tests use ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sender:
    """A sending domain the tests publish: SPF for :attr:`client`, DKIM keys, a DMARC policy."""

    domain: str
    rsa: SigningKey
    ed25519: SigningKey
    client: Client = SENDING_CLIENT

    @property
    def address(self) -> str:
        return f"bob@{self.domain}"


# The address outside every sender's SPF record: mail claimed from it fails SPF.
SPOOFING_CLIENT = Client("198.51.100.7", "spoofer.attacker.example", "spoofer.attacker.example", "127.0.0.7")


@dataclass(frozen=True)
class Senders:
    reject: Sender
    quarantine: Sender
    # By MTA: each looked up by no other test, so nothing of it is cached when DNS goes away, even
    # where both MTAs ask one authmilter (make test-docker).
    outage: dict[str, Sender]


@dataclass(frozen=True)
class LocalPostfix:
    """The natively started Postfix with its sink, and the milter port its smtpd_milters names."""

    postfix: PostfixInstance
    sink: MessageStore
    milter_port: int


class HeldMessages(Protocol):
    """Where an MTA keeps the messages authmilter quarantined: Postfix's hold queue, Sendmail's quarantine."""

    def queue_ids(self) -> list[str]: ...

    def delete(self, queue_id: str) -> None: ...


@dataclass
class Mta:
    """What a test talks to: an MTA's SMTP address, the sink's messages and the MTA's held messages.

    Attributes:
        name: "postfix" or "sendmail" (the test parameter).
        xclient: the MTA takes XCLIENT (Postfix); else clients connect from their loopback address.
        milter: the authmilter daemon this MTA asks, or None when it runs outside the tests.
        submission_port: where the MTA's {daemon_name} is :data:`SUBMISSION_DAEMON` (0: none).
    """

    name: str
    host: str
    port: int
    sink: MessageStore
    hold: HeldMessages
    xclient: bool = True
    milter: Authmilter | None = None
    submission_port: int = 0

    def send(
        self,
        message: bytes,
        *,
        mail_from: str,
        client: Client | None = SENDING_CLIENT,
        port: int = 0,
        authenticate: bool = False,
    ) -> Outcome:
        """One message over one connection from ``client`` (None: 127.0.0.1) to ``port`` (0: the
        MTA's port with authmilter), after AUTH if ``authenticate``; never raises on a refusal."""
        return send(
            self.host,
            port or self.port,
            message,
            mail_from=mail_from,
            client=client,
            xclient=self.xclient,
            authenticate=authenticate,
        )

    def client_address(self, client: Client) -> str:
        """The address the MTA (and so authmilter) sees for ``client``."""
        return client.address if self.xclient else client.loopback

    def delivered(self, message_id: str) -> DeliveredMessage:
        """The delivered copy of the message, waiting for the MTA to relay it.

        Raises:
            AssertionError: it did not reach the sink within :data:`DELIVERY_TIMEOUT`.
        """
        return self.sink.wait_for(message_id, DELIVERY_TIMEOUT)

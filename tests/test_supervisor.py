"""The daemon: the listening socket, systemd notification, logging, and `authmilter run` as real
processes on loopback (workers, respawn, reload, graceful stop), driven with tests/milterclient.py."""

from __future__ import annotations

import contextlib
import ctypes
import grp
import itertools
import logging
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from authmilter import cli
from authmilter.config import LogSettings, MilterSettings, load_config, packaged_config_path
from authmilter.supervisor import (
    StartupError,
    configure_logging,
    notify,
    open_listener,
    socket_address,
    worker_count,
)
from milterclient import MessageResult, MilterClient, MilterProtocolError, check_message
from scrape import scrape
from scrape import value as sample
from signing import rsa_key

CONFIG_FILE = Path(__file__).resolve().parents[1] / "conf" / "authmilter.toml"

ZONE = Path(__file__).resolve().parent / "zones" / "sender.example.zone"
MESSAGE = (Path(__file__).resolve().parent / "zones" / "message.eml").read_bytes()
AUTHORISED_IP = "192.0.2.10"  # inside sender.example's SPF (ip4:192.0.2.0/24)
SPOOFING_IP = "198.51.100.7"  # outside it: SPF fail, DMARC p=reject
WAIT = 20.0  # seconds any daemon event may take before the test fails


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the listening socket ----------------------------------------------------------------------


def test_socket_address_reads_libmilter_connection_strings(tmp_path: Path) -> None:
    assert socket_address("inet:8990@127.0.0.1") == (socket.AF_INET, ("127.0.0.1", 8990))
    assert socket_address("inet6:8990@[::1]") == (socket.AF_INET6, ("::1", 8990))
    assert socket_address("inet6:8990@::1") == (socket.AF_INET6, ("::1", 8990))
    assert socket_address(f"unix:{tmp_path}/s") == (socket.AF_UNIX, f"{tmp_path}/s")
    assert socket_address(f"local:{tmp_path}/s") == (socket.AF_UNIX, f"{tmp_path}/s")
    with pytest.raises(StartupError, match="cannot resolve"):
        socket_address("inet:8990@no-such-host.invalid")


def test_inet_listener_sets_nodelay_nonblocking_and_accepted_sockets_inherit_nodelay() -> None:
    listener = open_listener(MilterSettings(socket=f"inet:{free_port()}@127.0.0.1"))
    try:
        sock = listener.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert not sock.getblocking()
        assert sock.get_inheritable()
        with socket.create_connection(sock.getsockname(), timeout=5):
            accepted = wait_for(lambda: _accept(sock), "the connection")
            assert isinstance(accepted, socket.socket)
            with accepted:
                # What libmilter's accept() gets in a worker: Nagle is off without asking.
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()


def _accept(sock: socket.socket) -> socket.socket | None:
    try:
        return sock.accept()[0]
    except BlockingIOError:
        return None


def test_inet6_listener() -> None:
    listener = open_listener(MilterSettings(socket="inet6:0@[::1]"))
    try:
        assert listener.sock.family == socket.AF_INET6
        assert listener.sock.getsockname()[0] == "::1"
        assert listener.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()


def _other_group() -> grp.struct_group:
    """A group the socket can be given: as root one that is not ours, so chgrp is visible."""
    if os.geteuid() != 0:
        return grp.getgrgid(os.getgid())
    return next(g for g in grp.getgrall() if g.gr_gid != os.getgid())


def test_unix_listener_replaces_a_stale_socket_and_sets_mode_and_group(tmp_path: Path) -> None:
    path = tmp_path / "milter.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # bound, never listened on, closed: a leftover
        stale.bind(str(path))
    group = _other_group()
    listener = open_listener(
        MilterSettings(socket=f"unix:{path}", socket_mode="0620", socket_group=group.gr_name)
    )
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o620
    assert info.st_gid == group.gr_gid
    assert not listener.sock.getblocking()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
    listener.close()
    assert not path.exists(), "the daemon's own socket file is removed when it stops"


def test_unix_listener_refuses_a_live_socket_and_other_files(tmp_path: Path) -> None:
    path = tmp_path / "milter.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(StartupError, match="another process is listening"):
            open_listener(MilterSettings(socket=f"unix:{path}"))
    regular = tmp_path / "file"
    regular.write_text("data")
    with pytest.raises(StartupError, match="is not a socket"):
        open_listener(MilterSettings(socket=f"unix:{regular}"))
    assert regular.read_text() == "data"
    with pytest.raises(StartupError, match="no group named"):
        open_listener(MilterSettings(socket=f"unix:{tmp_path}/x.sock", socket_group="no-such-group-x"))


def test_inet_listener_reports_an_address_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"inet:{port}@127.0.0.1: cannot bind"):
            open_listener(MilterSettings(socket=f"inet:{port}@127.0.0.1"))


RETAINED_MB_PROBE = """
import sys, threading
from authmilter.supervisor import return_large_buffers
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
if sys.argv[1] == "on":
    assert return_large_buffers()
before = rss()
def check_messages():  # a libmilter thread's copies of three 10 MB messages, one after the other
    for _ in range(3):
        data = bytearray(10_000_000)
        data[::4096] = b"x" * len(data[::4096])
        copy = bytes(data)
        del data, copy
thread = threading.Thread(target=check_messages)
thread.start()
thread.join()
print((rss() - before) // 1_000_000)
"""


def retained_mb(setting: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", RETAINED_MB_PROBE, setting], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_workers_give_large_buffers_back_to_the_system() -> None:
    """glibc keeps freed 10 MB blocks in a thread's heap once its mmap threshold has risen."""
    assert retained_mb("off") >= 10, "glibc's default keeps them (the reason for the setting)"
    assert retained_mb("on") < 5


def test_worker_count_zero_means_one_per_cpu() -> None:
    assert worker_count(MilterSettings(workers=3)) == 3
    assert worker_count(MilterSettings(workers=0)) == (os.cpu_count() or 1)


# --- systemd notification ----------------------------------------------------------------------


def test_notify_sends_to_a_path_and_to_the_abstract_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify"))
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert notify("READY=1", "STATUS=serving")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving"
    name = f"authmilter-test-{os.getpid()}-{time.time_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STOPPING=1")
        assert receiver.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_sends_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not notify("READY=1")


# --- logging -----------------------------------------------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_configure_logging_to_syslog_uses_the_facility(root_logging: logging.Logger, tmp_path: Path) -> None:
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(address)
        syslog.settimeout(5)
        configure_logging(LogSettings(destination="syslog", level="info", syslog_facility="local3"), address)
        logging.getLogger("authmilter.test").debug("not at info level")
        logging.getLogger("authmilter.test").info("queue_id=ABC accepted")
        # RFC 5424 PRI: local3 (19) * 8 + info (6).
        assert syslog.recv(4096) == f"<158>authmilter[{os.getpid()}]: INFO queue_id=ABC accepted\0".encode()
        configure_logging(LogSettings(destination="syslog", level="debug", syslog_facility="mail"), address)
        logging.getLogger("authmilter.test").debug("why")
        assert syslog.recv(4096).startswith(b"<23>")  # mail (2) * 8 + debug (7)
    assert len(root_logging.handlers) == 1, "a reconfiguration replaces the handler"


def test_configure_logging_falls_back_to_stderr_and_prefixes_priorities_for_journald(
    root_logging: logging.Logger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = (tmp_path / "stderr").open("w")
    monkeypatch.setattr(sys, "stderr", stream)
    info = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    configure_logging(LogSettings(destination="syslog"), str(tmp_path / "no-syslog-here"))
    logging.getLogger("authmilter.test").error("boom")
    stream.flush()
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert lines[0].startswith(f"<4>authmilter[{os.getpid()}]: WARNING cannot log to syslog")
    assert lines[1] == f"<3>authmilter[{os.getpid()}]: ERROR boom"


# --- `authmilter run`: arguments and start-up errors ---------------------------------------------


def test_run_without_a_config_file_uses_the_packaged_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", tmp_path / "missing.toml")
    packaged = cli.parse_args(["run"]).config
    assert packaged == packaged_config_path() and packaged.read_bytes() == CONFIG_FILE.read_bytes()
    default = load_config(packaged)
    assert default.milter.socket == "inet:8990@127.0.0.1" and default.signing_table is None  # verify only
    (tmp_path / "present.toml").write_text("")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", tmp_path / "present.toml")
    assert cli.parse_args(["run"]).config == tmp_path / "present.toml"
    assert cli.parse_args(["run", "--config", "x.toml"]).config == Path("x.toml")


def test_run_with_an_invalid_config_exits_1_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[milter]\nworkers = 2\nsocket = "tcp:25"\n')
    assert cli.main(["run", "--config", str(config)]) == 1
    assert f"{config}:3: [milter] socket" in capsys.readouterr().err


def test_run_on_a_busy_port_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logging: logging.Logger
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "a.toml"
        config.write_text(f'[milter]\nsocket = "inet:{port}@127.0.0.1"\n')
        assert cli.main(["run", "--config", str(config)]) == 1
    assert "cannot bind" in capsys.readouterr().err


def test_run_with_a_busy_metrics_port_exits_1_and_leaves_no_directory(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    root_logging: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "a.toml"
        config.write_text(
            f'[milter]\nsocket = "inet:{free_port()}@127.0.0.1"\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        )
        assert cli.main(["run", "--config", str(config)]) == 1
    assert (
        f"[metrics] listen = 127.0.0.1:{port}: cannot bind: Address already in use" in capsys.readouterr().err
    )
    assert not list(tmp_path.glob("authmilter-metrics-*"))


# --- `authmilter run` as real processes ------------------------------------------------------


class Daemon:
    """`python -m authmilter run` with its own config, zone file, log and notification socket."""

    def __init__(
        self,
        directory: Path,
        socket_spec: str,
        authserv_id: str,
        zone: bytes,
        extra: str = "",
        descriptor_limits: tuple[int, int] | None = None,
    ) -> None:
        self.directory = directory
        self.socket = socket_spec
        self.config = directory / "authmilter.toml"
        self.zone = directory / "sender.example.zone"
        self.zone.write_bytes(zone)
        self.write_config(authserv_id, extra)
        self.log_path = directory / "daemon.log"
        self.notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notifications.bind(str(directory / "notify"))
        self.received: list[str] = []
        env = {**os.environ, "NOTIFY_SOCKET": str(directory / "notify")}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "authmilter", "run", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=None if descriptor_limits is None else _limit_descriptors(descriptor_limits),
            )

    def write_config(self, authserv_id: str, extra: str = "") -> None:
        self.config.write_text(
            f'[milter]\nsocket = "{self.socket}"\nworkers = 2\nauthserv_id = "{authserv_id}"\n'
            f'shutdown_timeout = 20\nsocket_mode = "0660"\n{extra}'
            f'[dns]\nzone_files = ["{self.zone.name}"]\n'
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str) -> re.Match[str]:
        match = wait_for(lambda: re.search(pattern, self.log()), f"log line {pattern!r}\n{self.log()}")
        assert isinstance(match, re.Match)
        return match

    def notification(self, assignment: str) -> str:
        """Wait for a datagram containing ``assignment``; earlier ones are kept in ``received``."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            message = self._receive(0.2)
            if message is not None and assignment in message.split("\n"):
                return message
        raise AssertionError(f"no {assignment} from the daemon; got {self.received}\n{self.log()}")

    def notifications_so_far(self, wait: float) -> list[str]:
        """Every datagram that arrives within ``wait`` seconds (kept in ``received`` too)."""
        deadline = time.monotonic() + wait
        arrived = []
        while (left := deadline - time.monotonic()) > 0 and (message := self._receive(left)) is not None:
            arrived.append(message)
        return arrived

    def _receive(self, timeout: float) -> str | None:
        """The next datagram within ``timeout`` seconds, appended to ``received``; None if none came."""
        self.notifications.settimeout(timeout)
        try:
            message = self.notifications.recv(4096).decode()
        except TimeoutError:
            return None
        self.received.append(message)
        return message

    def workers(self) -> set[int]:
        return children(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.notifications.close()


def _limit_descriptors(limits: tuple[int, int]) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # Field 4 of /proc/PID/stat is the parent; the name before it may hold spaces.
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(fields[1]) == pid:
                    found.add(int(entry.name))
    return found


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(
        socket_spec: str | None = None,
        authserv_id: str = "mx.receiver.example",
        zone: bytes = ZONE.read_bytes(),
        extra: str = "",
        descriptor_limits: tuple[int, int] | None = None,
    ) -> Daemon:
        spec = socket_spec or f"inet:{free_port()}@127.0.0.1"
        daemon = Daemon(tmp_path, spec, authserv_id, zone, extra, descriptor_limits)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


def authentication_results_id(result: MessageResult) -> str:
    inserted = [
        m for m in result.modifications if m.kind == "insheader" and m.name == "Authentication-Results"
    ]
    assert len(inserted) == 1, result
    assert inserted[0].index == 0, "our A-R goes on top (RFC 8601 §4)"
    return inserted[0].value.split(";")[0].strip()


def open_session(address: str) -> MilterClient:
    """A milter connection as an MTA holds it for an SMTP session: negotiated, after HELO."""
    client = MilterClient.connect(address)
    client.negotiate()
    client.connect_info("mx.sender.example", AUTHORISED_IP)
    client.helo("mx.sender.example")
    return client


def open_transaction(address: str) -> MilterClient:
    """A connection in the middle of a message: everything sent but the end of message."""
    return start_message(open_session(address))


def start_message(client: MilterClient) -> MilterClient:
    client.mail("bob@sender.example")
    client.rcpt("alice@receiver.example")
    client.data()
    for name, value in (("From", "Bob <bob@sender.example>"), ("Subject", "in flight")):
        client.header(name, value)
    client.end_of_headers()
    client.body(b"Sent before the signal, finished after it.\r\n")
    return client


def finish_transaction(client: MilterClient) -> MessageResult:
    modifications, response = client.end_of_message({"i": "INFLIGHT"})
    client.quit()
    return MessageResult("eom", response, modifications)


def test_run_serves_messages_with_prefork_workers_and_notifies_systemd(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon()
    ready = daemon.notification("READY=1")
    assert f"MAINPID={daemon.pid}" in ready.split("\n")
    assert "STATUS=serving" in ready and "with 2 workers" in ready
    assert len(daemon.workers()) == 2

    passed = check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP)
    assert passed.stage == "eom" and passed.response.kind == "accept"
    assert authentication_results_id(passed) == "mx.receiver.example"

    spoofed = check_message(daemon.socket, MESSAGE, client_ip=SPOOFING_IP)
    assert spoofed.response.kind == "replycode"
    assert re.match(r"550 5\.7\.\d+ .*sender\.example", spoofed.response.text), spoofed.response.text
    assert not spoofed.modifications

    # The {auth_authen} macro at MAIL: a SASL client's mail is not verified, not even rejected.
    authenticated = check_message(
        daemon.socket,
        MESSAGE,
        client_ip=SPOOFING_IP,
        mail_macros={"{auth_authen}": "bob", "{auth_type}": "PLAIN"},
    )
    assert authenticated.response.kind == "accept" and not authenticated.modifications


def _pidfd_getfd(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        duplicate = int(libc.syscall(438, pidfd, fd, 0))  # pidfd_getfd(2); 438 on every architecture
        if duplicate < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd({pid}, {fd})")
        return duplicate
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def worker_side(daemon: Daemon, client: MilterClient) -> Iterator[socket.socket]:
    """The worker's socket of a TCP milter connection (a duplicate, taken with pidfd_getfd)."""
    ours = client.sock.getsockname()
    for worker in daemon.workers():
        for entry in Path(f"/proc/{worker}/fd").iterdir():
            with contextlib.suppress(OSError):
                if not os.readlink(entry).startswith("socket:"):
                    continue
                try:
                    duplicate = _pidfd_getfd(worker, int(entry.name))
                except PermissionError:
                    pytest.skip("pidfd_getfd is not permitted here (ptrace restrictions)")
                accepted = socket.socket(fileno=duplicate)
                if accepted.family == socket.AF_INET and accepted.getpeername() == ours:
                    with accepted:
                        yield accepted
                    return
                accepted.close()
    raise AssertionError(f"no worker holds the other end of {ours}")


def test_workers_accept_connections_with_nodelay(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    daemon.notification("READY=1")
    with MilterClient.connect(daemon.socket) as client:
        client.negotiate()  # answered: a worker has accepted the connection
        with worker_side(daemon, client) as accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1, "Nagle is off"


def delayed_acks() -> int:
    """TcpExt DelayedACKs of this network namespace: ACKs the kernel sent only when its delayed-ACK
    timer (40 ms or more) ran out, with nothing to piggyback them on."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    names, values = next((n, v) for n, v in itertools.pairwise(lines) if n[0] == "TcpExt:" == v[0])
    return int(values[names.index("DelayedACKs")])


def test_workers_acknowledge_a_nagle_mta_promptly_over_tcp(start_daemon: Callable[..., Daemon]) -> None:
    """Postfix writes to a milter with Nagle on and awaits no reply before end of message, so its
    second write waits for our ACK of the first, which the kernel delays after each reply of ours
    (quickack.py). The workers acknowledge at once: no delayed-ACK timer runs out per message."""
    daemon = start_daemon()
    daemon.notification("READY=1")
    messages = 8
    with MilterClient.connect(daemon.socket, nagle=True) as client:
        client.negotiate()
        before = delayed_acks()
        client.connect_info("mx.sender.example", AUTHORISED_IP)
        client.helo("mx.sender.example")
        for _ in range(messages):
            client.mail("bob@sender.example")  # MAIL goes out; RCPT and the rest wait for its ACK
            client.rcpt("alice@receiver.example")
            client.header("From", "Bob <bob@sender.example>")
            client.body(b"Hello.\r\n")
            _, response = client.end_of_message({"i": "QUICKACK"})
            assert response.kind in ("accept", "replycode"), response
        late = delayed_acks() - before
    # Without prompt ACKs every message waits for at least one timer (measured: 8 or more of 8).
    assert late < messages / 2, f"{late} ACKs came late for {messages} messages"


def test_a_killed_worker_is_replaced(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    daemon.notification("READY=1")
    before = daemon.workers()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> set[int] | None:
        workers = daemon.workers()
        return workers if len(workers) == 2 and victim not in workers else None

    after = wait_for(replaced, "a new worker")
    assert isinstance(after, set) and len(after & before) == 1
    daemon.wait_log(rf"worker {victim} killed by signal 9 after [\d.]+ s; starting another in 0\.1 s")
    for _ in range(4):  # whichever worker takes them
        result = check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP)
        assert result.response.kind == "accept"


def listening_socket(pid: int, port: int) -> str:
    """``socket:[INODE]`` of the socket listening on 127.0.0.1:``port``, if ``pid`` holds it."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # 0A: LISTEN
            link = f"socket:[{fields[9]}]"
            held = {os.readlink(e) for e in Path(f"/proc/{pid}/fd").iterdir()}
            return link if link in held else ""
    return ""


def test_sighup_with_a_valid_config_starts_fresh_workers_on_the_same_socket(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon(authserv_id="old.receiver.example")
    daemon.notification("READY=1")
    old_workers = daemon.workers()
    port = int(daemon.socket.split(":")[1].split("@")[0])
    socket_before = listening_socket(daemon.pid, port)
    assert socket_before
    in_flight = open_transaction(daemon.socket)
    # An SMTP session between messages: Postfix would send its next message on this connection.
    idle_session = open_session(daemon.socket)

    daemon.write_config("new.receiver.example")
    daemon.process.send_signal(signal.SIGHUP)
    daemon.notification("RELOADING=1")
    assert "configuration reloaded" not in daemon.log()
    daemon.notification("READY=1")
    # Ready means reloaded: from now on no old worker takes a connection (systemctl reload has
    # returned, and the administrator expects the new settings). Connect at once, before anything
    # else can give the old workers time to stop accepting.
    sessions = [open_session(daemon.socket) for _ in range(8)]
    for session in sessions:
        result = finish_transaction(start_message(session))
        assert authentication_results_id(result) == "new.receiver.example"
    daemon.wait_log("configuration reloaded: serving")

    def fresh() -> set[int] | None:
        workers = daemon.workers() - old_workers
        return workers if len(workers) == 2 else None

    new_workers = wait_for(fresh, "new workers")
    assert isinstance(new_workers, set)
    for _ in range(4):
        result = check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP)
        assert authentication_results_id(result) == "new.receiver.example"
    assert listening_socket(daemon.pid, port) == socket_before, "the socket is never closed or reopened"

    # The message that was in progress on an old worker finishes there, with the old settings.
    finished = finish_transaction(in_flight)
    assert finished.response.kind == "accept"
    assert authentication_results_id(finished) == "old.receiver.example"
    # The open session's next message is still served by its old worker: a reload costs no 4xx.
    time.sleep(0.5)  # a worker that drained on messages only would have gone by now
    next_message = finish_transaction(start_message(idle_session))
    assert next_message.response.kind == "accept"
    assert authentication_results_id(next_message) == "old.receiver.example"
    wait_for(lambda: not (daemon.workers() & old_workers), "the old workers to exit")
    assert daemon.workers() == new_workers


def test_a_reload_is_ready_only_when_no_old_worker_accepts_any_more(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon(authserv_id="old.receiver.example")
    daemon.notification("READY=1")
    old_workers = sorted(daemon.workers())
    # Frozen, the old workers can neither stop accepting nor say so.
    for pid in old_workers:
        os.kill(pid, signal.SIGSTOP)
    daemon.write_config("new.receiver.example")
    daemon.process.send_signal(signal.SIGHUP)
    daemon.notification("RELOADING=1")
    result = check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP)
    assert authentication_results_id(result) == "new.receiver.example", "the new workers serve"

    def ready(arrived: list[str]) -> bool:
        return any("READY=1" in message.split("\n") for message in arrived)

    assert not ready(daemon.notifications_so_far(1.0)), "an old worker may still take a connection"
    os.kill(old_workers[0], signal.SIGCONT)  # it stops accepting and says so, then exits
    wait_for(lambda: old_workers[0] not in daemon.workers(), "the first old worker to exit")
    assert not ready(daemon.notifications_so_far(0.5)), "the second old worker may still take one"
    assert "configuration reloaded" not in daemon.log()
    os.kill(old_workers[1], signal.SIGKILL)  # an exit counts as well
    daemon.notification("READY=1")
    daemon.wait_log("configuration reloaded: serving")


def test_sighup_with_a_broken_config_keeps_the_running_workers(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(authserv_id="kept.receiver.example")
    daemon.notification("READY=1")
    workers = daemon.workers()

    daemon.write_config("new.receiver.example", extra="workers = 3\n")  # the key twice: invalid TOML
    daemon.process.send_signal(signal.SIGHUP)
    daemon.notification("RELOADING=1")
    daemon.notification("READY=1")
    daemon.wait_log(
        rf"ERROR reload refused, the running configuration stays: {re.escape(str(daemon.config))}"
    )

    daemon.write_config("new.receiver.example")
    daemon.zone.write_text("this is not a zone file\n")  # a valid config naming a broken zone file
    daemon.process.send_signal(signal.SIGHUP)
    daemon.notification("RELOADING=1")
    daemon.notification("READY=1")
    # Loaded in the supervisor before any worker is forked: refused, naming the file and line.
    daemon.wait_log(r"ERROR reload refused, the running configuration stays: \S+/sender\.example\.zone:1: ")

    wait_for(lambda: daemon.workers() == workers, "only the old workers to remain")
    result = check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP)
    assert authentication_results_id(result) == "kept.receiver.example"


def test_sigterm_on_a_unix_socket_lets_the_message_in_progress_finish(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "milter.sock"
    daemon = start_daemon(f"unix:{path}")
    daemon.notification("READY=1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    result = check_message(f"unix:{path}", MESSAGE, client_ip=AUTHORISED_IP)
    assert authentication_results_id(result) == "mx.receiver.example"

    in_flight = open_transaction(f"unix:{path}")
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    daemon.notification("STOPPING=1")
    finished = finish_transaction(in_flight)
    assert finished.response.kind == "accept"
    assert authentication_results_id(finished) == "mx.receiver.example"
    assert daemon.process.wait(WAIT) == 0
    assert time.monotonic() - started < 10, "stopped well before the 20 s shutdown timeout"
    assert not path.exists()
    assert "stopped" in daemon.log()


def test_sigterm_finishes_the_message_in_progress_but_not_idle_connections(
    start_daemon: Callable[..., Daemon],
) -> None:
    """An MTA holds a milter connection for a whole SMTP session: idle ones must not delay a stop."""
    daemon = start_daemon()  # shutdown_timeout = 20
    daemon.notification("READY=1")
    idle = MilterClient.connect(daemon.socket)
    idle.negotiate()  # answered: a worker has accepted it
    idle.connect_info("mx.sender.example", AUTHORISED_IP)
    idle.helo("mx.sender.example")
    in_flight = open_transaction(daemon.socket)

    daemon.process.send_signal(signal.SIGTERM)
    daemon.notification("STOPPING=1")
    time.sleep(1)  # a worker that left too early would have gone by now
    finished = finish_transaction(in_flight)
    assert finished.response.kind == "accept"
    assert authentication_results_id(finished) == "mx.receiver.example"
    finished_at = time.monotonic()
    assert daemon.process.wait(WAIT) == 0
    assert time.monotonic() - finished_at < 2, "the idle connection kept a worker until the timeout"
    assert "did not stop within the shutdown timeout" not in daemon.log()
    with idle, contextlib.suppress(ConnectionResetError):
        assert idle.sock.recv(1) == b"", "the idle connection is closed with its worker"


def test_a_runtime_that_cannot_be_loaded_makes_run_exit_1(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(zone=b"not a zone\n")  # a valid config; the resolver cannot be built
    assert daemon.process.wait(WAIT) == 1
    assert re.search(r"authmilter: \S+/sender\.example\.zone:\d+: ", daemon.log())
    assert "listening on" not in daemon.log(), "nothing is bound before everything is loaded"


# --- never silently dead: respawn from the loaded snapshot, give up loudly (issue 9) ----------


def test_a_replacement_worker_serves_from_the_loaded_snapshot_though_its_files_broke(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A worker killed after its key file was corrupted and its history folder removed is replaced,
    and the replacement signs with the key loaded at start and checks mail without history."""
    key = rsa_key()
    key_file = tmp_path / "s1.private"
    key_file.write_bytes(key.private)
    key_file.chmod(0o600)
    (tmp_path / "KeyTable").write_text(f"s1._domainkey.sender.example sender.example:s1:{key_file}\n")
    (tmp_path / "SigningTable").write_text("sender.example s1._domainkey.sender.example\n")
    history = tmp_path / "history" / "history.jsonl"
    history.parent.mkdir()
    daemon = start_daemon(
        extra=f'internal_hosts = ["127.0.0.1"]\n[history]\npath = "{history}"\n'
        f'[signing]\nkey_table = "{tmp_path / "KeyTable"}"\nsigning_table = "{tmp_path / "SigningTable"}"\n'
    )
    daemon.notification("READY=1")
    key_file.write_bytes(b"no longer a key\n")
    shutil.rmtree(history.parent)
    before = daemon.workers()
    for pid in before:
        os.kill(pid, signal.SIGKILL)

    def replaced() -> set[int] | None:
        workers = daemon.workers()
        return workers if len(workers) == 2 and not workers & before else None

    wait_for(replaced, "two new workers")
    for _ in range(4):  # whichever worker takes them
        outbound = check_message(daemon.socket, MESSAGE, client_ip="127.0.0.1")
        assert outbound.response.kind == "accept"
        signatures = [m for m in outbound.modifications if m.name == "DKIM-Signature"]
        assert len(signatures) == 1 and "s=s1;" in signatures[0].value.replace(" ", "")
        inbound = check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP)
        assert inbound.response.kind == "accept"
        assert authentication_results_id(inbound) == "mx.receiver.example"
    daemon.wait_log(r"history record lost: .*history file \S+history\.jsonl: cannot open: No such file")


GIVING_UP_SUPERVISOR = """
import sys, time
from pathlib import Path
from authmilter.config import load_config
from authmilter.supervisor import Supervisor, configure_logging, load_runtime, open_listener

config = load_config(sys.argv[1])
marker = Path(sys.argv[2])
configure_logging(config.log)

def worker(listener, runtime, ready):
    if marker.exists():  # what a worker that cannot start does: fail before serving
        raise RuntimeError(f"cannot start: {marker} exists")
    ready()
    while True:
        time.sleep(60)

listener = open_listener(config.milter)
try:
    sys.exit(Supervisor(load_runtime(config), listener, worker).run())
finally:
    listener.close()
"""


def test_workers_that_cannot_be_kept_alive_make_the_supervisor_close_the_socket_and_exit_1(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = tmp_path / "authmilter.toml"
    config.write_text(f'[milter]\nsocket = "inet:{port}@127.0.0.1"\nworkers = 2\n')
    marker = tmp_path / "broken"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notifications:
        notifications.bind(str(tmp_path / "notify"))
        notifications.settimeout(WAIT)
        log = tmp_path / "supervisor.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-c", GIVING_UP_SUPERVISOR, str(config), str(marker)],
                stdout=out,
                stderr=out,
                env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
            )
        try:
            assert "READY=1" in notifications.recv(4096).decode().split("\n")
            marker.touch()
            for pid in children(process.pid):
                os.kill(pid, signal.SIGKILL)
            assert process.wait(WAIT) == 1, log.read_text()
        finally:
            process.kill()
            process.wait()
    assert re.search(
        rf"5 workers in a row exited before serving \(the last: worker \d+ exited with status 1\) and "
        rf"none serves: closing inet:{port}@127\.0\.0\.1 and exiting with status 1",
        log.read_text(),
    ), log.read_text()
    assert "cannot start:" in log.read_text(), "each worker's reason is logged"
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass


SERVE_ON = """
import os, sys
from authmilter.config import load_config
from authmilter.milter_app import build_runtime, serve

try:
    serve(sys.argv[1], build_runtime(load_config(sys.argv[2])), ready=lambda: print("READY", flush=True))
except Exception as e:
    print("FAILED:", e, flush=True)
"""


def test_a_worker_says_ready_only_once_libmilter_serves_the_socket(tmp_path: Path) -> None:
    config = tmp_path / "authmilter.toml"
    config.write_text("[milter]\n")
    with open(os.devnull) as not_a_socket:  # libmilter cannot serve it: smfi_main fails
        failed = subprocess.run(
            [sys.executable, "-c", SERVE_ON, f"fd:{not_a_socket.fileno()}", str(config)],
            pass_fds=(not_a_socket.fileno(),),
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    assert failed.stdout.startswith("FAILED:") and "READY" not in failed.stdout, failed.stdout + failed.stderr

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        serving = subprocess.Popen(
            [sys.executable, "-c", SERVE_ON, f"fd:{listener.fileno()}", str(config)],
            pass_fds=(listener.fileno(),),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert serving.stdout is not None
            assert serving.stdout.readline() == "READY\n"
            with MilterClient.connect(f"inet:{listener.getsockname()[1]}@127.0.0.1", 5) as client:
                client.negotiate()  # answered: libmilter serves
        finally:
            serving.kill()
            serving.wait()


# --- descriptors: a limit raised, a cap that answers at once (issue 9) -----------------------


def descriptor_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no descriptor limit for {pid}")


def open_idle_sessions(address: str, count: int) -> list[MilterClient]:
    """``count`` SMTP sessions' milter connections, each past the connect event, kept idle."""
    sessions = []
    for n in range(count):
        client = MilterClient.connect(address, 5)
        sessions.append(client)
        try:
            client.negotiate()
            client.connect_info("mx.sender.example", f"192.0.2.{n % 250 + 1}")
        except (ConnectionError, MilterProtocolError):
            pass  # closed by the milter: judged below
    return sessions


def closed_at_once(sessions: list[MilterClient], within: float = 1.5) -> list[bool]:
    """For each session: closed by the milter within ``within`` seconds (True), or still open."""
    closed = [False] * len(sessions)
    with selectors.DefaultSelector() as selector:
        for n, client in enumerate(sessions):
            client.sock.setblocking(False)
            selector.register(client.sock, selectors.EVENT_READ, n)
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                try:
                    closed[key.data] = sessions[key.data].sock.recv(1) == b""
                except ConnectionResetError:
                    closed[key.data] = True
                selector.unregister(key.fileobj)
    for client in sessions:
        client.sock.setblocking(True)
    return closed


def test_connections_beyond_max_connections_are_closed_at_once_and_logged_once(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon(extra="max_connections = 3\n")
    daemon.notification("READY=1")
    sessions = open_idle_sessions(daemon.socket, 10)
    try:
        closed = closed_at_once(sessions)
        assert closed.count(True) >= 4 and closed.count(False) <= 6, closed
        for client, was_closed in zip(sessions, closed, strict=True):
            if not was_closed:
                client.sock.settimeout(5)
                client.helo("mx.sender.example")  # an admitted session goes on being served
    finally:
        for client in sessions:
            client.close()
    refusals = re.findall(r"has no room for more MTA connections \(3 open, limit 3", daemon.log())
    assert 1 <= len(refusals) <= 2, daemon.log()  # once per worker per minute, not per connection
    assert "closed at once, the MTA applies its milter_default_action" in daemon.log()
    wait_for(lambda: check_message(daemon.socket, MESSAGE).response.kind == "accept", "room again")


def test_the_descriptor_limit_is_raised_and_never_leaves_a_connection_unanswered(
    start_daemon: Callable[..., Daemon],
) -> None:
    """At a hard limit of 200 descriptors each worker serves (200 - 64) // 2 = 68 connections;
    every connection beyond is closed at once instead of waiting in the accept queue."""
    daemon = start_daemon(descriptor_limits=(100, 200))
    daemon.notification("READY=1")
    for pid in daemon.workers():
        assert descriptor_limits(pid) == (200, 200), "the soft limit is raised to the hard one"
    assert re.search(r"max_connections = 4096 is more than .* at most 68 connections", daemon.log())
    sessions = open_idle_sessions(daemon.socket, 400)  # more than 2 workers x 200 descriptors
    try:
        closed = closed_at_once(sessions)
    finally:
        for client in sessions:
            client.close()
    assert closed.count(False) <= 2 * 68 and closed.count(True) >= 400 - 2 * 68, closed.count(False)
    assert "has no room for more MTA connections (68 open, limit 68" in daemon.log()


# --- [metrics]: the endpoint of a running daemon -------------------------------------------------


def test_metrics_are_summed_over_the_workers_and_count_their_lives_and_reloads(
    start_daemon: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime_directory = tmp_path / "run"
    runtime_directory.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime_directory))  # as systemd's RuntimeDirectory=
    port = free_port()
    daemon = start_daemon(extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    daemon.notification("READY=1")
    [multiprocess_directory] = [p for p in runtime_directory.iterdir() if p.is_dir()]  # beside "status"
    assert multiprocess_directory.name.startswith("authmilter-metrics-")
    assert sample(scrape(port), "authmilter_worker_starts_total") == 2
    for _ in range(3):  # whichever workers take them
        assert check_message(daemon.socket, MESSAGE, client_ip=AUTHORISED_IP).response.kind == "accept"
    assert check_message(daemon.socket, MESSAGE, client_ip=SPOOFING_IP).response.kind == "replycode"
    samples = scrape(port)
    assert sample(samples, "authmilter_actions_total", action="accept", direction="inbound") == 3
    assert sample(samples, "authmilter_actions_total", action="reject", direction="inbound") == 1
    assert sample(samples, "authmilter_auth_results_total", method="dmarc", result="pass") == 3
    assert sample(samples, "authmilter_auth_results_total", method="spf", result="fail") == 1
    assert sample(samples, "authmilter_check_duration_seconds_count", check="spf") == 4
    assert sample(samples, "authmilter_dns_cache_lookups_total", result="miss") > 0
    # The client has its reply before the worker sees the connection close.
    wait_for(lambda: sample(scrape(port), "authmilter_connections_in_flight") == 0, "no connection in flight")

    victim = min(daemon.workers())
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(daemon.workers()) == 2 and victim not in daemon.workers(), "a new worker")
    wait_for(lambda: sample(scrape(port), "authmilter_worker_starts_total") == 3, "the start counted")
    samples = scrape(port)
    assert sample(samples, "authmilter_worker_exits_total", reason="died") == 1
    assert sample(samples, "authmilter_actions_total", action="accept", direction="inbound") == 3, "kept"

    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_log("configuration reloaded: serving")
    samples = scrape(port)
    assert sample(samples, "authmilter_reloads_total", outcome="succeeded") == 1
    wait_for(
        lambda: sample(scrape(port), "authmilter_worker_exits_total", reason="stopped") == 2,
        "the old workers' exits counted",
    )
    daemon.stop()
    assert daemon.process.returncode == 0
    assert not multiprocess_directory.exists(), "the supervisor removes it when it stops"

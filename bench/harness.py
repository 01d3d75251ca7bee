"""The benchmark's servers: the integration harness's Postfix, sink and Knot, plus the milters under test.

Reused, not copied (tests/integration/postfix.py, sink.py, tests/dnsserver.py): :class:`BenchPostfix`
only adds smtpd ports (one per milter set-up, each with its own ``-o smtpd_milters=``) and lifts the
message size limit; the sink runs as ``sink.py`` in its own process so that its Python work does not
share a GIL with the load generator. What is new here:

- Knot listens on port 53 of a loopback address of its own (:data:`DNS_HOST`): OpenDMARC (and the
  libspf2 under it) has no nameserver setting and asks whatever /etc/resolv.conf names, which only
  takes port 53. OpenDKIM and OpenDMARC run in a private mount namespace where a bind-mounted
  resolv.conf names :data:`DNS_HOST`; the system's file is not touched. authmilter is pointed at the
  same server by its config, so all three ask the same Knot.
- :class:`MilterAddress`: one socket spec in libmilter's and in Postfix's notation, and a readiness
  check that completes milter option negotiation (a plain connect only reaches a listen backlog).
- :func:`tree_cpu_seconds` / :func:`tree_rss_bytes`: the CPU time and RSS of a process tree from /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import _paths
from postfix import (
    ALL_ACTIONS,
    ALL_PROTOCOL_STEPS,
    MILTER_VERSION,
    SMFIC_OPTNEG,
    SMFIC_QUIT,
    AuthmilterProcess,
    HarnessError,
    PostfixInstance,
    _die_with_parent,
    _wait_for,
    children_of,
    find_program,
    smtp_banner_ready,
    tail,
)

from dnsserver import AuthoritativeDns
from processes import stop_process
from signing import SigningKey, zone_txt

DNS_HOST = "127.0.53.1"
DNS_PORT = 53
# The caching proxy (dnsproxy.py) every milter asks; it asks Knot on DNS_HOST.
RESOLVER_HOST = "127.0.53.2"
AUTHSERV_ID = "mx.receiver.example"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# /proc/<pid>/stat fields after the command's closing parenthesis (proc(5), counted from "state" = 0).
_STAT_UTIME, _STAT_STIME, _STAT_CUTIME, _STAT_CSTIME = 11, 12, 13, 14
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"


# --- process trees ----------------------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants."""
    pids, pending = [], [root]
    while pending:
        pid = pending.pop()
        pids.append(pid)
        pending.extend(children_of(pid))
    return pids


def _stat_fields(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """User + system CPU of every process in the trees, reaped children included.

    Each process counts its own utime+stime plus cutime+cstime, the CPU of children it has reaped
    (a worker replaced during the run, or one that exited, moves its whole time into its parent's
    cutime). The sum over a tree is therefore conserved when a child exits, so the difference of two
    readings is the CPU spent in between.
    """
    ticks = 0
    for root in roots:
        for pid in tree_pids(root):
            fields = _stat_fields(pid)
            if fields:
                ticks += sum(int(fields[i]) for i in (_STAT_UTIME, _STAT_STIME, _STAT_CUTIME, _STAT_CSTIME))
    return ticks / _CLOCK_TICKS


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (proc(5), /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / _CLOCK_TICKS, sum(values) / _CLOCK_TICKS


def tree_rss_bytes(roots: Iterable[int]) -> int:
    """Resident memory summed over the trees (shared pages count once per process, as ps shows)."""
    total = 0
    for root in roots:
        for pid in tree_pids(root):
            fields = _stat_fields(pid)
            if fields:
                total += int(fields[21]) * _PAGE_SIZE  # rss, in pages
    return total


def listen_port() -> int:
    """A free TCP port on 127.0.0.1 below the ephemeral range (net.ipv4.ip_local_port_range).

    A milter binds its port only when its turn comes; a port from the ephemeral range may by then be
    the local end of one of the thousands of connections the run makes (or in TIME_WAIT).
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    start = random.randrange(10000, low - 1000)
    for port in range(start, low):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise HarnessError("no free port below the ephemeral range")


# --- milter sockets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MilterAddress:
    """A milter socket: a unix path, or a TCP port on 127.0.0.1."""

    path: Path | None = None
    port: int = 0

    @property
    def transport(self) -> str:
        return "unix" if self.path is not None else "tcp"

    @property
    def libmilter(self) -> str:
        """The spec for the milter's own config (libmilter's smfi_setconn notation)."""
        return f"unix:{self.path}" if self.path is not None else f"inet:{self.port}@127.0.0.1"

    @property
    def postfix(self) -> str:
        """The spec for Postfix's smtpd_milters."""
        return f"unix:{self.path}" if self.path is not None else f"inet:127.0.0.1:{self.port}"

    def answers(self) -> bool:
        """True once a milter here completes option negotiation."""
        body = SMFIC_OPTNEG + struct.pack("!III", MILTER_VERSION, ALL_ACTIONS, ALL_PROTOCOL_STEPS)
        family = socket.AF_UNIX if self.path is not None else socket.AF_INET
        target: str | tuple[str, int] = str(self.path) if self.path is not None else ("127.0.0.1", self.port)
        try:
            with socket.socket(family, socket.SOCK_STREAM) as connection:
                connection.settimeout(2)
                connection.connect(target)
                connection.sendall(struct.pack("!I", len(body)) + body)
                answered = connection.recv(5)[4:5] == SMFIC_OPTNEG
                connection.sendall(struct.pack("!I", 1) + SMFIC_QUIT)
                return answered
        except OSError:
            return False


def wait_for_milter(address: MilterAddress, alive: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not alive():
            raise HarnessError(f"milter at {address.libmilter} exited while starting:\n{tail(log)}")
        if address.answers():
            return
        time.sleep(0.1)
    raise HarnessError(f"milter at {address.libmilter} did not answer within {READY_TIMEOUT} s:\n{tail(log)}")


# --- Postfix, sink, DNS ------------------------------------------------------------------------------


def start_logged(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """A child with no input, its output appended to ``log_path``, killed when this process dies."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


class BenchPostfix(PostfixInstance):
    """The harness's private Postfix with one more smtpd port per milter set-up.

    Args:
        log_dir: where the log is kept after the instance is gone.
        sink_port: the sink every message is relayed to.
        milter_ports: smtpd port -> its smtpd_milters value (Postfix notation; "" for none).
    """

    def __init__(self, log_dir: Path, *, sink_port: int, smtp_port: int, bare_smtp_port: int) -> None:
        super().__init__(
            log_dir, smtp_port=smtp_port, bare_smtp_port=bare_smtp_port, sink_port=sink_port, milter=""
        )
        self.milter_ports: dict[int, str] = {}

    def _main_cf(self) -> str:
        # The 10 MB run needs more than the 10,240,000-byte default; 0 means no limit. The TCP runs
        # at 60 sessions exceed anvil's 50 concurrent connections per client.
        return super()._main_cf() + "message_size_limit = 0\nsmtpd_client_connection_count_limit = 0\n"

    def _master_cf(self) -> str:
        lines = [
            f"{self.host}:{port} inet n - n - - smtpd -o smtpd_milters={milters} "
            f"-o syslog_name=postfix/p{port}"
            for port, milters in self.milter_ports.items()
        ]
        return super()._master_cf() + "\n".join(lines) + "\n"

    def start(self) -> None:
        super().start()
        for port in self.milter_ports:
            if not _wait_for(lambda p=port: smtp_banner_ready(self.host, p), READY_TIMEOUT):  # type: ignore[misc]
                raise HarnessError(f"smtpd on port {port} did not greet:\n{tail(self.log_path)}")


class SinkProcess:
    """tests/integration/sink.py in its own process; counts and clears the messages it wrote."""

    def __init__(self, directory: Path, port: int, log: Path) -> None:
        self.directory = directory
        self.port = port
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._process = start_logged(
            [
                sys.executable,
                str(_paths.INTEGRATION / "sink.py"),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--dir",
                str(self.directory),
            ],
            self.log,
        )
        if not _wait_for(lambda: smtp_banner_ready("127.0.0.1", self.port), READY_TIMEOUT):
            raise HarnessError(f"sink did not greet:\n{tail(self.log)}")

    def count(self) -> int:
        with os.scandir(self.directory) as entries:
            return sum(1 for entry in entries if entry.name.endswith(".msg"))

    def clear(self) -> None:
        for entry in self.directory.iterdir():
            entry.unlink(missing_ok=True)

    def any_message(self) -> bytes:
        sample = self.sample(1)
        return sample[0] if sample else b""

    def sample(self, count: int) -> list[bytes]:
        """Up to ``count`` delivered messages, without the sink's envelope line."""
        entries = sorted(self.directory.glob("*.msg"))[:count]
        return [entry.read_bytes().partition(b"\n")[2] for entry in entries]

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, STOP_TIMEOUT)


def start_dns(
    workdir: Path,
    domain: str,
    client_ip: str,
    key: SigningKey,
    selector: str,
    extra_records: str = "",
    parent_records: str = "",
) -> AuthoritativeDns:
    """Knot on DNS_HOST:53 serving ``domain``: SPF for ``client_ip``, the DKIM key, DMARC p=reject.

    ``extra_records`` are more zone-file lines for ``domain`` (the signing run's key records),
    ``parent_records`` lines for the ``example.`` zone (the realistic workload's senders).

    Raises:
        HarnessError: port 53 of DNS_HOST is taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((DNS_HOST, DNS_PORT))
        except OSError as e:
            raise HarnessError(f"{DNS_HOST}:{DNS_PORT} is taken ({e}); the benchmark's DNS needs it") from e
    dns = AuthoritativeDns(workdir)
    dns.host, dns.port = DNS_HOST, DNS_PORT
    records = [
        f"@ TXT {zone_txt(f'v=spf1 ip4:{client_ip} -all')}",
        f"{selector}._domainkey TXT {zone_txt(key.txt_record())}",
        f"_dmarc TXT {zone_txt('v=DMARC1; p=reject')}",
        # The bench client's HELO name (BENCH_CLIENT): its SPF check gets an answer to cache.
        f"mx TXT {zone_txt(f'v=spf1 ip4:{client_ip} -all')}",
        extra_records,
    ]
    dns.add_zone(domain, "\n".join(records))
    # RFC 9989's tree walk also asks the parent (_dmarc.example); it must get NXDOMAIN, not REFUSED.
    dns.add_zone("example", parent_records)
    dns.start()
    return dns


class DnsProxy:
    """dnsproxy.py in its own process on RESOLVER_HOST:53, forwarding to Knot on DNS_HOST:53.

    Args:
        workdir: its folder (control socket, log).
        delay_ms: the wait before each cache miss is forwarded.
    """

    def __init__(self, workdir: Path, delay_ms: float) -> None:
        self.workdir = workdir
        self.delay_ms = delay_ms
        self.control = workdir / "control.sock"
        self.log = workdir / "dnsproxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            str(Path(__file__).with_name("dnsproxy.py")),
            "--listen",
            RESOLVER_HOST,
            "--upstream",
            DNS_HOST,
            "--delay-ms",
            str(self.delay_ms),
            "--control",
            str(self.control),
        ]
        self._process = start_logged(
            command,
            self.log,
        )
        if not _wait_for(self._answers, READY_TIMEOUT):
            raise HarnessError(f"the DNS proxy did not start:\n{tail(self.log)}")

    def _answers(self) -> bool:
        try:
            self.request("stats")
        except OSError:
            return False
        return True

    def request(self, command: str) -> dict[str, int]:
        """``flush`` (empty the cache, reset the counts) or ``stats``; the counts so far."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.settimeout(READY_TIMEOUT)
            control.connect(str(self.control))
            control.sendall(command.encode() + b"\n")
            reply = control.makefile("rb").readline()
        counts: dict[str, int] = json.loads(reply)
        return counts

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, STOP_TIMEOUT)


# --- the milters ------------------------------------------------------------------------------------


class BenchAuthmilter(AuthmilterProcess):
    """``authmilter run`` (the harness's class) on a unix or TCP socket, logging warnings only.

    Args:
        workdir: a directory this process owns.
        address: where it listens.
        workers: worker processes (0: one per CPU, the shipped default).
        log_level: its ``[log] level``.
        extra: more config sections, appended (the signing run's ``[signing]``).
    """

    def __init__(
        self,
        workdir: Path,
        address: MilterAddress,
        workers: int = 0,
        log_level: str = "warning",
        extra: str = "",
    ) -> None:
        super().__init__(workdir, milter_port=address.port, dns_port=DNS_PORT, workers=workers)
        self.address = address
        self.log_level = log_level
        self.extra = extra

    def write_config(self, *, authserv_id: str = AUTHSERV_ID, extra: str = "") -> None:
        extra = extra or self.extra
        # Postfix's smtpd runs as user postfix: the group lets it connect to the unix socket.
        self.config_path.write_text(
            f"""# Written by bench/harness.py.
[milter]
socket = "{self.address.libmilter}"
socket_mode = "0660"
socket_group = "postfix"
workers = {self.workers}
shutdown_timeout = 5.0
authserv_id = "{authserv_id}"
quarantine = "hold"

[log]
destination = "stderr"
level = "{self.log_level}"

[dns]
nameservers = ["{RESOLVER_HOST}"]
port = {DNS_PORT}
{extra}""",
            encoding="utf-8",
        )

    def wait_until_serving(self, timeout: float = READY_TIMEOUT) -> None:
        wait_for_milter(self.address, lambda: self.running, self.log_path)

    @property
    def pids(self) -> list[int]:
        return [self.pid]


class ChildMilter:
    """A milter the benchmark runs as its child process, listening on ``address``.

    Args:
        address: where it listens.
        log_path: where its output goes.
    """

    stop_timeout = STOP_TIMEOUT  # seconds from SIGTERM to SIGKILL

    def __init__(self, address: MilterAddress, log_path: Path) -> None:
        self.address = address
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def _launch(self, command: list[str]) -> None:
        """Start ``command`` and wait until it answers on the address."""
        self._process = start_logged(command, self.log_path)
        wait_for_milter(self.address, lambda: self.running, self.log_path)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pids(self) -> list[int]:
        return [self._process.pid] if self._process is not None else []

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, self.stop_timeout)
        if self.address.path is not None:
            with contextlib.suppress(OSError):
                self.address.path.unlink()


class FloorMilter(ChildMilter):
    """bench/floor_milter.py: a pymilter milter that checks nothing, for ``bench/run.py --floor``.

    Args:
        workdir: its own folder (log).
        address: where it listens.
    """

    # It keeps nothing to lose, and once it has served a connection libmilter's worker pool takes
    # several seconds to let a SIGTERM end it: every set-up of every round would wait for that.
    stop_timeout = 0.0

    def __init__(self, workdir: Path, address: MilterAddress) -> None:
        super().__init__(address, workdir / "floor_milter.log")
        self.workdir = workdir

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._launch([sys.executable, str(_paths.BENCH / "floor_milter.py"), self.address.libmilter])


class DebianMilter(ChildMilter):
    """OpenDKIM or OpenDMARC from Debian's package, on a private config, pid file and socket.

    It starts as root (to read its config and bind) and drops to ``UserID``; it runs in a private
    mount namespace whose /etc/resolv.conf names the benchmark's DNS server.

    Args:
        name: "opendkim" or "opendmarc" (also the program and the user it runs as).
        workdir: its own folder (config, pid file, log, resolv.conf).
        address: where it listens.
        settings: config lines beyond Socket, PidFile, UserID, UMask, Background and Syslog.
    """

    def __init__(self, name: str, workdir: Path, address: MilterAddress, settings: str) -> None:
        super().__init__(address, workdir / f"{name}.log")
        self.name = name
        self.workdir = workdir
        self.settings = settings

    def start(self) -> None:
        program = find_program(self.name)
        pwd.getpwnam(self.name)  # KeyError: the package did not create its user
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o1777)
        config = self.workdir / f"{self.name}.conf"
        # UMask 0: the unix socket must be writable by Postfix's smtpd (user postfix).
        config.write_text(
            f"Socket {self.address.libmilter}\nPidFile {self.workdir}/{self.name}.pid\nUserID {self.name}\n"
            f"UMask 0000\nBackground false\nSyslog false\n{self.settings}",
            encoding="utf-8",
        )
        resolv = self.workdir / "resolv.conf"
        resolv.write_text(f"nameserver {RESOLVER_HOST}\noptions attempts:2 timeout:5\n", encoding="utf-8")
        config_flag = "-x" if self.name == "opendkim" else "-c"
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            str(resolv),
            program,
            config_flag,
            str(config),
            "-f",
        ]
        self._launch(command)


def opendkim(workdir: Path, address: MilterAddress) -> DebianMilter:
    """OpenDKIM verifying only; libunbound (Debian's build) forwards every query to the bench's resolver.

    libunbound keeps its own cache of answers (by their TTL) in the process, so OpenDKIM caches keys.
    """
    return DebianMilter(
        "opendkim", workdir, address, f"Mode v\nAuthservID {AUTHSERV_ID}\nNameservers {RESOLVER_HOST}\n"
    )


def opendmarc(workdir: Path, address: MilterAddress) -> DebianMilter:
    """OpenDMARC doing its own SPF (SPFSelfValidate) and reading DKIM results from OpenDKIM's A-R.

    It finds a sub-domain sender's organizational domain with the public suffix list, not with
    RFC 9989's tree walk: its list is Debian's plus ``example``, under which the bench's senders are
    registered, as real senders are under ``com`` (without it, ``mail.o2.example`` has no policy).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    suffixes = workdir / "public_suffix_list.dat"
    suffixes.write_text(
        Path(PUBLIC_SUFFIX_LIST).read_text(encoding="utf-8") + "\nexample\n", encoding="utf-8"
    )
    return DebianMilter(
        "opendmarc",
        workdir,
        address,
        f"AuthservID {AUTHSERV_ID}\nTrustedAuthservIDs {AUTHSERV_ID}\n"
        "SPFSelfValidate true\nSPFIgnoreResults true\nIgnoreAuthenticatedClients true\n"
        f"RejectFailures true\nHoldQuarantinedMessages true\nPublicSuffixList {suffixes}\n",
    )

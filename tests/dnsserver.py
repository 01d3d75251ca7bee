"""A real authoritative DNS server (Knot DNS) on loopback, serving zones the tests write.

Everything the server owns (config, zone files, databases, pid file, control socket, log) lives
under one work directory, so it runs as root in CI or as any user, and never touches /etc/knot or
the system's knot service. It listens only on 127.0.0.1, at a port picked free when built.

``make test`` installs the Debian package ``knot`` (knotd, knotc).
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from processes import stop_process

# Long enough for a loaded CI machine, short enough that a broken zone fails a run quickly.
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# A port picked free may be taken before knotd binds it; pick again a few times.
BIND_ATTEMPTS = 3
LOG_TAIL_CHARS = 4000
# prctl(2) option: the signal the kernel sends the child when its parent dies (Linux only).
PR_SET_PDEATHSIG = 1
# knotd's log line when a zone file does not parse (it keeps running, without that zone).
ZONE_LOAD_FAILED = "failed to parse zone file"


class DnsServerError(RuntimeError):
    """The server could not be started, reloaded or stopped; the message carries its log."""


class DnsServerMissing(DnsServerError):
    """knotd or knotc is not installed."""


def find_knot() -> tuple[str, str]:
    """Locate the Knot DNS binaries (Debian installs them in /usr/sbin, often not on a user's PATH).

    Returns:
        the paths of knotd and knotc.

    Raises:
        DnsServerMissing: either is missing.
    """
    search_path = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
    knotd = shutil.which("knotd") or shutil.which("knotd", path=search_path)
    knotc = shutil.which("knotc") or shutil.which("knotc", path=search_path)
    if knotd is None or knotc is None:
        raise DnsServerMissing(
            "Knot DNS (knotd, knotc) is not installed; the tests need a real authoritative DNS "
            "server. Run `make test`, which installs the Debian package `knot`."
        )
    return knotd, knotc


def free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` right now (the kernel picks it)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port


def _die_with_parent() -> None:
    """Runs in the child before exec: a killed test run must not leave knotd bound to its port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _absolute(origin: str) -> dns.name.Name:
    return dns.name.from_text(origin.lower())


class AuthoritativeDns:
    """knotd on 127.0.0.1:<free port> serving zone files; start/stop/restart, zones replaceable.

    Args:
        workdir: a directory this server owns (created if missing).

    Raises:
        DnsServerMissing: knotd or knotc is not installed.
    """

    def __init__(self, workdir: Path) -> None:
        self._knotd, self._knotc = find_knot()
        self.workdir = workdir
        self.zone_dir = workdir / "zones"
        self._run_dir = workdir / "run"
        self._db_dir = workdir / "db"
        for directory in (self.zone_dir, self._run_dir, self._db_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "knot.conf"
        self.log_path = workdir / "knotd.log"
        self._socket_path = self._run_dir / "knot.sock"
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        # origin -> SOA serial of its file; every write takes a new, higher serial so a reload
        # can be seen to have happened (the server answers the new serial).
        self._zones: dict[dns.name.Name, int] = {}
        # Zones configured without data (add_failing_zone): knotd answers SERVFAIL for them.
        self._failing: set[dns.name.Name] = set()
        self._next_serial = 1
        self._process: subprocess.Popen[bytes] | None = None
        self._has_started = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def add_zone(
        self,
        origin: str,
        records: str,
        *,
        default_ttl: int = 300,
        soa_ttl: int = 3600,
        soa_minimum: int = 300,
    ) -> Path:
        """Write (or replace) the zone file of ``origin``; call :meth:`reload` if running.

        Args:
            origin: the zone's apex, e.g. ``sender.example`` (a trailing dot is optional).
            records: zone-file lines, names relative to ``origin``; common indentation is removed.
            default_ttl: ``$TTL`` for records that give none.
            soa_ttl: TTL of the SOA and NS records added at the apex.
            soa_minimum: the SOA MINIMUM field, i.e. the negative-caching TTL (RFC 2308 §4).

        Returns:
            the zone file's path, ``<zone_dir>/<origin without the final dot>.zone``.
        """
        name = _absolute(origin)
        serial = self._next_serial
        self._next_serial += 1
        apex = name.to_text()
        header = (
            f"$ORIGIN {apex}\n"
            f"$TTL {default_ttl}\n"
            f"@ {soa_ttl} IN SOA localhost. hostmaster.{apex} {serial} 3600 600 86400 {soa_minimum}\n"
            f"@ {soa_ttl} IN NS localhost.\n"
        )
        path = self.zone_dir / f"{name.to_text(omit_final_dot=True)}.zone"
        path.write_text(header + textwrap.dedent(records).strip("\n") + "\n", encoding="utf-8")
        self._zones[name] = serial
        return path

    def add_failing_zone(self, origin: str) -> None:
        """Make every name in ``origin`` answer SERVFAIL; call :meth:`reload` if running.

        knotd answers SERVFAIL for a zone it is configured to serve but could not load, which is
        what a resolver reports when a domain's authoritative servers are broken or unreachable
        (RFC 2308 §7.1): the tests' stand-in for a DNS failure of one name while others answer.
        """
        name = _absolute(origin)
        self._zones.pop(name, None)
        self._failing.add(name)
        (self.zone_dir / f"{name.to_text(omit_final_dot=True)}.zone").unlink(missing_ok=True)

    def start(self) -> None:
        """Start knotd; return once it answers every zone's current SOA.

        Raises:
            DnsServerError: it did not answer within :data:`READY_TIMEOUT`; the message has its log.
        """
        if self.running:
            return
        # Tests were told the port; after the first start it must not change.
        attempts = 1 if self._has_started else BIND_ATTEMPTS
        for attempt in range(attempts):
            self._write_config()
            log_start = self._log_size()
            self._launch()
            try:
                self._wait_until_served(log_start)
            except DnsServerError:
                bind_failed = "address already in use" in self._log_since(log_start).lower()
                self._terminate()
                if bind_failed and attempt + 1 < attempts:
                    self.port = free_port(self.host)
                    continue
                raise
            self._has_started = True
            return

    def reload(self) -> None:
        """Make the running server pick up added and changed zones; return once it serves them.

        Raises:
            DnsServerError: the server is not running, refused the reload or did not serve the zones.
        """
        if not self.running:
            raise DnsServerError("reload: the DNS server is not running; call start()")
        self._write_config()
        log_start = self._log_size()
        self._control("reload")
        # `reload` skips a zone file whose mtime looks unchanged (it may be rewritten within the
        # same timestamp tick); zone-reload reads the files regardless.
        self._control("zone-reload")
        self._wait_until_served(log_start)

    def stop(self) -> None:
        """SIGTERM knotd and wait for it to exit (used to simulate a DNS outage)."""
        self._terminate()

    def __enter__(self) -> AuthoritativeDns:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_config(self) -> None:
        zones = "".join(f"  - domain: {name.to_text()}\n" for name in sorted({*self._zones, *self._failing}))
        # journal-content none and zonefile-sync -1: the zone files are the only truth and knotd
        # never rewrites them. Small database sizes: lmdb maps its maximum size up front.
        self.config_path.write_text(
            f"""server:
    rundir: "{self._run_dir}"
    listen: {self.host}@{self.port}
    udp-workers: 2
    tcp-workers: 2
    background-workers: 2

control:
    listen: "{self._socket_path}"

database:
    storage: "{self._db_dir}"
    journal-db-max-size: 64M
    kasp-db-max-size: 8M
    timer-db-max-size: 8M
    catalog-db-max-size: 8M

log:
  - target: stderr
    any: info

template:
  - id: default
    storage: "{self.zone_dir}"
    file: "%s.zone"
    zonefile-load: whole
    zonefile-sync: -1
    journal-content: none
"""
            + (f"\nzone:\n{zones}" if zones else ""),
            encoding="utf-8",
        )

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- knotd on {self.host}@{self.port}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [self._knotd, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def _control(self, *command: str) -> None:
        done = subprocess.run(
            [self._knotc, "--config", str(self.config_path), "--socket", str(self._socket_path), *command],
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise DnsServerError(
                f"knotc {' '.join(command)} failed: {done.stdout}{done.stderr}\n{self._log_tail()}"
            )

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, STOP_TIMEOUT)

    def _wait_until_served(self, log_start: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = dict(self._zones)
        up = False
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise DnsServerError(f"knotd exited while starting:\n{self._log_tail()}")
            if self._rejected_zone_file(log_start):
                # No point waiting out the timeout for a zone file knotd has rejected.
                raise DnsServerError(f"knotd rejected a zone file:\n{self._log_tail()}")
            if not up:
                up = self._query(dns.name.root) is not None
            for name, serial in list(pending.items()):
                if self._soa_serial(name) == serial:
                    del pending[name]
            if up and not pending and all(self._servfails(name) for name in self._failing):
                return
            time.sleep(0.05)
        waiting_for = ", ".join(n.to_text() for n in pending) or "any answer"
        raise DnsServerError(
            f"knotd on {self.host}@{self.port} did not serve {waiting_for} within {READY_TIMEOUT} s:\n"
            f"{self._log_tail()}"
        )

    def _rejected_zone_file(self, log_start: int) -> bool:
        """knotd logged a zone file it could not load, other than those of the failing zones."""
        failing = tuple(f"[{name.to_text()}]" for name in self._failing)
        return any(
            ZONE_LOAD_FAILED in line and not any(zone in line for zone in failing)
            for line in self._log_since(log_start).splitlines()
        )

    def _servfails(self, name: dns.name.Name) -> bool:
        response = self._query(name)
        return response is not None and response.rcode() == dns.rcode.SERVFAIL

    def _query(self, name: dns.name.Name) -> dns.message.Message | None:
        try:
            return dns.query.udp(
                dns.message.make_query(name, dns.rdatatype.SOA), self.host, port=self.port, timeout=0.2
            )
        except (dns.exception.DNSException, OSError):
            return None

    def _soa_serial(self, name: dns.name.Name) -> int | None:
        response = self._query(name)
        if response is None or response.rcode() != dns.rcode.NOERROR:
            return None
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.SOA and rrset.name == name and len(rrset):
                return int(rrset[0].serial)
        return None

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return text[-LOG_TAIL_CHARS:]

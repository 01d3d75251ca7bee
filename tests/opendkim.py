"""OpenDKIM (Debian's ``opendkim`` package) as the independent DKIM implementation of the interop tests.

:class:`OpenDkim` runs ``opendkim -f -x CONF`` with a private configuration on a unix socket in its
own work directory and talks to it with tests/milterclient.py, as Postfix would: mail from
127.0.0.1 is signed (OpenDKIM's default ``InternalHosts``), mail from any other client is verified
and answered with an Authentication-Results field.

OpenDKIM asks no DNS here: ``TestPublicKeys`` (opendkim.conf(5), "intended for use during automated
testing") names a file of ``NAME VALUE`` lines, the key records it would otherwise look up.
:func:`key_records` reads them out of the zone files the tests publish, with dnspython's zone
parser, so both sides see the same records without sharing our resolver.

``make test`` installs the Debian packages ``opendkim`` and ``opendkim-tools`` (service disabled).
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import authres
import dns.rdatatype
import dns.zone

from milterclient import MessageResult, MilterClient, MilterProtocolError

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
LOG_TAIL_CHARS = 4000
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
PR_SET_PDEATHSIG = 1
# Our test DNS names; OpenDKIM's authserv-id, so its A-R is told apart from ours.
AUTHSERV_ID = "opendkim.test"
OUTSIDE_CLIENT = "192.0.2.10"
INTERNAL_CLIENT = "127.0.0.1"


class OpenDkimError(RuntimeError):
    """OpenDKIM is missing, did not start, or answered unexpectedly; the message carries its log."""


@dataclass(frozen=True)
class SigningKey:
    """One OpenDKIM KeyTable entry: ``name domain:selector:path``."""

    name: str
    domain: str
    selector: str
    path: Path


@dataclass(frozen=True, order=True)
class DkimResult:
    """One ``dkim=`` clause of OpenDKIM's Authentication-Results (RFC 8601 §2.7.1)."""

    result: str
    domain: str
    selector: str
    algorithm: str


def find_opendkim() -> str:
    """The path of opendkim(8) (Debian installs it in /usr/sbin, often not on a user's PATH).

    Raises:
        OpenDkimError: it is not installed.
    """
    path = shutil.which("opendkim") or shutil.which("opendkim", path=SBIN_PATH)
    if path is None:
        raise OpenDkimError(
            "opendkim is not installed; the interoperability tests need Debian's opendkim package. "
            "Run `make test`, which installs it."
        )
    return path


def key_records(zone_files: Iterable[Path]) -> dict[str, str]:
    """Every TXT record under ``_domainkey`` in the zone files: owner name → joined value.

    The character-strings of a record are joined without spaces (RFC 6376 §3.6.2.2).
    """
    records: dict[str, str] = {}
    for path in zone_files:
        zone = dns.zone.from_file(str(path), relativize=False)
        for name, rdataset in zone.iterate_rdatasets(dns.rdatatype.TXT):
            if b"_domainkey" in name.labels:
                for rdata in rdataset:
                    records[name.to_text(omit_final_dot=True)] = b"".join(rdata.strings).decode()
    return records


def _die_with_parent() -> None:
    """Runs in the child before exec: a killed test run must not leave OpenDKIM running."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class OpenDkim:
    """One OpenDKIM milter with a private configuration, started and stopped by the tests.

    Args:
        workdir: a directory this instance owns (config, tables, socket, log).
        public_keys: key record name → record text, what verification "looks up".
        signing_keys: the KeyTable; every key signs mail from its domain (``MultipleSignatures``).
        algorithm: OpenDKIM's ``SignatureAlgorithm``; it is global, so an instance signs with RSA
            keys or with Ed25519 keys, not both.
        canonicalization: ``header/body``, e.g. ``simple/simple``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        public_keys: dict[str, str],
        signing_keys: Sequence[SigningKey] = (),
        algorithm: str = "rsa-sha256",
        canonicalization: str = "relaxed/relaxed",
    ) -> None:
        self._program = find_opendkim()
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.socket_path = workdir / "opendkim.sock"
        self.log_path = workdir / "opendkim.log"
        self.config_path = workdir / "opendkim.conf"
        self._public_keys = public_keys
        self._signing_keys = tuple(signing_keys)
        self._algorithm = algorithm
        self._canonicalization = canonicalization
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    def _write_config(self) -> None:
        keys_file = self.workdir / "TestPublicKeys"
        keys_file.write_text("".join(f"{n} {v}\n" for n, v in self._public_keys.items()), encoding="utf-8")
        lines = [
            "Mode sv",
            f"Socket local:{self.socket_path}",
            "Syslog no",
            f"AuthservID {AUTHSERV_ID}",
            f"TestPublicKeys {keys_file}",
            f"SignatureAlgorithm {self._algorithm}",
            f"Canonicalization {self._canonicalization}",
            "MultipleSignatures yes",
            # The key files sit under /tmp, which is world-writable; OpenDKIM would refuse them.
            "RequireSafeKeys no",
        ]
        if self._signing_keys:
            key_table = self.workdir / "KeyTable"
            signing_table = self.workdir / "SigningTable"
            key_table.write_text(
                "".join(f"{k.name} {k.domain}:{k.selector}:{k.path}\n" for k in self._signing_keys),
                encoding="utf-8",
            )
            signing_table.write_text(
                "".join(f"*@{k.domain} {k.name}\n" for k in self._signing_keys), encoding="utf-8"
            )
            lines += [f"KeyTable {key_table}", f"SigningTable refile:{signing_table}"]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def start(self) -> None:
        """Start OpenDKIM in the foreground; return once it answers milter option negotiation.

        Raises:
            OpenDkimError: it exited or did not answer within :data:`READY_TIMEOUT`.
        """
        self._write_config()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self._program, "-f", "-x", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise OpenDkimError(f"opendkim exited ({self._process.returncode}):\n{self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.05)
        raise OpenDkimError(f"opendkim did not answer within {READY_TIMEOUT} s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            with MilterClient.connect(self.address, timeout=2) as client:
                client.negotiate()
                client.quit()
                return True
        except (OSError, MilterProtocolError):
            return False

    def stop(self) -> None:
        """Kill OpenDKIM.

        SIGKILL, not SIGTERM: libmilter notices SIGTERM only at its listener's next poll, about 6 s
        later, and an instance keeps nothing a test needs (its socket lives in the work directory).
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)

    def __enter__(self) -> OpenDkim:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"

    def _inserted(self, message: bytes, client_ip: str, name: str) -> list[str]:
        """Send ``message`` from ``client_ip``; the values of the ``name`` fields OpenDKIM added."""
        result = self._transaction(message, client_ip)
        if result.stage != "eom" or result.response.kind not in ("accept", "continue"):
            raise OpenDkimError(f"opendkim answered {result}:\n{self.log_tail()}")
        return [
            m.value
            for m in result.modifications
            if m.kind in ("insheader", "addheader") and m.name.lower() == name.lower()
        ]

    def _transaction(self, message: bytes, client_ip: str) -> MessageResult:
        with MilterClient.connect(self.address) as client:
            client.negotiate()
            client.connect_info("client.example", client_ip, 25, socket.AF_INET, {"j": "mx.example"})
            client.helo("client.example")
            result = client.send_message(message, "bob@sender.example", ["alice@receiver.example"])
            client.quit()
            return result

    def verify(self, message: bytes) -> list[DkimResult]:
        """OpenDKIM's verdict on every signature of ``message``, from its Authentication-Results.

        Raises:
            OpenDkimError: it added no Authentication-Results field (it does for every signed message).
        """
        values = self._inserted(message, OUTSIDE_CLIENT, "Authentication-Results")
        if len(values) != 1:
            raise OpenDkimError(f"expected one Authentication-Results from opendkim, got {values}")
        parsed = authres.AuthenticationResultsHeader.parse_value(values[0].replace("\n", "\r\n"))
        if str(parsed.authserv_id) != AUTHSERV_ID:
            raise OpenDkimError(f"not opendkim's Authentication-Results: {values[0]!r}")
        results = []
        for clause in parsed.results:
            if clause.method != "dkim":
                continue
            props = {f"{p.type}.{p.name}": str(p.value) for p in clause.properties}
            results.append(
                DkimResult(
                    clause.result,
                    props.get("header.d", ""),
                    props.get("header.s", ""),
                    props.get("header.a", ""),
                )
            )
        return results

    def sign(self, message: bytes) -> bytes:
        """``message`` with the DKIM-Signature fields OpenDKIM adds for an internal client, on top.

        The field is written as an MTA writes an inserted header (``Name: value``, LF → CRLF).

        Raises:
            OpenDkimError: it added no signature (its log says why).
        """
        values = self._inserted(message, INTERNAL_CLIENT, "DKIM-Signature")
        if not values:
            raise OpenDkimError(f"opendkim added no DKIM-Signature:\n{self.log_tail()}")
        fields = b"".join(
            b"DKIM-Signature: " + value.lstrip(" ").replace("\n", "\r\n").encode() + b"\r\n"
            for value in values
        )
        return fields + message

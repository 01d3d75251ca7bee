"""The signing run of the benchmark (issue 4): authmilter and OpenDKIM signing the same outbound load.

Used by ``bench/run.py --signing``; the servers, the load and the measurement are run.py's. Here:

- :func:`make_keys`: an RSA-2048 and an Ed25519 key from authmilter's ``keys.generate_key`` (what
  ``authmilter genkey`` writes), their DNS records, and two OpenDKIM-format table pairs that both
  milters read as they are: RSA only (authmilter and OpenDKIM), RSA + Ed25519 (authmilter with
  ``multiple_signatures``). OpenDKIM's ``SignatureAlgorithm`` is global, so one instance signs with
  one algorithm: the comparison is RSA against RSA.
- :func:`signing_setups`: the three set-ups over unix sockets.
- :func:`signature_check`: counts the DKIM-Signature fields of delivered messages and verifies every
  signature of one of them with dkimpy, its ``dnsfunc`` answering from the key records.
"""

from __future__ import annotations

import functools
import os
import pwd
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim
from harness import BenchAuthmilter, DebianMilter, MilterAddress, SinkProcess

from authmilter.dkim_sign import DEFAULT_HEADERS, DEFAULT_OVERSIGN_HEADERS
from authmilter.keys import dns_record, generate_key
from dnsserver import free_port
from signing import zone_txt

RSA_SELECTOR = "rsa"
ED25519_SELECTOR = "ed"
SAMPLE_MESSAGES = 50


@dataclass(frozen=True)
class SigningKeys:
    """The keys' record names → TXT values, and the table files (OpenDKIM's formats)."""

    records: dict[str, str]
    rsa_key_table: Path
    rsa_signing_table: Path
    dual_key_table: Path
    dual_signing_table: Path
    internal_hosts: Path

    def zone_lines(self, domain: str) -> str:
        """The key records as zone-file lines relative to ``domain``."""
        suffix = f".{domain}"
        return "\n".join(
            f"{name.removesuffix(suffix)} TXT {zone_txt(value)}" for name, value in self.records.items()
        )


def make_keys(folder: Path, domain: str) -> SigningKeys:
    """Generate both keys into ``folder`` and write the tables next to them.

    The key files are mode 0600 and owned by user opendkim: OpenDKIM reads them after dropping to
    that user; authmilter runs as root here (its check is on the mode only).

    Args:
        folder: a new folder for the keys and tables.
        domain: the signing domain (d=) and the SigningTable's ``*@domain``.

    Returns:
        the records to publish and the table paths.
    """
    folder.mkdir(mode=0o755)
    opendkim = pwd.getpwnam("opendkim")
    records, key_lines = {}, {}
    for selector, kind in ((RSA_SELECTOR, "rsa"), (ED25519_SELECTOR, "ed25519")):
        pem, key = generate_key(kind, 2048)
        path = folder / f"{selector}.private"
        path.write_bytes(pem)
        path.chmod(0o600)
        os.chown(path, opendkim.pw_uid, opendkim.pw_gid)
        records[f"{selector}._domainkey.{domain}"] = dns_record(key)
        key_lines[selector] = f"{selector} {domain}:{selector}:{path}\n"
    tables = {}
    for name, selectors in (("rsa", (RSA_SELECTOR,)), ("dual", (RSA_SELECTOR, ED25519_SELECTOR))):
        key_table, signing_table = folder / f"KeyTable-{name}", folder / f"SigningTable-{name}"
        key_table.write_text("".join(key_lines[s] for s in selectors), encoding="utf-8")
        signing_table.write_text("".join(f"*@{domain} {s}\n" for s in selectors), encoding="utf-8")
        tables[name] = (key_table, signing_table)
    internal_hosts = folder / "InternalHosts"
    internal_hosts.write_text("127.0.0.1\n::1\n", encoding="utf-8")
    return SigningKeys(records, *tables["rsa"], *tables["dual"], internal_hosts)


def _authmilter_signing(key_table: Path, signing_table: Path, multiple: bool) -> str:
    # [milter] internal_hosts stays the default (127.0.0.1 and ::1), the client the load claims.
    return (
        f'\n[signing]\nkey_table = "{key_table}"\nsigning_table = "refile:{signing_table}"\n'
        f"multiple_signatures = {'true' if multiple else 'false'}\n"
    )


def opendkim_signer(workdir: Path, address: MilterAddress, keys: SigningKeys) -> DebianMilter:
    """OpenDKIM signing only, with the RSA tables; it signs and oversigns the fields authmilter does.

    SignHeaders must be set: OpenDKIM's default list lacks Message-ID, and a field it oversigns
    without signing it goes into h= while its value is left out of the hash (a broken signature).
    """
    return DebianMilter(
        "opendkim",
        workdir,
        address,
        f"Mode s\nKeyTable {keys.rsa_key_table}\nSigningTable refile:{keys.rsa_signing_table}\n"
        f"InternalHosts {keys.internal_hosts}\nSignatureAlgorithm rsa-sha256\n"
        "Canonicalization relaxed/relaxed\n"
        f"SignHeaders {','.join(DEFAULT_HEADERS)}\nOversignHeaders {','.join(DEFAULT_OVERSIGN_HEADERS)}\n"
        # The keys sit under /tmp or /dev/shm, world-writable: OpenDKIM would call them unsafe.
        "RequireSafeKeys no\n",
    )


Setup = tuple[
    str, str, int, Callable[[], Sequence[BenchAuthmilter | DebianMilter]], Callable[[SinkProcess], str]
]


def signing_setups(
    milter_ports: dict[int, str],
    sockets: Path,
    workdir: Path,
    keys: SigningKeys,
    workers: int,
    log_level: str,
) -> list[Setup]:
    """authmilter RSA, OpenDKIM RSA, authmilter RSA + Ed25519, each on its own smtpd port, unix sockets.

    Args:
        milter_ports: Postfix's smtpd port → smtpd_milters map, filled in here.
        sockets: the folder of the milter sockets.
        workdir: the run's work directory (each milter gets a folder in it).
        keys: from :func:`make_keys`.
        workers: authmilter's workers (0: one per CPU).
        log_level: authmilter's log level.

    Returns:
        (set-up, transport, smtpd port, milters factory, delivered-message check) per set-up.
    """
    setups: list[Setup] = []
    plans: list[tuple[str, Callable[[MilterAddress], BenchAuthmilter | DebianMilter], tuple[str, ...]]] = [
        (
            "authmilter sign RSA",
            lambda a: BenchAuthmilter(
                workdir / "authmilter-rsa",
                a,
                workers,
                log_level,
                _authmilter_signing(keys.rsa_key_table, keys.rsa_signing_table, multiple=False),
            ),
            ("rsa-sha256",),
        ),
        ("opendkim sign RSA", lambda a: opendkim_signer(workdir / "opendkim-sign", a, keys), ("rsa-sha256",)),
        (
            "authmilter sign RSA+Ed25519",
            lambda a: BenchAuthmilter(
                workdir / "authmilter-dual",
                a,
                workers,
                log_level,
                _authmilter_signing(keys.dual_key_table, keys.dual_signing_table, multiple=True),
            ),
            ("ed25519-sha256", "rsa-sha256"),
        ),
    ]
    for number, (setup, milter, algorithms) in enumerate(plans):
        address = MilterAddress(path=sockets / f"signer-{number}.sock")
        port = free_port("127.0.0.1")
        milter_ports[port] = address.postfix
        setups.append(
            (
                setup,
                "unix",
                port,
                functools.partial(_started_at, milter, address),
                functools.partial(_check_sample, algorithms, keys.records),
            )
        )
    return setups


def _started_at(
    milter: Callable[[MilterAddress], BenchAuthmilter | DebianMilter], address: MilterAddress
) -> list[BenchAuthmilter | DebianMilter]:
    return [milter(address)]


def _check_sample(expected: tuple[str, ...], records: dict[str, str], sink: SinkProcess) -> str:
    return signature_check(sink.sample(SAMPLE_MESSAGES), expected, records)


def _header_block(message: bytes) -> list[bytes]:
    """The header fields, each unfolded onto one line."""
    header = message.replace(b"\r\n", b"\n").partition(b"\n\n")[0]
    return header.replace(b"\n\t", b" ").replace(b"\n ", b" ").split(b"\n")


def _algorithm(field: bytes) -> str:
    for tag in field.partition(b":")[2].split(b";"):
        name, _, value = tag.partition(b"=")
        if name.strip() == b"a":
            return value.strip().decode(errors="replace")
    return "none"


def signature_check(messages: Sequence[bytes], expected: tuple[str, ...], records: dict[str, str]) -> str:
    """Whether every sampled message carries exactly the expected signatures, and dkimpy verifies one.

    Args:
        messages: delivered messages (from the sink).
        expected: the a= values each must carry, sorted.
        records: key record name → TXT value, what dkimpy's DNS lookups get.

    Returns:
        a line for the report, starting with "OK" or "WRONG".
    """
    if not messages:
        return "WRONG: no message delivered"
    right = sum(
        1
        for message in messages
        if tuple(
            sorted(_algorithm(f) for f in _header_block(message) if f.lower().startswith(b"dkim-signature:"))
        )
        == expected
    )

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode().rstrip("."), "").encode()

    verifier = dkim.DKIM(messages[0])
    verified = sum(1 for index in range(len(expected)) if verifier.verify(idx=index, dnsfunc=dnsfunc))
    verdict = "OK" if right == len(messages) and verified == len(expected) else "WRONG"
    return (
        f"{verdict}: {right}/{len(messages)} sampled carry exactly {'+'.join(expected)}; "
        f"dkimpy verified {verified}/{len(expected)} signatures of one"
    )

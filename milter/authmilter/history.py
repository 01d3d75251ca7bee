"""The history file: one JSON line per DMARC-evaluated message, for aggregate reports later.

Each line holds everything a row of an RFC 9990 aggregate report needs (``record`` → ``row``,
``identifiers``, ``auth_results``, and the ``policy_published`` it was evaluated against), so the
report builder needs nothing but this file. The schema is versioned (``"v": 1``) and documented
in docs/history-schema.md.

Decisions:

- Records are bounded: lists are cut at a fixed length (the count of what was left out is kept)
  and every string at a fixed size, so a hostile message cannot make a line grow without limit.
- Writing: the file is opened with O_APPEND, and each record is one ``os.write`` of the whole
  line under an exclusive ``flock``. ``flock`` excludes the other worker processes; a
  ``threading.Lock`` excludes the other threads of one process (they share the open file, and
  ``flock`` does not exclude holders of the same open file). The lock also makes a short write
  safe to finish: nobody else writes in between.
- A writer inherited through ``fork`` would share its open file (and so its lock) with the
  parent; each process therefore opens its own on its first append.
- Rotation: before every append the path is ``stat``-ed and compared with the open file; when
  the file was moved or removed (logrotate without ``copytruncate``) a new one is created. One
  ``stat`` costs about a microsecond, cheaper than getting a once-a-second timer right across
  forks. ``reopen()`` (SIGHUP) closes the file at once unless an append is under way.
- Failures are the caller's to log: :class:`HistoryError` (an ``OSError``) names the file and
  the reason. Losing a history line must never fail the message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from authmilter.domains import address_domain
from authmilter.model import (
    NOT_ENFORCED_NOTE,
    Action,
    AuthResult,
    Disposition,
    DkimResult,
    DmarcRecord,
    DmarcVerdict,
    SpfResult,
    Verdict,
)

log = logging.getLogger(__name__)

# Version of the record schema (docs/history-schema.md). Bump on any change that is not a pure
# addition of keys; read_history() yields only versions it knows.
HISTORY_VERSION = 1
KNOWN_VERSIONS = frozenset({HISTORY_VERSION})

# Bounds that keep one record small (a few KB at most) whatever the message holds.
MAX_DKIM_RESULTS = 20
MAX_FROM_DOMAINS = 10
MAX_RECIPIENT_DOMAINS = 50
MAX_REPORT_URIS = 10
# RFC 1035 §2.3.4: a domain name is at most 253 characters as text.
MAX_DOMAIN = 253
# RFC 5321 §4.5.3.1.3: a path is at most 256 octets.
MAX_IDENTITY = 256
MAX_TEXT = 256

# New files: owner read-write, group read (the report builder may run in the group).
FILE_MODE = 0o640


@dataclass(frozen=True)
class HistorySettings:
    """Section ``[history]`` (to be composed into config.py).

    Attributes:
        path: the history file; empty = no history is written.
    """

    path: str = ""


@dataclass(frozen=True)
class Envelope:
    """The SMTP transaction of the message a record is about.

    Attributes:
        client_ip: the SMTP client's address ("" when unknown).
        mail_from: the MAIL FROM address, with or without angle brackets ("" or "<>" = null sender).
        recipients: the RCPT TO addresses.
        helo: the HELO/EHLO name.
        queue_id: the MTA's queue id (macro ``i``), to find the message in the logs.
    """

    client_ip: str
    mail_from: str
    recipients: tuple[str, ...]
    helo: str
    queue_id: str


class HistoryError(OSError):
    """The history file cannot be opened or written; ``str()`` names the file and the reason."""


# ---------------------------------------------------------------------------------------------
# The record


def make_record(
    verdict: Verdict,
    envelope: Envelope,
    reporting_host: str,
    now: float,
    org_domain_mode: str,
) -> dict[str, Any]:
    """Build the history record of one message (schema: docs/history-schema.md).

    Args:
        verdict: what the pipeline decided (its ``dmarc`` should not be None: only
            DMARC-evaluated messages belong in the history; without it the DMARC keys are null).
        envelope: the SMTP transaction.
        reporting_host: our authserv-id (the host that evaluated the message).
        now: the time of evaluation, seconds since the epoch.
        org_domain_mode: ``"treewalk"`` or ``"psl"``, RFC 9990's ``discovery_method``.

    Returns:
        A JSON-serialisable dict, bounded in size.
    """
    dmarc = verdict.dmarc
    domains = _unique_domains(envelope.recipients)
    from_domains = dmarc.from_domains if dmarc else ()
    return {
        "v": HISTORY_VERSION,
        "time": int(now),
        "reporting_host": _clip(reporting_host, MAX_DOMAIN),
        "queue_id": _clip(envelope.queue_id, MAX_TEXT),
        "source_ip": _normalize_ip(envelope.client_ip),
        "helo": _clip(envelope.helo, MAX_DOMAIN),
        "header_from": _clip(dmarc.from_domain, MAX_DOMAIN) if dmarc else "",
        "from_domains": [_clip(d, MAX_DOMAIN) for d in from_domains[:MAX_FROM_DOMAINS]],
        "envelope_from": _clip(address_domain(envelope.mail_from), MAX_DOMAIN),
        "envelope_to": domains[:MAX_RECIPIENT_DOMAINS],
        "envelope_to_omitted": max(0, len(domains) - MAX_RECIPIENT_DOMAINS),
        "dmarc": _dmarc_part(dmarc),
        "policy_published": _published(dmarc, org_domain_mode),
        "policy_evaluated": _evaluated(verdict),
        "action": verdict.action.value,
        "auth_results": _auth_results(verdict),
    }


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def _normalize_ip(text: str) -> str:
    """RFC 9990 ``source_ip``: an IPv4 or IPv6 address in its usual text form; "" when unknown."""
    candidate = text.strip()
    if candidate[:5].lower() == "ipv6:":  # the RFC 5321 §4.1.3 address literal tag
        candidate = candidate[5:]
    try:
        address = ipaddress.ip_address(candidate.strip("[]"))
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _unique_domains(recipients: tuple[str, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for recipient in recipients:
        domain = _clip(address_domain(recipient), MAX_DOMAIN)
        if domain:
            seen.setdefault(domain, None)
    return list(seen)


def _dmarc_part(dmarc: DmarcVerdict | None) -> dict[str, Any] | None:
    if dmarc is None:
        return None
    return {
        "result": dmarc.result.value,
        "policy": dmarc.policy.value if dmarc.policy else None,
        "disposition": dmarc.disposition.value,
        "org_domain": _clip(dmarc.org_domain, MAX_DOMAIN),
        "spf_aligned": dmarc.spf_aligned,
        "dkim_aligned": dmarc.dkim_aligned,
        "reason": _clip(dmarc.reason, MAX_TEXT),
    }


def _published(dmarc: DmarcVerdict | None, org_domain_mode: str) -> dict[str, Any] | None:
    """RFC 9990 ``policy_published``: the record's tags as published (null when absent)."""
    if dmarc is None or dmarc.record is None:
        return None
    record: DmarcRecord = dmarc.record
    return {
        "domain": _clip(dmarc.policy_domain, MAX_DOMAIN),
        "p": record.policy.value if record.policy else None,
        "sp": record.subdomain_policy.value if record.subdomain_policy else None,
        "np": record.nonexistent_policy.value if record.nonexistent_policy else None,
        "adkim": "s" if record.adkim_strict else "r",
        "aspf": "s" if record.aspf_strict else "r",
        "testing": "y" if record.testing else "n",
        "psd": record.psd,
        "fo": _clip(record.failure_options, MAX_TEXT),
        "discovery_method": org_domain_mode,
        "rua": [_clip(uri, MAX_IDENTITY) for uri in record.rua[:MAX_REPORT_URIS]],
    }


# RFC 9990 ActionDispositionType: what was done with the message.
_APPLIED = {Action.REJECT: "reject", Action.QUARANTINE: "quarantine"}


def _evaluated(verdict: Verdict) -> dict[str, Any]:
    """RFC 9990 ``policy_evaluated``: the disposition applied, the aligned results and why the
    disposition differs from what the published policy asks (``reason`` elements)."""
    dmarc = verdict.dmarc
    applied = _applied_disposition(verdict)
    return {
        "disposition": applied,
        "dkim": "pass" if dmarc is not None and dmarc.dkim_aligned else "fail",
        "spf": "pass" if dmarc is not None and dmarc.spf_aligned else "fail",
        "reasons": _override_reasons(verdict, applied),
    }


def _applied_disposition(verdict: Verdict) -> str:
    """ "reject"/"quarantine" when we did that; "pass" for a DMARC pass under an enforcing policy
    (RFC 9990: "No action, passing DMARC w/enforcing policy"); else "none". A tempfailed message
    was not accepted and gets "none": the report builder skips it (its retry is recorded)."""
    if verdict.action in _APPLIED:
        return _APPLIED[verdict.action]
    dmarc = verdict.dmarc
    if (
        verdict.action is Action.ACCEPT
        and dmarc is not None
        and dmarc.result is AuthResult.PASS
        and dmarc.policy is not None
        and dmarc.policy is not Disposition.NONE
    ):
        return "pass"
    return "none"


def _override_reasons(verdict: Verdict, applied: str) -> list[dict[str, str]]:
    """RFC 9990 PolicyOverrideReason list: set whenever the disposition applied is not the one
    the published policy asks for."""
    dmarc = verdict.dmarc
    failed = dmarc is not None and dmarc.result is AuthResult.FAIL
    reasons = _test_mode_reasons(dmarc) if failed else []
    if verdict.action is Action.TEMPFAIL:
        return reasons
    requested = dmarc.disposition.value if dmarc is not None and failed else "none"
    if applied not in (requested, "pass"):
        # never_reject_domains/never_reject_networks, [policy] enforce = false, or a local
        # reject/quarantine not asked for by DMARC (spf_fail, from_error, from_multiple_domains,
        # dmarc_temperror).
        if verdict.arc is not None and verdict.arc.override:
            # RFC 9990 PolicyOverrideType trusted_forwarder: a trusted ARC sealer vouched for it.
            comment = f"arc=pass sealed by {verdict.arc.override}"
            reasons.append({"type": "trusted_forwarder", "comment": _clip(comment, MAX_TEXT)})
            return reasons
        comment = verdict.reason or f"DMARC policy {NOT_ENFORCED_NOTE}"
        reasons.append({"type": "local_policy", "comment": _clip(comment, MAX_TEXT)})
    return reasons


def _test_mode_reasons(dmarc: DmarcVerdict | None) -> list[dict[str, str]]:
    """RFC 9989 §4.7 ``t=y`` lowered the policy one level (reject → quarantine → none)."""
    if dmarc is None or dmarc.record is None or not dmarc.record.testing or dmarc.policy is None:
        return []
    if dmarc.policy is dmarc.disposition:
        return []
    comment = f"t=y: {dmarc.policy.value} applied as {dmarc.disposition.value}"
    return [{"type": "policy_test_mode", "comment": comment}]


def _auth_results(verdict: Verdict) -> dict[str, Any]:
    """RFC 9990 ``auth_results``: SPF and DKIM uninterpreted with respect to DMARC."""
    return {
        "spf": _spf_part(verdict.spf),
        "spf_helo": _spf_part(verdict.helo),
        "dkim": [_dkim_part(d) for d in verdict.dkim[:MAX_DKIM_RESULTS]],
        "dkim_omitted": max(0, len(verdict.dkim) - MAX_DKIM_RESULTS),
    }


def _spf_part(spf: SpfResult | None) -> dict[str, Any] | None:
    if spf is None:
        return None
    return {
        "domain": _clip(spf.domain, MAX_DOMAIN),
        "scope": spf.scope.value,
        "result": spf.result.value,
        "human_result": _clip(spf.explanation, MAX_TEXT),
    }


def _dkim_part(dkim: DkimResult) -> dict[str, Any]:
    return {
        "domain": _clip(dkim.domain, MAX_DOMAIN),
        "selector": _clip(dkim.selector, MAX_DOMAIN),
        "result": dkim.result.value,
        "human_result": _clip(dkim.reason, MAX_TEXT),
    }


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One history line.

    Args:
        record: a JSON-serialisable mapping.

    Returns:
        Compact JSON, ASCII only (so no raw line break can occur inside), ending in LF.

    Raises:
        ValueError, TypeError: the record is not serialisable (NaN and infinities are refused).
    """
    return (json.dumps(record, ensure_ascii=True, separators=(",", ":"), allow_nan=False) + "\n").encode(
        "ascii"
    )


# ---------------------------------------------------------------------------------------------
# Writing


class HistoryWriter:
    """Appends records to the history file; safe across threads and forked worker processes."""

    def __init__(self, path: str, *, open_now: bool = True) -> None:
        """Open (create) the file now, so a bad path shows at start-up.

        Args:
            path: the history file.
            open_now: False: open it at the first append instead (each append that cannot open
                it raises HistoryError).

        Raises:
            HistoryError: the file cannot be opened or created.
        """
        self._path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        if open_now:
            self._fd = self._open()

    @property
    def path(self) -> str:
        """The history file's path, as configured."""
        return self._path

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as one line; never split, never interleaved with another writer's.

        Args:
            record: a JSON-serialisable mapping (see :func:`make_record`).

        Raises:
            HistoryError: the file cannot be (re)opened or written; the caller logs it and carries on.
            ValueError, TypeError: the record is not serialisable as JSON.
        """
        line = encode_record(record)
        with self._lock:
            fd = self._current_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._write_all(fd, line)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def reopen(self) -> None:
        """Let go of the open file (SIGHUP); the next append opens the path anew.

        Safe to call from a signal handler: when an append is under way the file is closed by
        the next append instead.
        """
        if self._lock.acquire(blocking=False):
            try:
                self._close_fd()
            finally:
                self._lock.release()
        else:
            self._pid = 0  # the next append sees a "foreign" descriptor and reopens

    def close(self) -> None:
        """Close the file; a later append opens it again."""
        with self._lock:
            self._close_fd()

    def _current_fd(self) -> int:
        """The open file of this process for the current file at the path, (re)opened if needed."""
        if self._fd is not None and self._pid != os.getpid():
            # Inherited through fork (or reopen requested): sharing the parent's open file would
            # share its flock too. Close our copy only; the parent's stays open.
            self._close_fd()
        if self._fd is not None and self._moved(self._fd):
            self._close_fd()
        if self._fd is None:
            self._fd = self._open()
        return self._fd

    def _moved(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self._path)
        except FileNotFoundError:
            return True
        except OSError as e:
            raise HistoryError(e.errno, f"history file {self._path}: cannot stat: {e.strerror}") from e
        held = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) != (held.st_dev, held.st_ino)

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(self._path, flags, FILE_MODE)
        except OSError as e:
            raise HistoryError(e.errno, f"history file {self._path}: cannot open: {e.strerror}") from e
        self._pid = os.getpid()
        return fd

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _write_all(self, fd: int, line: bytes) -> None:
        written = 0
        try:
            while written < len(line):
                count = os.write(fd, line[written:])
                if count == 0:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                written += count
        except OSError as e:
            if written:
                # End the partial line so the next record starts on a line of its own.
                with contextlib.suppress(OSError):
                    os.write(fd, b"\n")
            raise HistoryError(e.errno, f"history file {self._path}: cannot append: {e.strerror}") from e


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class ReadStats:
    """What :func:`read_history` saw: records yielded and lines skipped."""

    records: int = 0
    corrupt: int = 0
    unknown_version: int = 0


def read_history(path: str, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Yield the records of a history file, skipping lines that are not records.

    A line that is not UTF-8 JSON of an object with an integer ``v`` counts as corrupt (a crash
    mid-write, a full disk); a record of a version this code does not know counts apart. Empty
    lines are ignored. When anything was skipped, one warning is logged at the end.

    Args:
        path: the history file.
        stats: filled in while reading, if given.

    Returns:
        An iterator of records (dicts), in file order.

    Raises:
        OSError: the file cannot be opened or read.
    """
    counts = stats if stats is not None else ReadStats()
    with open(path, "rb") as source:
        for line in source:
            if not line.strip():
                continue
            record = parse_line(line)
            if record is None:
                counts.corrupt += 1
            elif record["v"] not in KNOWN_VERSIONS:
                counts.unknown_version += 1
            else:
                counts.records += 1
                yield record
    if counts.corrupt or counts.unknown_version:
        log.warning(
            "history file %s: skipped %d corrupt line(s) and %d record(s) of unknown version",
            path,
            counts.corrupt,
            counts.unknown_version,
        )


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One history line as a record (a dict with an integer ``v``), or None when it is not one.

    orjson, not json: parsing is most of a report import's time, and orjson takes less than half
    of json's. It also refuses invalid UTF-8 and NaN, which are corrupt lines here anyway.
    """
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or type(record.get("v")) is not int:
        return None
    return record

"""History files → the report store, idempotently (``authmilter report import``).

Decisions:

- A file is known by its identity, the digest of its first line, not by its name or inode: a
  record holds the evaluation time, the queue id and the reporting host, so two files starting
  with the same line are copies of one history. The live file, its rotated name
  (``history.jsonl.1``) and a compressed copy (``history.jsonl.2.gz``) are therefore one file,
  and a file that grew keeps its identity. gzip is recognised by its magic bytes, whatever the name.
- Per identity the store keeps how many bytes of the (decompressed) content were imported; an
  import reads on from there. Counts and offset are committed together every
  :data:`BATCH_LINES` lines, so an interrupted import resumes where its last commit ended and
  never counts a line twice. When another import of the same file committed first, this one
  stops reading that file (the store refuses the stale offset).
- Only complete lines count: a last line without its LF (a record being written) is left for
  the next import. A line longer than :data:`MAX_LINE` is corrupt and skipped.
- Skipped, counted and reported, never fatal: corrupt lines and records of unknown versions
  (as ``read_history`` does), records without a DMARC record (``policy_published`` null),
  ``action: "tempfail"`` records (the message was not accepted; its retry is recorded,
  docs/history-schema.md), and records of suppressed domains. A file that vanished before it
  could be opened is reported; an unreadable or broken file is reported and the others are
  imported all the same.
- Memory is bounded by the distinct (period, row key) pairs of one batch, not by the file size.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from authmilter.history import KNOWN_VERSIONS, parse_line
from authmilter.reports import is_within, normalise_domain, period_start
from authmilter.reports.aggregate import (
    RecordProblem,
    encode_policy,
    encode_row,
    policy_published,
    policy_values,
    row_digest,
    row_values,
)
from authmilter.reports.store import Batch, Store, StoredKey

log = logging.getLogger(__name__)

# Lines per transaction: large enough that a row key recurs in few batches (each batch upserts
# it once), small enough to bound memory by the distinct rows of one batch.
BATCH_LINES = 200_000
# A history record stays below a few KB (docs/history-schema.md); anything far longer is garbage.
MAX_LINE = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
# Distinct row keys and policies remembered as encoded, per cache.
MAX_CACHED = 100_000


@dataclass
class FileOutcome:
    """What happened to one history file: records imported, and a problem (a failure) or a note."""

    path: str
    imported: int = 0
    problem: str = ""
    note: str = ""


@dataclass
class LineCounts:
    """Lines counted in, and skipped by kind."""

    records: int = 0
    corrupt: int = 0
    unknown_version: int = 0
    no_policy: int = 0
    tempfail: int = 0
    suppressed: int = 0
    expired: int = 0

    def add(self, other: LineCounts) -> None:
        for name in LineCounts.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ImportReport(LineCounts):
    """What an import did, per file and in total (printed by ``authmilter report import``).

    The counts are those of committed batches: a batch that was not written is not counted.
    """

    files: list[FileOutcome] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """A file could not be read (a vanished one does not count: rotation removes files)."""
        return any(f.problem for f in self.files)

    def summary(self) -> str:
        """One line per file with a problem, then the totals."""
        lines = [f"{f.path}: {f.problem or f.note}" for f in self.files if f.problem or f.note]
        lines += [f"{path}: not found (rotated away, or not written yet)" for path in self.vanished]
        lines.append(
            f"imported {self.records} record(s) from {len(self.files)} file(s); skipped "
            f"{self.corrupt} corrupt line(s), {self.unknown_version} record(s) of unknown version, "
            f"{self.tempfail} tempfail, {self.no_policy} without DMARC record, "
            f"{self.suppressed} of suppressed domains"
            + (f", {self.expired} of periods older than [reports] keep_days" if self.expired else "")
        )
        return "\n".join(lines)


def history_files(path: str) -> list[str]:
    """The history file and its rotated siblings (``PATH.1``, ``PATH.2.gz``, ``PATH-20261206``…),
    oldest first, the live file last."""
    siblings = [p for p in glob.glob(glob.escape(path) + "[.-]*") if os.path.isfile(p)]
    siblings.sort(key=_mtime)
    return [*siblings, path]


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def import_files(
    store: Store,
    paths: Iterable[str],
    *,
    period: int,
    suppress_domains: Iterable[str] = (),
    batch_lines: int = BATCH_LINES,
    ended_before: int = 0,
) -> ImportReport:
    """Import history files into the store; what was imported before is not counted again.

    Args:
        store: the open report store.
        paths: history files, plain or gzip.
        period: the reporting period in seconds (``[reports] period``).
        suppress_domains: policy domains (and subdomains) whose records are skipped.
        batch_lines: lines per transaction.
        ended_before: records of periods that ended before this time (seconds since the epoch)
            are skipped: the store has pruned such periods (:meth:`Store.prune`, ``[reports]
            keep_days``), and importing them again would bring them back and send their reports
            late. 0 skips none.

    Returns:
        What was imported and skipped, per file.

    Raises:
        StoreError: the database failed; the batches committed before stay, consistent.
    """
    report = ImportReport()
    reader = _RecordReader(period, tuple(normalise_domain(d) for d in suppress_domains), ended_before)
    for path in paths:
        try:
            source = open(path, "rb")  # noqa: SIM115 (closed below, also on errors)
        except FileNotFoundError:
            report.vanished.append(path)
            continue
        except OSError as e:
            report.files.append(FileOutcome(path, problem=f"cannot open: {e.strerror}"))
            continue
        outcome = FileOutcome(path)
        report.files.append(outcome)
        with source:
            try:
                _import_file(store, source, outcome, reader, batch_lines, report)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                outcome.problem = f"cannot read (after {outcome.imported} record(s) imported): {e}"
    if report.corrupt or report.unknown_version:
        log.warning(
            "history import: skipped %d corrupt line(s) and %d record(s) of unknown version",
            report.corrupt,
            report.unknown_version,
        )
    return report


def file_identity(first_line: bytes) -> str:
    """The identity of a history file: the digest of its first complete line."""
    return hashlib.blake2b(first_line, digest_size=16).hexdigest()


def _import_file(
    store: Store,
    source: io.BufferedIOBase,
    outcome: FileOutcome,
    reader: _RecordReader,
    batch_lines: int,
    report: ImportReport,
) -> None:
    stream: io.BufferedIOBase = source
    if source.read(2) == GZIP_MAGIC:
        stream = gzip.GzipFile(fileobj=source)
    source.seek(0)
    first = stream.readline(MAX_LINE)
    if not first.endswith(b"\n"):
        return  # empty, or its first record still being written: nothing to import yet
    identity = file_identity(first)
    start = store.imported_bytes(identity)
    stream.seek(start)  # gzip: decompresses and drops what was imported before
    offset = start
    batch, counts, lines = Batch(), LineCounts(), 0
    for length, line in _complete_lines(stream):
        offset += length
        lines += 1
        reader.add(line, batch, counts)
        if lines >= batch_lines:
            if not _commit(store, identity, start, offset, batch, counts, outcome, report):
                return
            start, batch, counts, lines = offset, Batch(), LineCounts(), 0
    if offset != start:
        _commit(store, identity, start, offset, batch, counts, outcome, report)


def _commit(
    store: Store,
    identity: str,
    start: int,
    end: int,
    batch: Batch,
    counts: LineCounts,
    outcome: FileOutcome,
    report: ImportReport,
) -> bool:
    """Write a batch; False when another import of the file got there first."""
    if not store.import_batch(identity, outcome.path, start, end, batch):
        outcome.note = "imported meanwhile by another run; the rest is left to the next import"
        return False
    report.add(counts)
    outcome.imported += counts.records
    return True


def _complete_lines(stream: io.BufferedIOBase) -> Iterator[tuple[int, bytes | None]]:
    """(length, line) of each line ending with LF; line None for one longer than MAX_LINE.

    A last line without LF is not yielded (a record being written: the next import reads it).
    """
    while True:
        line = stream.readline(MAX_LINE)
        if line.endswith(b"\n"):
            yield len(line), line
            continue
        if len(line) < MAX_LINE:
            return
        length = len(line)
        while True:  # read through the over-long line without keeping it
            rest = stream.readline(MAX_LINE)
            length += len(rest)
            if rest.endswith(b"\n"):
                break
            if len(rest) < MAX_LINE:
                return
        yield length, None


class _RecordReader:
    """Turns lines into counts in a batch, counting what it skips in the report.

    Row keys and policies repeat across messages: each distinct one (as a tuple of the values
    read, aggregate.row_values / policy_values) is checked and encoded once and cached, so a
    message costs its JSON parse and a few dict lookups.
    """

    def __init__(self, period: int, suppressed: tuple[str, ...], ended_before: int = 0) -> None:
        self._period = period
        self._ended_before = ended_before
        self._suppressed = suppressed
        self._suppressed_domains: dict[str, bool] = {}
        self._keys: dict[tuple[Any, ...], StoredKey] = {}
        self._policies: dict[tuple[Any, ...], tuple[str, str]] = {}

    def add(self, line: bytes | None, batch: Batch, report: LineCounts) -> None:
        """Count the record of ``line`` (None: an over-long line) in ``batch``, or what was skipped."""
        record = parse_line(line) if line is not None else None
        if record is None:
            if line is not None and not line.strip():
                return  # empty lines are ignored, as read_history does
            report.corrupt += 1
            return
        if record["v"] not in KNOWN_VERSIONS:
            report.unknown_version += 1
            return
        raw_policy = record.get("policy_published")
        if raw_policy is None:
            report.no_policy += 1
            return
        if record.get("action") == "tempfail":
            report.tempfail += 1
            return
        try:
            policy = self._policy(raw_policy)
            if policy is not None and self._suppressed and self._is_suppressed(policy[0]):
                report.suppressed += 1
                return
            key = self._key(record)
        except RecordProblem:
            policy = key = None
        when, host = record.get("time"), record.get("reporting_host")
        if policy is None or key is None or type(when) is not int or when < 0 or type(host) is not str:
            report.corrupt += 1
            return
        begin = period_start(when, self._period)
        if begin + self._period < self._ended_before:
            report.expired += 1
            return
        batch.add((policy[0], begin, begin + self._period), key, when, policy[1], host)
        report.records += 1

    def _policy(self, raw: Any) -> tuple[str, str] | None:
        """(policy domain, encoded policy), or None for an invalid one."""
        values = policy_values(raw)
        known = self._policies.get(values)
        if known is None:
            _bound(self._policies)
            try:
                policy = policy_published(raw)
                known = (policy.domain, encode_policy(policy))
            except RecordProblem:
                known = _INVALID
            self._policies[values] = known
        return None if known is _INVALID else known

    def _key(self, record: dict[str, Any]) -> StoredKey | None:
        values = row_values(record)
        known = self._keys.get(values)
        if known is None:
            _bound(self._keys)
            try:
                text = encode_row(values)
                known = (row_digest(text), text)
            except RecordProblem:
                known = _INVALID
            self._keys[values] = known
        return None if known is _INVALID else known

    def _is_suppressed(self, domain: str) -> bool:
        known = self._suppressed_domains.get(domain)
        if known is None:
            _bound(self._suppressed_domains)
            known = is_within(domain, self._suppressed)
            self._suppressed_domains[domain] = known
        return known


# Cached for values that make no valid key or policy (the record counts as corrupt).
_INVALID = ("", "")


def _bound(cache: dict[Any, Any]) -> None:
    """Empty a cache that reached :data:`MAX_CACHED` entries (memory stays bounded)."""
    if len(cache) >= MAX_CACHED:
        cache.clear()

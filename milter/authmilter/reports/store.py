"""The report store: counts per policy domain, period and row key, in SQLite or PostgreSQL.

One schema in plain SQL serves both databases (:data:`MIGRATIONS`); only the placeholders, the
way a transaction takes its write lock and the send lock differ (:class:`_Sqlite`,
:class:`_Postgres`). The store keeps aggregated counts, never a row per message, so that import,
``report show`` and ``report send`` stay fast whatever the mail volume.

Tables (schema version 1):

- ``periods``: one row per (policy domain, period): the policy last seen in it (by record
  time) and, once delivered, the report id and delivery time.
- ``report_rows``: message counts per (policy domain, period, row key); the key is stored as
  canonical JSON (aggregate.encode_row) beside its digest, the primary key's last part.
- ``reporting_hosts``: which hosts' records each period's counts include.
- ``imported_files``: per history file identity, how many bytes of its (decompressed) content
  were imported. Counts and offset are written in the same transaction, so a crash or a lost
  database connection never leaves counts without their offset or the reverse.
- ``schema_version``: the version; :func:`open_store` applies the missing migrations under a
  lock, so several MX hosts may start at once against one PostgreSQL database.

A period leaves ``periods``, ``report_rows`` and ``reporting_hosts`` together, ``[reports]
keep_days`` after it ended; a file's ``imported_files`` row goes a period and a day after that,
counted from its last import (:meth:`Store.prune`).

Errors: every database failure becomes :class:`StoreError`, naming the database (the URL
without its password) and what was being done; a failed transaction is rolled back whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from authmilter.reports import (
    POSTGRESQL_PREFIXES,
    SECONDS_PER_DAY,
    SQLITE_PREFIX,
    check_database_url,
    is_within,
    normalise_domain,
)
from authmilter.reports.aggregate import (
    DomainSummary,
    decode_policy,
    decode_row_key,
    report_data,
)
from authmilter.reports.model import ReportData, ReportPeriod

if TYPE_CHECKING:
    import psycopg

# Statements of each schema version, in order: MIGRATIONS[n] takes version n to n + 1. Plain SQL
# that SQLite and PostgreSQL both run; never edit a published version, append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE periods (
            policy_domain TEXT NOT NULL,
            period_begin BIGINT NOT NULL,
            period_end BIGINT NOT NULL,
            policy TEXT NOT NULL,
            policy_time BIGINT NOT NULL,
            report_id TEXT,
            delivered_at BIGINT,
            PRIMARY KEY (policy_domain, period_begin, period_end))""",
        "CREATE INDEX periods_by_end ON periods (period_end)",
        """CREATE TABLE report_rows (
            policy_domain TEXT NOT NULL,
            period_begin BIGINT NOT NULL,
            period_end BIGINT NOT NULL,
            digest TEXT NOT NULL,
            row_key TEXT NOT NULL,
            messages BIGINT NOT NULL,
            PRIMARY KEY (policy_domain, period_begin, period_end, digest))""",
        """CREATE TABLE reporting_hosts (
            policy_domain TEXT NOT NULL,
            period_begin BIGINT NOT NULL,
            period_end BIGINT NOT NULL,
            host TEXT NOT NULL,
            PRIMARY KEY (policy_domain, period_begin, period_end, host))""",
        """CREATE TABLE imported_files (
            identity TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            consumed BIGINT NOT NULL,
            updated_at BIGINT NOT NULL)""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# What an import batch adds up per period (policy domain, begin, end).
PeriodKey = tuple[str, int, int]

_UPSERT_PERIOD = """INSERT INTO periods (policy_domain, period_begin, period_end, policy, policy_time)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (policy_domain, period_begin, period_end) DO UPDATE
    SET policy = excluded.policy, policy_time = excluded.policy_time
    WHERE periods.policy_time <= excluded.policy_time"""
_ROW_COLUMNS = "policy_domain, period_begin, period_end, digest, row_key, messages"
_ADD_TO_ROW = """ON CONFLICT (policy_domain, period_begin, period_end, digest) DO UPDATE
    SET messages = report_rows.messages + excluded.messages"""
_UPSERT_ROW = f"INSERT INTO report_rows ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) {_ADD_TO_ROW}"
_UPSERT_ROW_FROM_INCOMING = (
    f"INSERT INTO report_rows ({_ROW_COLUMNS}) SELECT {_ROW_COLUMNS} FROM incoming_rows "
    f"ORDER BY policy_domain, period_begin, period_end, digest {_ADD_TO_ROW}"
)
_INSERT_HOST = """INSERT INTO reporting_hosts (policy_domain, period_begin, period_end, host)
    VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"""
_PERIOD_MATCH = "policy_domain = ? AND period_begin = ? AND period_end = ?"


def _advisory_key(name: bytes) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) derived from a name."""
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big", signed=True)


# SQLite page cache per connection, in KiB.
SQLITE_CACHE_KIB = 65536
# Seconds between two tries to switch a new SQLite database to WAL while another connection does.
WAL_RETRY_INTERVAL = 0.05
SEND_LOCK_KEY = _advisory_key(b"authmilter report send")
MIGRATION_LOCK_KEY = _advisory_key(b"authmilter report schema")


class StoreError(Exception):
    """The report database failed or refused; ``str()`` names the database and what failed."""


class ReportStore(Protocol):
    """What ``report send`` needs of a store (the contract of :class:`Store`'s methods)."""

    def due_reports(self, until: int) -> Iterator[ReportData]: ...

    def mark_delivered(self, policy_domain: str, period: ReportPeriod, report_id: str) -> None: ...

    def send_lock(self) -> contextlib.AbstractContextManager[None]: ...


# A row key as stored: (digest, canonical JSON), from aggregate.row_digest / encode_row.
StoredKey = tuple[str, str]


@dataclass
class Batch:
    """Counts gathered from history records, written by :meth:`Store.import_batch` at once.

    Keys and policies come encoded (the importer encodes each distinct one once).

    Attributes:
        rows: messages per (period, stored row key).
        policies: per period, the newest record's time and its policy (aggregate.encode_policy).
        hosts: the reporting hosts seen per period.
    """

    rows: Counter[tuple[PeriodKey, StoredKey]] = field(default_factory=Counter)
    policies: dict[PeriodKey, tuple[int, str]] = field(default_factory=dict)
    hosts: set[tuple[PeriodKey, str]] = field(default_factory=set)

    def add(self, period: PeriodKey, key: StoredKey, when: int, policy: str, host: str) -> None:
        """Count one message."""
        self.rows[(period, key)] += 1
        seen = self.policies.get(period)
        if seen is None or seen[0] <= when:
            self.policies[period] = (when, policy)
        self.hosts.add((period, host))


@dataclass(frozen=True)
class PeriodState:
    """One stored period of a policy domain, as ``report show`` lists it."""

    policy_domain: str
    period: ReportPeriod
    rua: tuple[str, ...]
    report_id: str | None


@dataclass(frozen=True)
class PruneOutcome:
    """What :meth:`Store.prune` deleted.

    Attributes:
        periods: the periods deleted (each with its report rows and reporting hosts).
        undelivered: of those, the ones that were due (a ``rua``, the domain not suppressed)
            and never delivered: their reports are lost.
        history_files: the history files whose import state was forgotten (see :meth:`Store.prune`).
    """

    periods: int
    undelivered: int
    history_files: int = 0


def open_store(url: str, *, suppress_domains: Collection[str] = (), timeout: float = 30.0) -> Store:
    """Connect to the report database and bring its schema up to date.

    Args:
        url: ``sqlite:///absolute/path`` (created with its tables when missing; WAL mode) or
            ``postgresql://user[:password]@host[:port]/dbname`` (the database must exist).
        suppress_domains: policy domains (and their subdomains) :meth:`Store.due_reports`
            never yields (``[reports] suppress_domains``).
        timeout: seconds to wait for a connection or for another writer's lock before failing.

    Returns:
        The open store; close it with :meth:`Store.close` (or use it as a context manager).

    Raises:
        StoreError: bad URL, database unreachable, locked, or of a newer schema than this code;
            the message names the database.
    """
    try:
        check_database_url(url)
    except ValueError as e:
        raise StoreError(str(e)) from None
    backend: _Backend
    if url.startswith(SQLITE_PREFIX):
        backend = _Sqlite(url[len(SQLITE_PREFIX) :], timeout)
    else:
        backend = _Postgres(url, timeout)
    store = Store(backend, suppress_domains)
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store


class Store:
    """The report store (implements :class:`ReportStore`); one connection, not thread-safe."""

    def __init__(self, backend: _Backend, suppress_domains: Collection[str] = ()) -> None:
        self._db = backend
        self._suppressed = tuple(normalise_domain(d) for d in suppress_domains)

    @property
    def label(self) -> str:
        """The database as named in messages (no password)."""
        return self._db.label

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._db.close()

    # -- schema ---------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Apply the migrations the database lacks, under an exclusive lock.

        Raises:
            StoreError: the database's schema is newer than this code knows, or a statement failed.
        """
        if self.schema_version() == SCHEMA_VERSION:
            return  # the usual case: no write lock taken, so a busy database can still be read
        with self._errors("cannot set up the schema"), self._db.transaction(migration=True) as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = db.query("SELECT version FROM schema_version")
            if not found:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
            current = int(found[0][0]) if found else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"report database {self.label}: schema version {current} is newer than this "
                    f"authmilter's ({SCHEMA_VERSION}): upgrade authmilter"
                )
            for version in range(current, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                db.execute("UPDATE schema_version SET version = ?", (version + 1,))

    def schema_version(self) -> int | None:
        """The schema version the database is at; None when it has no schema (or cannot be read)."""
        unreadable: tuple[type[BaseException], ...] = (*self._db.errors, IndexError)
        try:
            return int(self._db.query("SELECT version FROM schema_version")[0][0])
        except unreadable:
            return None

    # -- import ---------------------------------------------------------------------------------

    def imported_bytes(self, identity: str) -> int:
        """How much of the history file ``identity`` was imported (0 for a new file).

        Raises:
            StoreError: the database failed.
        """
        with self._errors("cannot read the import state"):
            found = self._db.query("SELECT consumed FROM imported_files WHERE identity = ?", (identity,))
        return int(found[0][0]) if found else 0

    def import_batch(self, identity: str, path: str, start: int, end: int, batch: Batch) -> bool:
        """Add a batch of counts and move the file's import offset from ``start`` to ``end``, atomically.

        Args:
            identity: the history file's identity (importer.file_identity).
            path: where the file was read (kept for the record only).
            start: the offset the batch was read from.
            end: the offset after the batch's last line.
            batch: the counts.

        Returns:
            False, and nothing written, when the stored offset is no longer ``start`` (another
            import of the same file got there first).

        Raises:
            StoreError: the database failed or stayed locked; nothing of the batch was written.
        """
        with self._errors(f"cannot import {path}"), self._db.transaction() as db:
            db.execute(
                "INSERT INTO imported_files (identity, path, consumed, updated_at) VALUES (?, ?, 0, ?) "
                "ON CONFLICT (identity) DO NOTHING",
                (identity, path, int(time.time())),
            )
            (stored,) = db.query(
                "SELECT consumed FROM imported_files WHERE identity = ?" + db.for_update, (identity,)
            )
            if int(stored[0]) != start:
                return False
            _write_batch(db, batch)
            db.execute(
                "UPDATE imported_files SET consumed = ?, path = ?, updated_at = ? WHERE identity = ?",
                (end, path, int(time.time()), identity),
            )
        return True

    # -- reports (the ReportStore contract) ------------------------------------------------------

    def due_reports(self, until: int) -> Iterator[ReportData]:
        """The reports to deliver now, oldest period first.

        A report is due for a (policy domain, period) that: ended at or before ``until``
        (``period.end <= until``: the period is closed), is not yet marked delivered, whose
        policy (the one last seen in the period) has at least one ``rua`` URI, and whose
        domain is not suppressed (``[reports] suppress_domains``, subdomains included). Its
        rows hold every row key counted in the period, most messages first; its
        ``reporting_hosts`` every host whose records were imported into it (sorted).

        The URIs are passed on as published: checking their scheme, size limit and external
        destination is the sender's job. Iterating takes no lock: call it inside
        :meth:`send_lock` so that a concurrent ``send`` cannot deliver the same reports.
        Each report's rows are read when it is yielded, so :meth:`mark_delivered` may be called
        between two reports.

        Args:
            until: seconds since the epoch; usually now.

        Raises:
            StoreError: the database failed.
        """
        with self._errors("cannot list the due reports"):
            periods = self._db.query(
                "SELECT policy_domain, period_begin, period_end, policy FROM periods "
                "WHERE report_id IS NULL AND period_end <= ? ORDER BY period_begin, policy_domain",
                (until,),
            )
        for domain, begin, end, policy in periods:
            if self._is_suppressed(domain) or not decode_policy(policy).rua:
                continue
            key = (domain, int(begin), int(end))
            with self._errors(f"cannot read the report of {domain}"):
                rows = self._db.query(
                    f"SELECT row_key, messages FROM report_rows WHERE {_PERIOD_MATCH} "
                    "ORDER BY messages DESC, digest",
                    key,
                )
                hosts = self._db.query(f"SELECT host FROM reporting_hosts WHERE {_PERIOD_MATCH}", key)
            yield report_data(
                domain,
                ReportPeriod(key[1], key[2]),
                policy,
                ((text, int(count)) for text, count in rows),
                (host for (host,) in hosts),
            )

    def mark_delivered(self, policy_domain: str, period: ReportPeriod, report_id: str) -> None:
        """Record that the report of ``policy_domain`` for ``period`` was delivered, in one transaction.

        Call it once the report is safely handed over (the MTA accepted it, or the file is
        complete); after it returns, :meth:`due_reports` no longer yields that report. Records
        imported later into a delivered period are counted but never reported.

        Args:
            policy_domain: ``ReportData.policy_domain``.
            period: ``ReportData.period``.
            report_id: the report's id, kept with the delivery.

        Raises:
            StoreError: no undelivered report for that domain and period (unknown, or already
                delivered), or the database failed; nothing was changed.
        """
        action = f"cannot mark the report of {policy_domain} for {period.begin}-{period.end} delivered"
        with self._errors(action), self._db.transaction() as db:
            changed = db.execute(
                f"UPDATE periods SET report_id = ?, delivered_at = ? WHERE {_PERIOD_MATCH} "
                "AND report_id IS NULL",
                (report_id, int(time.time()), policy_domain, period.begin, period.end),
            )
            if changed != 1:
                raise StoreError(
                    f"report database {self.label}: {action}: no undelivered report for it "
                    "(already delivered?)"
                )

    def prune(self, before: int, *, period: int, dry_run: bool = False) -> PruneOutcome:
        """Delete every period that ended before ``before``, with its rows and hosts, in one transaction.

        Delivered or not: a period that was due (a ``rua``, its domain not suppressed) and never
        delivered is deleted too, and counted, so that the caller can say so. Call it inside
        :meth:`send_lock`, so that no ``send`` is delivering a report whose period goes.

        The import state of a history file last imported a period and a day before ``before``
        goes too, or the table would keep a row for every history file ever rotated. Forgetting
        it cannot count a record twice: every record imported from the file by then was written
        before that import (the day is slack for the clocks of the host that wrote it and the one
        that imported it), so its period ended before ``before``, and an import with that cutoff
        (``import_files``' ``ended_before``) skips it if the file is read again from its start.

        Args:
            before: seconds since the epoch; periods with ``period_end < before`` go.
            period: the reporting period in seconds (``[reports] period``).
            dry_run: count only; delete nothing.

        Returns:
            How many periods were (or, with ``dry_run``, would be) deleted, and how many of
            them were due and never delivered.

        Raises:
            StoreError: the database failed; nothing was deleted.
        """
        with self._errors("cannot delete the old periods"), self._db.transaction() as db:
            # Locked in key order, as an import locks them (_write_batch), so the two seldom wait
            # on each other crosswise; PostgreSQL aborts one that would, and the next run retries.
            keys = db.query(
                "SELECT policy_domain, period_begin, period_end FROM periods WHERE period_end < ? "
                "ORDER BY policy_domain, period_begin, period_end" + db.for_update,
                (before,),
            )
            # One row per distinct policy, not per period: a domain without rua is never
            # delivered, so its old periods are many.
            undelivered = db.query(
                "SELECT policy_domain, policy, COUNT(*) FROM periods "
                "WHERE period_end < ? AND report_id IS NULL GROUP BY policy_domain, policy",
                (before,),
            )
            lost = sum(
                int(count)
                for domain, policy, count in undelivered
                if not self._is_suppressed(domain) and decode_policy(policy).rua
            )
            idle_since = (before - period - SECONDS_PER_DAY,)
            (files,) = db.query("SELECT COUNT(*) FROM imported_files WHERE updated_at < ?", idle_since)
            if not dry_run:
                # By key, not by period_end: report_rows has no index on period_end, and a
                # period an import adds meanwhile stays whole.
                for table in ("report_rows", "reporting_hosts", "periods"):
                    db.executemany(f"DELETE FROM {table} WHERE {_PERIOD_MATCH}", keys)
                db.execute("DELETE FROM imported_files WHERE updated_at < ?", idle_since)
        return PruneOutcome(periods=len(keys), undelivered=lost, history_files=int(files[0]))

    def send_lock(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock across processes and hosts for one ``report send`` run.

        Entering blocks until no other holder is left (SQLite: ``flock`` on ``DATABASE.send-lock``
        beside the database file; PostgreSQL: a session advisory lock, ``pg_advisory_lock``).
        The lock goes with the process or connection, so a crashed sender never leaves it taken.
        Imports go on while it is held.

        Raises:
            StoreError: the lock cannot be taken (lock file not writable, database failed).
        """
        return self._db.send_lock()

    # -- report show ----------------------------------------------------------------------------

    def periods(self, since: int = 0, domain: str | None = None) -> list[PeriodState]:
        """The stored periods that end after ``since``, of one policy domain or all.

        Raises:
            StoreError: the database failed.
        """
        where, params = self._show_filter(since, domain)
        with self._errors("cannot list the periods"):
            found = self._db.query(
                "SELECT policy_domain, period_begin, period_end, policy, report_id FROM periods "
                f"WHERE {where} ORDER BY policy_domain, period_begin",
                params,
            )
        return [
            PeriodState(name, ReportPeriod(int(begin), int(end)), decode_policy(policy).rua, report_id)
            for name, begin, end, policy, report_id in found
        ]

    def summaries(self, since: int = 0, domain: str | None = None) -> list[DomainSummary]:
        """Message counts per policy domain over the periods that end after ``since``.

        Raises:
            StoreError: the database failed.
        """
        where, params = self._show_filter(since, domain)
        summaries: dict[str, DomainSummary] = {}
        # Summed per row key over the periods in the database, and streamed: memory follows the
        # distinct rows of one domain at most, not the rows of every period.
        found = self._db.stream(
            f"SELECT policy_domain, MIN(row_key), SUM(messages) FROM report_rows WHERE {where} "
            "GROUP BY policy_domain, digest",
            params,
        )
        with self._errors("cannot summarise the counts"):
            for name, key, count in found:
                summary = summaries.get(name)
                if summary is None:
                    summary = summaries[name] = DomainSummary(name)
                summary.add(decode_row_key(key), int(count))
        return [summaries[name] for name in sorted(summaries)]

    @staticmethod
    def _show_filter(since: int, domain: str | None) -> tuple[str, tuple[Any, ...]]:
        if domain is None:
            return "period_end > ?", (since,)
        return "period_end > ? AND policy_domain = ?", (since, normalise_domain(domain))

    # -- helpers ----------------------------------------------------------------------------------

    def _is_suppressed(self, domain: str) -> bool:
        return is_within(domain, self._suppressed)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Database exceptions → StoreError naming the database and the action."""
        try:
            yield
        except StoreError:
            raise
        except self._db.errors as e:
            raise StoreError(f"report database {self.label}: {action}: {self._db.describe(e)}") from e


def _write_batch(db: _Backend, batch: Batch) -> None:
    # In key order: hosts importing into one PostgreSQL database at once then lock the rows they
    # share in the same order, and never deadlock.
    db.executemany(
        _UPSERT_PERIOD, [(*period, policy, when) for period, (when, policy) in sorted(batch.policies.items())]
    )
    db.add_rows([(*period, *key, count) for (period, key), count in sorted(batch.rows.items())])
    db.executemany(_INSERT_HOST, [(*period, host) for period, host in sorted(batch.hosts)])


# ---------------------------------------------------------------------------------------------
# The two databases


class _Backend(Protocol):
    label: str
    errors: tuple[type[BaseException], ...]
    # Appended to a SELECT inside a transaction to lock the rows read (PostgreSQL only: SQLite's
    # write transactions already exclude each other).
    for_update: str

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        """The rows of a query, fetched as they are consumed."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def add_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        """Add message counts to report_rows: (domain, begin, end, digest, row key, messages),
        each (domain, begin, end, digest) once."""
        ...

    def transaction(self, migration: bool = False) -> contextlib.AbstractContextManager[_Backend]: ...

    def send_lock(self) -> contextlib.AbstractContextManager[None]: ...

    def describe(self, error: BaseException) -> str: ...

    def close(self) -> None: ...


class _Sqlite:
    """SQLite in WAL mode: readers never wait for the writer; writers take the lock at BEGIN."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    for_update = ""

    def __init__(self, path: str, timeout: float) -> None:
        self.label = path
        self._path = path
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise StoreError(f"report database {path}: directory {directory} does not exist: create it")
        try:
            # isolation_level=None: no implicit transactions; ours begin with BEGIN IMMEDIATE.
            self._conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
            mode = self._switch_to_wal(time.monotonic() + timeout)
            # A day of a busy site's rows is tens of MB; the default 2 MB page cache would make
            # every upsert of an import read its B-tree pages again.
            self._conn.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        except sqlite3.Error as e:
            raise StoreError(f"report database {path}: cannot open: {self.describe(e)}") from e
        if str(mode).lower() != "wal":
            self._conn.close()
            raise StoreError(f"report database {path}: cannot switch to WAL mode (got {mode})")

    def _switch_to_wal(self, deadline: float) -> str:
        """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock.

        SQLite answers "locked" at once, without waiting for the busy timeout, when two
        connections switch a new database to WAL at the same moment; one wins, the other retries.
        """
        while True:
            try:
                return str(self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(WAL_RETRY_INTERVAL)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        yield from self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def add_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(_UPSERT_ROW, rows)

    @contextlib.contextmanager
    def transaction(self, migration: bool = False) -> Iterator[_Sqlite]:
        # IMMEDIATE takes the write lock now (waiting up to the timeout), so two writers never
        # both read a value and then write from it.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self._conn.rollback()
            raise
        self._conn.commit()

    @contextlib.contextmanager
    def send_lock(self) -> Iterator[None]:
        lock_path = f"{self._path}.send-lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
        except OSError as e:
            raise StoreError(
                f"report database {self.label}: cannot open the send lock {lock_path}: {e.strerror}"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def describe(self, error: BaseException) -> str:
        text = str(error)
        if "locked" in text or "busy" in text:
            return f"{text} (another process holds it; try again later)"
        return text

    def close(self) -> None:
        self._conn.close()


class _Postgres:
    """PostgreSQL through psycopg 3, in autocommit mode with explicit transactions."""

    for_update = " FOR UPDATE"

    def __init__(self, url: str, timeout: float) -> None:
        self.label = _without_password(url)
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                f"report database {self.label}: PostgreSQL needs psycopg 3: pip install 'psycopg[binary]'"
            ) from None
        self._psycopg = psycopg
        self.errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        try:
            self._conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(
                url, autocommit=True, connect_timeout=max(1, int(timeout))
            )
        except psycopg.Error as e:
            raise StoreError(f"report database {self.label}: cannot connect: {self.describe(e)}") from e

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(_placeholders(sql), params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(_placeholders(sql), params).rowcount

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        # A server-side cursor (it needs a transaction); a client-side one fetches every row first.
        with self._conn.transaction(), self._conn.cursor(name="authmilter_stream") as cursor:
            cursor.execute(_placeholders(sql), params)
            yield from cursor

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(_placeholders(sql), rows)

    def add_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        # COPY into a temporary table, then one upsert: a statement per row costs psycopg about
        # ten times more (bench/README.md). Rows are unique, so one INSERT may update each once.
        with self._conn.cursor() as cursor:
            cursor.execute(
                "CREATE TEMPORARY TABLE IF NOT EXISTS incoming_rows (LIKE report_rows) ON COMMIT DELETE ROWS"
            )
            with cursor.copy(f"COPY incoming_rows ({_ROW_COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cursor.execute(_placeholders(_UPSERT_ROW_FROM_INCOMING))

    @contextlib.contextmanager
    def transaction(self, migration: bool = False) -> Iterator[_Postgres]:
        with self._conn.transaction():
            if migration:
                # Several MX hosts may start at once: one migrates, the others wait and find it done.
                self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            yield self

    @contextlib.contextmanager
    def send_lock(self) -> Iterator[None]:
        try:
            self._conn.execute("SELECT pg_advisory_lock(%s)", (SEND_LOCK_KEY,))
        except self._psycopg.Error as e:
            raise StoreError(
                f"report database {self.label}: cannot take the send lock: {self.describe(e)}"
            ) from e
        try:
            yield
        finally:
            with contextlib.suppress(self._psycopg.Error):
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (SEND_LOCK_KEY,))

    def describe(self, error: BaseException) -> str:
        return " ".join(str(error).split())

    def close(self) -> None:
        self._conn.close()


def _placeholders(sql: str) -> str:
    """Our SQL uses ``?`` (SQLite's style); psycopg's is ``%s``. No statement holds a literal ? or %."""
    return sql.replace("?", "%s")


def _without_password(url: str) -> str:
    """The URL as shown in messages: ``postgresql://user:secret@host/db`` → ``postgresql://user@host/db``."""
    for prefix in POSTGRESQL_PREFIXES:
        if url.startswith(prefix):
            return prefix + re.sub(r"^([^@/]*?):[^@/]*@", r"\1@", url[len(prefix) :])
    return url

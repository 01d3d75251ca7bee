"""The report store and the history importer, each test against SQLite and a real PostgreSQL."""

from __future__ import annotations

import gzip
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authmilter.history import encode_record
from authmilter.reports import SECONDS_PER_DAY, importer
from authmilter.reports.importer import history_files, import_files
from authmilter.reports.model import (
    DkimAuthResult,
    OverrideReason,
    ReportData,
    ReportPeriod,
    RowKey,
    SpfAuthResult,
)
from authmilter.reports.store import SCHEMA_VERSION, PruneOutcome, Store, StoreError, open_store
from historydata import DAY, HOUR, record, write_history

PERIOD = 86400
FIRST_DAY = ReportPeriod(DAY, DAY + PERIOD)


def due(store: Store, until: int = DAY + 30 * PERIOD) -> list[ReportData]:
    return list(store.due_reports(until))


def counts(store: Store) -> dict[tuple[str, int], int]:
    """(policy domain, period begin) → messages, over the reports not yet delivered."""
    return {(r.policy_domain, r.period.begin): sum(row.count for row in r.rows) for r in due(store)}


def run_import(store: Store, *paths: Path, **options: Any) -> importer.ImportReport:
    return import_files(store, [str(p) for p in paths], period=PERIOD, **options)


@pytest.fixture
def store(report_database: str) -> Iterator[Store]:
    with open_store(report_database) as opened:
        yield opened


def test_a_new_database_gets_the_current_schema_once(report_database: str) -> None:
    with open_store(report_database) as first:
        assert first.schema_version() == SCHEMA_VERSION
    with open_store(report_database) as again:  # migrating an up-to-date schema changes nothing
        assert again.schema_version() == SCHEMA_VERSION


def test_a_newer_schema_is_refused_naming_the_database(report_database: str) -> None:
    with open_store(report_database) as store, store._db.transaction() as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match=r"report database .*reports.*schema version \d+ is newer"):
        open_store(report_database)


def test_records_become_one_report_per_domain_and_period(store: Store, tmp_path: Path) -> None:
    history = write_history(
        tmp_path / "history.jsonl",
        [
            record(),
            record(time=DAY + 20 * HOUR),
            record(aligned=False, source_ip="198.51.100.7", host="mx2.receiver.example"),
            record(domain="other.example"),
            record(time=DAY + PERIOD + 5),
        ],
    )
    outcome = run_import(store, history)
    assert (outcome.records, outcome.failed) == (5, False)
    assert counts(store) == {
        ("sender.example", DAY): 3,
        ("other.example", DAY): 1,
        ("sender.example", DAY + PERIOD): 1,
    }
    report = next(r for r in due(store) if r.policy_domain == "sender.example")
    assert report.period == FIRST_DAY
    assert report.reporting_hosts == ("mx1.receiver.example", "mx2.receiver.example")
    assert report.policy.rua == ("mailto:dmarc@sender.example",)
    assert [row.count for row in report.rows] == [2, 1]  # most messages first
    assert report.rows[0].key == RowKey(
        source_ip="192.0.2.25",
        disposition="pass",
        dkim="pass",
        spf="pass",
        reasons=(),
        header_from="sender.example",
        envelope_from="sender.example",
        envelope_to="receiver.example",
        dkim_results=(DkimAuthResult("sender.example", "s1", "pass", ""),),
        spf_results=(SpfAuthResult("sender.example", "mfrom", "pass", ""),),
    )
    assert report.rows[1].key.dkim_results == (
        DkimAuthResult("sender.example", "s1", "fail", "body hash mismatch"),
    )


def test_only_closed_periods_are_due(store: Store, tmp_path: Path) -> None:
    run_import(store, write_history(tmp_path / "h", [record()]))
    assert due(store, until=FIRST_DAY.end - 1) == []
    assert [r.period for r in due(store, until=FIRST_DAY.end)] == [FIRST_DAY]


def test_a_configured_hourly_period_splits_the_day(store: Store, tmp_path: Path) -> None:
    history = write_history(tmp_path / "h", [record(time=DAY + 5), record(time=DAY + HOUR + 5)])
    import_files(store, [str(history)], period=HOUR)
    assert [r.period for r in due(store)] == [
        ReportPeriod(DAY, DAY + HOUR),
        ReportPeriod(DAY + HOUR, DAY + 2 * HOUR),
    ]


def test_row_keys_keep_reasons_and_take_the_first_recipient_domain(store: Store, tmp_path: Path) -> None:
    overridden = record(aligned=False, envelope_to=["a.example", "b.example"])
    overridden["policy_evaluated"]["reasons"] = [{"type": "local_policy", "comment": "local override"}]
    no_recipient = record(envelope_to=[])
    no_recipient["auth_results"]["spf"] = None
    no_recipient["auth_results"]["dkim"] = []
    run_import(store, write_history(tmp_path / "h", [overridden, no_recipient]))
    keys = {row.key.envelope_to: row.key for row in due(store)[0].rows}
    assert keys["a.example"].reasons == (OverrideReason("local_policy", "local override"),)
    assert (keys[""].spf_results, keys[""].dkim_results) == ((), ())


def test_the_policy_last_seen_in_a_period_is_reported(store: Store, tmp_path: Path) -> None:
    newer = record(time=DAY + 20 * HOUR)
    newer["policy_published"]["p"] = "quarantine"
    older = record(time=DAY + HOUR)
    # The newer record is imported first: the time decides, not the order.
    run_import(store, write_history(tmp_path / "h1", [newer]))
    run_import(store, write_history(tmp_path / "h2", [older]))
    assert due(store)[0].policy.p == "quarantine"


def test_the_same_file_imported_twice_counts_once(store: Store, tmp_path: Path) -> None:
    history = write_history(tmp_path / "history.jsonl", [record(), record()])
    run_import(store, history)
    again = run_import(store, history)
    assert again.records == 0
    assert counts(store) == {("sender.example", DAY): 2}


def test_a_grown_file_adds_only_its_new_lines(store: Store, tmp_path: Path) -> None:
    history = write_history(tmp_path / "history.jsonl", [record()])
    run_import(store, history)
    write_history(history, [record(), record()], mode="ab")
    assert run_import(store, history).records == 2
    assert counts(store) == {("sender.example", DAY): 3}


def test_rotated_and_gzip_copies_count_nothing_again(store: Store, tmp_path: Path) -> None:
    live = write_history(tmp_path / "history.jsonl", [record(), record()])
    run_import(store, live)
    # logrotate: move, compress a copy, and the daemon starts a new file at the path.
    rotated = live.rename(tmp_path / "history.jsonl.1")
    with rotated.open("rb") as plain, gzip.open(tmp_path / "history.jsonl.2.gz", "wb") as packed:
        shutil.copyfileobj(plain, packed)
    write_history(live, [record(queue_id="NEW1")])
    outcome = run_import(store, *(Path(p) for p in history_files(str(live))))
    assert outcome.records == 1
    assert counts(store) == {("sender.example", DAY): 3}


def test_a_gzip_copy_of_a_grown_file_adds_only_what_was_not_imported(store: Store, tmp_path: Path) -> None:
    live = write_history(tmp_path / "history.jsonl", [record()])
    run_import(store, live)
    write_history(live, [record(), record()], mode="ab")
    packed = tmp_path / "history.jsonl.1.gz"
    packed.write_bytes(gzip.compress(live.read_bytes()))
    live.unlink()
    assert run_import(store, packed).records == 2
    assert counts(store) == {("sender.example", DAY): 3}


def test_a_last_line_being_written_waits_for_the_next_import(store: Store, tmp_path: Path) -> None:
    line = encode_record(record())
    history = tmp_path / "history.jsonl"
    history.write_bytes(line + line[:40])
    assert run_import(store, history).records == 1
    history.write_bytes(line + line)
    assert run_import(store, history).records == 1
    assert counts(store) == {("sender.example", DAY): 2}


def test_bad_lines_are_counted_and_skipped(store: Store, tmp_path: Path) -> None:
    broken = record()
    del broken["auth_results"]
    bad_policy = record()
    bad_policy["policy_published"]["p"] = 5
    lines = [
        b"not json\n",
        b'{"v": 1, "time": \n',  # truncated by a crash
        b"\xff\xfe\n",
        b"[1, 2]\n",
        b'{"v": 2, "time": 1}\n',  # a newer writer
        encode_record(broken),
        encode_record(record(time="yesterday")),
        encode_record(record(source_ip=7)),
        encode_record(bad_policy),
        encode_record(record(policy_published=None)),
        encode_record(record(action="tempfail")),
        b"\n",
        encode_record(record()),
    ]
    history = tmp_path / "history.jsonl"
    history.write_bytes(b"".join(lines))
    outcome = run_import(store, history)
    assert (outcome.records, outcome.corrupt, outcome.unknown_version) == (1, 8, 1)
    assert (outcome.no_policy, outcome.tempfail, outcome.failed) == (1, 1, False)
    assert "8 corrupt line(s), 1 record(s) of unknown version, 1 tempfail" in outcome.summary()
    assert counts(store) == {("sender.example", DAY): 1}


def test_an_over_long_line_is_corrupt_and_the_rest_is_read(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importer, "MAX_LINE", 2048)
    history = tmp_path / "history.jsonl"
    history.write_bytes(encode_record(record()) + b"x" * 5000 + b"\n" + encode_record(record()))
    outcome = run_import(store, history)
    assert (outcome.records, outcome.corrupt) == (2, 1)
    assert run_import(store, history).records == 0


def test_vanished_and_unreadable_files_are_reported_and_the_others_imported(
    store: Store, tmp_path: Path
) -> None:
    good = write_history(tmp_path / "history.jsonl", [record()])
    outcome = run_import(store, tmp_path / "gone.jsonl", tmp_path, good)
    assert outcome.vanished == [str(tmp_path / "gone.jsonl")]
    assert outcome.failed and f"{tmp_path}: cannot open" in outcome.summary()
    assert outcome.records == 1


def test_a_broken_gzip_file_keeps_what_was_read_before(store: Store, tmp_path: Path) -> None:
    packed = gzip.compress(b"".join(encode_record(record()) for _ in range(3)))
    broken = tmp_path / "history.jsonl.2.gz"
    broken.write_bytes(packed[: len(packed) - 12])  # the end of the stream is cut off
    outcome = run_import(store, broken, batch_lines=1)
    assert outcome.failed and "cannot read" in outcome.summary()
    assert sum(counts(store).values()) == outcome.records


def test_suppressed_domains_are_not_imported(store: Store, tmp_path: Path) -> None:
    history = write_history(
        tmp_path / "h", [record(domain="sub.quiet.example"), record(domain="quiet.example"), record()]
    )
    outcome = run_import(store, history, suppress_domains=["Quiet.Example."])
    assert outcome.suppressed == 2
    assert counts(store) == {("sender.example", DAY): 1}


def test_records_of_periods_ended_before_the_cutoff_are_not_imported(store: Store, tmp_path: Path) -> None:
    cutoff = DAY - 30 * PERIOD
    history = write_history(
        tmp_path / "h",
        [
            record(time=cutoff - 2 * PERIOD + 60),  # its period ended before the cutoff
            record(time=cutoff - PERIOD + 60),  # its period ends at the cutoff: kept, as prune keeps it
            record(time=DAY + 60),
        ],
    )
    outcome = run_import(store, history, ended_before=cutoff)
    assert (outcome.expired, outcome.records) == (1, 2)
    assert counts(store) == {("sender.example", cutoff - PERIOD): 1, ("sender.example", DAY): 1}


def test_due_reports_leave_out_suppressed_domains_and_those_without_rua(
    report_database: str, tmp_path: Path
) -> None:
    no_rua = record(domain="norua.example")
    no_rua["policy_published"]["rua"] = []
    history = write_history(tmp_path / "h", [record(domain="quiet.example"), no_rua, record()])
    with open_store(report_database) as store:
        run_import(store, history)
        assert {r.policy_domain for r in due(store)} == {"quiet.example", "sender.example"}
    with open_store(report_database, suppress_domains=["quiet.example"]) as store:
        assert {r.policy_domain for r in due(store)} == {"sender.example"}


def test_a_delivered_report_is_not_due_again_and_cannot_be_marked_twice(store: Store, tmp_path: Path) -> None:
    run_import(store, write_history(tmp_path / "h", [record(), record(domain="other.example")]))
    with store.send_lock():
        store.mark_delivered("sender.example", FIRST_DAY, "report-1")
    assert [r.policy_domain for r in due(store)] == ["other.example"]
    with pytest.raises(StoreError, match=r"sender\.example.*no undelivered report"):
        store.mark_delivered("sender.example", FIRST_DAY, "report-2")
    with pytest.raises(StoreError, match="no undelivered report"):
        store.mark_delivered("unknown.example", FIRST_DAY, "report-3")


def test_hosts_importing_into_one_database_make_one_report(report_database: str, tmp_path: Path) -> None:
    mx1 = write_history(tmp_path / "mx1.jsonl", [record(host="mx1.receiver.example")])
    mx2 = write_history(tmp_path / "mx2.jsonl", [record(host="mx2.receiver.example")] * 2)
    with open_store(report_database) as first, open_store(report_database) as second:
        run_import(first, mx1)
        run_import(second, mx2)
        (report,) = due(first)
    assert report.reporting_hosts == ("mx1.receiver.example", "mx2.receiver.example")
    assert [row.count for row in report.rows] == [3]


def test_the_send_lock_keeps_a_second_sender_waiting(report_database: str) -> None:
    acquired = threading.Event()

    def second_sender() -> None:
        with open_store(report_database) as other, other.send_lock():
            acquired.set()

    with open_store(report_database) as first:
        with first.send_lock():
            thread = threading.Thread(target=second_sender)
            thread.start()
            # Bounded: a missing lock lets the second sender in at once.
            assert not acquired.wait(1.0), "a second sender entered while the lock was held"
        assert acquired.wait(30), "the second sender never got the lock after it was released"
        thread.join(30)


def test_concurrent_imports_of_one_file_count_each_line_once(report_database: str, tmp_path: Path) -> None:
    history = write_history(tmp_path / "history.jsonl", [record(queue_id=f"Q{i}") for i in range(400)])
    outcomes: list[importer.ImportReport] = []

    def one_import() -> None:
        with open_store(report_database) as store:
            outcomes.append(run_import(store, history, batch_lines=7))

    threads = [threading.Thread(target=one_import) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    with open_store(report_database) as store:
        run_import(store, history)  # finishes whatever a stopped run left
        assert counts(store) == {("sender.example", DAY): 400}
    assert len(outcomes) == 3 and not any(outcome.failed for outcome in outcomes)
    # Each run reports only what it committed.
    assert sum(outcome.records for outcome in outcomes) <= 400


def test_hosts_importing_at_once_add_up_exactly(report_database: str, tmp_path: Path) -> None:
    domains = [f"d{n}.example" for n in range(30)]
    files = [
        write_history(
            tmp_path / f"mx{host}.jsonl",
            [
                record(domain=d, host=f"mx{host}.receiver.example", queue_id=f"{host}{i}")
                for i in range(5)
                for d in domains
            ]
            if host == 1
            else [
                record(domain=d, host=f"mx{host}.receiver.example")
                for d in reversed(domains)
                for _ in range(5)
            ],
        )
        for host in (1, 2)
    ]
    failures: list[BaseException] = []

    def import_one(history: Path) -> None:
        try:
            with open_store(report_database) as store:
                run_import(store, history, batch_lines=11)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=import_one, args=(history,)) for history in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    with open_store(report_database) as store:
        assert counts(store) == {(d, DAY): 10 for d in domains}


def test_a_locked_sqlite_database_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/reports.sqlite"
    history = write_history(tmp_path / "h", [record()])
    locked = pytest.raises(StoreError, match=rf"report database {tmp_path}/reports.sqlite: .*locked")
    with open_store(url) as holder, holder._db.transaction(), open_store(url, timeout=0.2) as blocked, locked:
        run_import(blocked, history)
    with open_store(url) as store:
        assert counts(store) == {}
        assert run_import(store, history).records == 1


def test_a_batch_that_fails_half_way_leaves_nothing_written(store: Store, tmp_path: Path) -> None:
    history = write_history(tmp_path / "h", [record()])
    # The last table a batch writes is gone: periods and rows were written when the failure comes.
    with store._db.transaction() as db:
        db.execute("DROP TABLE reporting_hosts")
    with pytest.raises(StoreError, match=r"report database .*: cannot import .*/h: .*reporting_hosts"):
        run_import(store, history)
    assert store._db.query("SELECT COUNT(*) FROM periods") == [(0,)]
    assert store._db.query("SELECT COUNT(*) FROM report_rows") == [(0,)]
    assert store._db.query("SELECT COUNT(*) FROM imported_files") == [(0,)]


def test_an_unreachable_postgresql_fails_clearly() -> None:
    from dnsserver import free_port

    url = f"postgresql://reports:secret@127.0.0.1:{free_port('127.0.0.1')}/reports"
    with pytest.raises(StoreError) as info:
        open_store(url, timeout=2)
    message = str(info.value)
    assert "report database postgresql://reports@127.0.0.1" in message and "cannot connect" in message
    assert "secret" not in message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://localhost/reports", "not a report database URL"),
        ("sqlite://reports.sqlite", "absolute path"),
        ("sqlite:///nonexistent-dir/reports.sqlite", "directory /nonexistent-dir does not exist"),
    ],
)
def test_unusable_urls_are_refused(url: str, problem: str) -> None:
    with pytest.raises(StoreError, match=problem):
        open_store(url)


def test_summaries_count_results_per_domain(store: Store, tmp_path: Path) -> None:
    unsigned = record(source_ip="203.0.113.9")
    unsigned["auth_results"]["dkim"] = []
    unsigned["policy_evaluated"]["dkim"] = "fail"
    failing = record(aligned=False, source_ip="198.51.100.7")
    next_day = record(time=DAY + PERIOD + 5)  # the same row key in the next period
    run_import(store, write_history(tmp_path / "h", [record(), record(), failing, unsigned, next_day]))
    (summary,) = store.summaries()
    assert summary.messages == 5
    assert dict(summary.dmarc) == {"pass": 4, "fail": 1}
    assert dict(summary.dkim_aligned) == {"pass": 3, "fail": 2}
    assert dict(summary.dkim) == {"pass": 3, "fail": 1, "none": 1}
    assert summary.top_sources()[0] == ("192.0.2.25", 3)
    (later,) = store.summaries(since=FIRST_DAY.end)
    assert later.messages == 1
    assert store.summaries(since=FIRST_DAY.end + PERIOD) == []
    assert store.summaries(domain="other.example") == []


# --- pruning ([reports] keep_days) -----------------------------------------------------------------


def stored_periods(store: Store) -> dict[str, set[tuple[str, int]]]:
    """Per table, the (policy domain, period begin) it holds rows of."""
    return {
        table: {
            (domain, int(begin))
            for domain, begin in store._db.query(f"SELECT policy_domain, period_begin FROM {table}")
        }
        for table in ("periods", "report_rows", "reporting_hosts")
    }


def test_prune_deletes_the_periods_ended_before_the_cutoff_with_their_rows_and_hosts(
    store: Store, tmp_path: Path
) -> None:
    second_day = DAY + PERIOD + 5
    history = write_history(
        tmp_path / "h",
        [
            record(),
            record(aligned=False, source_ip="198.51.100.7", host="mx2.receiver.example"),
            record(domain="other.example"),
            record(time=second_day),
            record(time=second_day, domain="other.example", host="mx2.receiver.example"),
        ],
    )
    run_import(store, history)
    # The second day ends exactly at the cutoff: "ended before" it excludes it.
    outcome = store.prune(DAY + 2 * PERIOD, period=PERIOD)
    assert outcome.periods == 2
    kept = {("sender.example", DAY + PERIOD), ("other.example", DAY + PERIOD)}
    assert stored_periods(store) == {"periods": kept, "report_rows": kept, "reporting_hosts": kept}
    assert counts(store) == {("sender.example", DAY + PERIOD): 1, ("other.example", DAY + PERIOD): 1}
    assert store.prune(DAY + 2 * PERIOD, period=PERIOD).periods == 0


def test_prune_counts_the_due_reports_never_delivered(report_database: str, tmp_path: Path) -> None:
    no_rua = record(domain="norua.example")
    no_rua["policy_published"]["rua"] = []
    domains = ("sender.example", "other.example", "quiet.example")
    history = write_history(tmp_path / "h", [*(record(domain=d) for d in domains), no_rua])
    with open_store(report_database, suppress_domains=["quiet.example"]) as store:
        run_import(store, history)
        with store.send_lock():
            store.mark_delivered("sender.example", FIRST_DAY, "report-1")
        # Delivered, without rua, suppressed: none lost; other.example's report was due and is.
        assert store.prune(FIRST_DAY.end + 1, period=PERIOD) == PruneOutcome(periods=4, undelivered=1)
        assert stored_periods(store)["periods"] == set()


def file_imported_at(store: Store, history: Path, when: int) -> str:
    """Set the time of the history file's last import to ``when``; its identity."""
    identity = importer.file_identity(history.read_bytes().split(b"\n", 1)[0] + b"\n")
    with store._db.transaction() as db:
        db.execute("UPDATE imported_files SET updated_at = ? WHERE identity = ?", (when, identity))
    return identity


def test_prune_forgets_files_idle_past_the_cutoff_and_reading_them_again_counts_nothing_twice(
    store: Store, tmp_path: Path
) -> None:
    cutoff = DAY + 3 * PERIOD
    # A file's state goes when its last import came a period and a day (the clocks' slack)
    # before the cutoff; each file was imported after its records were written.
    forgotten_before = cutoff - PERIOD - SECONDS_PER_DAY
    idle = write_history(tmp_path / "idle", [record(time=DAY + 5)])
    boundary = write_history(tmp_path / "boundary", [record(domain="other.example", time=DAY + 5)])
    recent = write_history(tmp_path / "recent", [record(time=DAY + 2 * PERIOD + 5)])
    run_import(store, idle, boundary, recent)
    idle_identity = file_imported_at(store, idle, forgotten_before - 1)
    boundary_identity = file_imported_at(store, boundary, forgotten_before)
    recent_identity = file_imported_at(store, recent, DAY + 2 * PERIOD + 10)
    dry = store.prune(cutoff, period=PERIOD, dry_run=True)
    assert (dry.history_files, store.imported_bytes(idle_identity)) == (1, idle.stat().st_size)
    assert store.prune(cutoff, period=PERIOD) == PruneOutcome(periods=2, undelivered=2, history_files=1)
    assert store.imported_bytes(idle_identity) == 0
    assert store.imported_bytes(boundary_identity) == boundary.stat().st_size
    assert store.imported_bytes(recent_identity) == recent.stat().st_size
    kept = {("sender.example", DAY + 2 * PERIOD): 1}
    assert counts(store) == kept
    # The idle file is read again from its start: what it held before is skipped, what was
    # appended since is counted once.
    write_history(idle, [record(time=cutoff + 5)], mode="ab")
    outcome = run_import(store, idle, ended_before=cutoff)
    assert (outcome.expired, outcome.records) == (1, 1)
    assert counts(store) == {**kept, ("sender.example", cutoff): 1}


def test_a_dry_run_prune_counts_and_deletes_nothing(store: Store, tmp_path: Path) -> None:
    run_import(store, write_history(tmp_path / "h", [record(), record(time=DAY + PERIOD + 5)]))
    before = stored_periods(store)
    outcome = store.prune(FIRST_DAY.end + 1, period=PERIOD, dry_run=True)
    assert outcome == PruneOutcome(periods=1, undelivered=1)
    assert stored_periods(store) == before

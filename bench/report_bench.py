"""Benchmark of the report store (issue 13): import a large history file, then build every report.

Not a test. Writes a synthetic history file (default 1,000,000 lines over 10,000 policy domains,
one UTC day, a few source addresses per domain, a fifth of the messages failing DMARC), then for
SQLite and for PostgreSQL (Debian's, started in a temporary directory on loopback with fsync on,
as tests/pgserver.py does) measures in a fresh process each:

- import: ``import_files`` of the whole file into an empty store;
- aggregate: ``due_reports`` after the day ended, every ``ReportData`` built and turned into its
  gzipped RFC 9990 document (what ``report send`` builds);
- the process's peak RSS (import streams the file: memory follows the distinct rows of a batch,
  not the file size).

    .venv/bin/python bench/report_bench.py [--lines N] [--domains N] [--sqlite-only] [--dir DIR]

Results: bench/README.md, section "Report store".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401  (puts tests/ on sys.path)

from authmilter.history import encode_record
from authmilter.reports.delivery import compress, report_id
from authmilter.reports.importer import import_files
from authmilter.reports.store import open_store
from authmilter.reports.xml import ReporterInfo, report_xml
from historydata import DAY, record
from pgserver import PostgresServer

PERIOD = 86400
SOURCES_PER_DOMAIN = 4
FAILING_SHARE = 0.2


def write_history(path: Path, lines: int, domains: int, seed: int = 13) -> None:
    """``lines`` records spread over ``domains`` policy domains within one UTC day."""
    rng = random.Random(seed)
    templates = {}
    for number in range(domains):
        domain = f"d{number}.sender.example"
        for aligned in (True, False):
            templates[(number, aligned)] = record(domain=domain, aligned=aligned)
    with path.open("wb") as out:
        for index in range(lines):
            number = rng.randrange(domains)
            made = templates[(number, rng.random() >= FAILING_SHARE)]
            made["time"] = DAY + index * PERIOD // lines
            made["queue_id"] = f"Q{index:09d}"
            made["source_ip"] = f"192.0.{number % 250}.{rng.randrange(SOURCES_PER_DOMAIN) + 1}"
            out.write(encode_record(made))


def measure(url: str, history: str) -> dict[str, float]:
    """In this (fresh) process: import, then build every report; times and peak RSS."""
    with open_store(url) as store:
        started, started_cpu = time.perf_counter(), time.process_time()
        outcome = import_files(store, [history], period=PERIOD)
        imported = time.perf_counter()
        reports = rows = compressed = 0
        reporter = ReporterInfo("Receiver Org", "dmarc-reports@receiver.example")
        for report in store.due_reports(DAY + PERIOD):
            reports += 1
            rows += len(report.rows)
            # What `report send` builds for each: the RFC 9990 document, gzipped.
            compressed += len(compress(report_xml(report, reporter, report_id("receiver.example", report))))
        done, done_cpu = time.perf_counter(), time.process_time()
    return {
        "records": outcome.records,
        "import_s": imported - started,
        "aggregate_s": done - imported,
        "cpu_s": done_cpu - started_cpu,
        "load": os.getloadavg()[0],
        "reports": reports,
        "rows": rows,
        "gzip_mb": compressed / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_measurement(url: str, history: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--measure", url, str(history)],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    measured: dict[str, float] = json.loads(result.stdout.splitlines()[-1])
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL")
    parser.add_argument(
        "--dir", type=Path, help="where the history and SQLite files go (default: a temp dir)"
    )
    parser.add_argument("--measure", nargs=2, metavar=("URL", "HISTORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="authmilter-report-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    history = workdir / "history.jsonl"
    started = time.perf_counter()
    write_history(history, args.lines, args.domains)
    print(
        f"history: {args.lines} lines, {args.domains} domains, {history.stat().st_size / 1e6:.0f} MB "
        f"(written in {time.perf_counter() - started:.1f} s)"
    )
    for old in workdir.glob("reports.sqlite*"):
        old.unlink()  # an earlier run's store would find the file imported already
    results = {"SQLite (WAL)": run_measurement(f"sqlite://{workdir}/reports.sqlite", history)}
    if not args.sqlite_only:
        with PostgresServer(durable=True) as server:
            results["PostgreSQL 15"] = run_measurement(server.create_database("reports"), history)
    print("| store | import | aggregate | total | our CPU | reports | rows | peak RSS | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if r["records"] != args.lines:
            raise SystemExit(f"{name}: imported {r['records']:.0f} of {args.lines} records")
        print(
            f"| {name} | {r['import_s']:.1f} s | {r['aggregate_s']:.1f} s | "
            f"{r['import_s'] + r['aggregate_s']:.1f} s | {r['cpu_s']:.1f} s | {r['reports']:.0f} | "
            f"{r['rows']:.0f} | {r['peak_rss_mb']:.0f} MB | {r['load']:.1f} |"
        )
    history.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

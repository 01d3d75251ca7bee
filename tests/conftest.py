"""Fixtures shared by the whole test session."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dnsserver import AuthoritativeDns, DnsServerMissing
from pgserver import PostgresError, PostgresServer


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthoritativeDns]:
    """One real authoritative DNS server (Knot) on 127.0.0.1 for the session; add zones, then reload().

    Tests that stop it (DNS outage) must start it again before they end.
    """
    try:
        server = AuthoritativeDns(tmp_path_factory.mktemp("dns"))
    except DnsServerMissing as e:
        # A missing server is a broken set-up, not a reason to skip the tests that need it.
        raise pytest.fail.Exception(str(e), pytrace=False) from None
    # The parent of every test zone: names outside the child zones get NXDOMAIN, as from real DNS,
    # instead of REFUSED (which a resolver reports as a temporary failure).
    server.add_zone("example", "")
    with server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server (Debian's) on 127.0.0.1 for the session (tests/pgserver.py)."""
    try:
        with PostgresServer() as server:
            yield server
    except PostgresError as e:
        raise pytest.fail.Exception(str(e), pytrace=False) from None


_DATABASE_NUMBERS = itertools.count(1)


@pytest.fixture(params=["sqlite", "postgresql"])
def report_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty report database, once SQLite and once PostgreSQL (same tests, both stores)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/reports.sqlite"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"reports_{next(_DATABASE_NUMBERS)}")


_CONFORMANCE_LINES: list[str] = []


@pytest.fixture
def conformance_report() -> Callable[[str], None]:
    """Record a conformance-suite pass count; it is printed in the summary of every run."""
    return _CONFORMANCE_LINES.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _CONFORMANCE_LINES:
        terminalreporter.section("conformance suites")
        for line in _CONFORMANCE_LINES:
            terminalreporter.write_line(line)

"""``authmilter report send``: options, output, exit status, --out, --dry-run, a second run.

The ``[reports]`` section and the store come from the other half of issue 13; until both are
merged, these tests hand the command a section and an in-memory store through the two functions
that look them up.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from authmilter import cli
from authmilter.reports.delivery import report_filename, report_id
from dnsserver import AuthoritativeDns, free_port
from reportdata import PERIOD, MemoryStore, report
from smtprelay import HOST, RelayHandler, running_relay

DOMAIN = "rpt-cli.example"
UNTIL = "2025-12-06"  # PERIOD ends at 2025-12-06 00:00:00 UTC


@pytest.fixture
def config_file(tmp_path: Path, dns_server: AuthoritativeDns) -> Path:
    path = tmp_path / "authmilter.toml"
    path.write_text(f'[dns]\nnameservers = ["{dns_server.host}"]\nport = {dns_server.port}\ntimeout = 2.0\n')
    return path


class StoreError(Exception):
    pass


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> MemoryStore:
    memory = MemoryStore([report(DOMAIN, (f"mailto:dmarc@{DOMAIN}",))])
    stores = SimpleNamespace(open_store=lambda url: memory, StoreError=StoreError)
    monkeypatch.setattr(cli, "_report_store_module", lambda: stores)
    return memory


@pytest.fixture
def handler() -> RelayHandler:
    return RelayHandler()


@pytest.fixture
def relay_port(handler: RelayHandler, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    with running_relay(handler) as port:
        section_for(monkeypatch, port)
        yield port


def section_for(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    section = SimpleNamespace(
        database="sqlite:///unused",
        org_name="Receiver Org",
        email="dmarc-reports@receiver.example",
        smtp_host=HOST,
        smtp_port=port,
        smtp_starttls="no",
    )
    monkeypatch.setattr(cli, "_reports_section", lambda config: section)


def send(config_file: Path, *options: str) -> int:
    return cli.main(["report", "send", "--config", str(config_file), "--until", UNTIL, *options])


def test_send_mails_the_report_once(
    config_file: Path,
    store: MemoryStore,
    handler: RelayHandler,
    relay_port: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert send(config_file) == 0
    out = capsys.readouterr().out
    data = store.reports[0]
    name = report_filename("receiver.example", data, report_id("receiver.example", data))
    assert out == f"{DOMAIN} {PERIOD.begin}-{PERIOD.end - 1}: sent to dmarc@{DOMAIN} {name}\n"
    assert len(handler.received) == 1 and len(store.delivered) == 1
    assert send(config_file) == 0
    assert capsys.readouterr().out == "no report due\n"
    assert len(handler.received) == 1


def test_dry_run_prints_and_records_nothing(
    config_file: Path,
    store: MemoryStore,
    handler: RelayHandler,
    relay_port: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert send(config_file, "--dry-run") == 0
    expected = f"dry run: {DOMAIN} {PERIOD.begin}-{PERIOD.end - 1}: would send to dmarc@{DOMAIN} "
    assert capsys.readouterr().out.startswith(expected)
    assert handler.received == [] and store.delivered == {}


def test_out_writes_files(
    config_file: Path, store: MemoryStore, relay_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert send(config_file, "--out", str(out)) == 0
    files = list(out.iterdir())
    assert len(files) == 1 and files[0].name.endswith(".xml.gz")
    assert f": written to dmarc@{DOMAIN} {files[0]}" in capsys.readouterr().out
    assert len(store.delivered) == 1


def test_a_period_not_yet_ended_is_not_due(
    config_file: Path, store: MemoryStore, relay_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", "send", "--config", str(config_file), "--until", "2025-12-05T23:59:59"]) == 0
    assert capsys.readouterr().out == "no report due\n"


def test_a_relay_that_is_down_exits_1_and_keeps_the_report(
    config_file: Path, store: MemoryStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    section_for(monkeypatch, free_port(HOST))
    assert send(config_file) == 1
    assert ": failed to dmarc@" in capsys.readouterr().out
    assert store.delivered == {}


def test_a_store_error_is_a_clear_error(
    config_file: Path, relay_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def down(url: str) -> MemoryStore:
        raise StoreError(f"report store {url}: cannot connect: connection refused")

    stores = SimpleNamespace(open_store=down, StoreError=StoreError)
    monkeypatch.setattr(cli, "_report_store_module", lambda: stores)
    assert send(config_file) == 1
    error = "authmilter: report store sqlite:///unused: cannot connect: connection refused\n"
    assert capsys.readouterr().err == error


def test_a_config_without_reports_is_refused(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert send(config_file) == 1
    assert "no [reports] section" in capsys.readouterr().err


def test_bad_options_are_usage_errors(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "send", "--config", str(config_file), "--until", "yesterday"])
    assert exit_info.value.code == 2
    assert "'yesterday' is neither seconds since the epoch nor" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "send", "--config", str(config_file), "--out", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1764979200", 1764979200),
        ("2025-12-06", 1764979200),
        ("2025-12-06T01:30", 1764979200 + 5400),
        ("2025-12-06T01:30:00+01:00", 1764979200 + 1800),
    ],
)
def test_until_accepts_epoch_seconds_and_iso_dates(text: str, expected: int) -> None:
    assert cli.parse_until(text) == expected
    assert datetime.datetime.fromtimestamp(PERIOD.end, datetime.UTC).date().isoformat() == UNTIL

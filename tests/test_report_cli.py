"""``authmilter report import`` and ``report show``: parsing, output, exit status."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authmilter.cli import main, parse_args, parse_time
from authmilter.reports.store import open_store
from dnsserver import AuthoritativeDns, free_port
from historydata import DAY, record, write_history
from smtprelay import HOST, RelayHandler, running_relay

NOW = 1_800_000_000


def write_config(tmp_path: Path, database: str, history: str = "", extra: str = "") -> Path:
    config = tmp_path / "authmilter.toml"
    config.write_text(
        f'[milter]\nauthserv_id = "mx.receiver.example"\n[history]\npath = "{history}"\n'
        f'[reports]\ndatabase = "{database}"\n{extra}'
    )
    return config


def test_import_then_show_on_both_databases(
    report_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = write_history(
        tmp_path / "history.jsonl",
        [record(), record(), record(aligned=False, source_ip="198.51.100.7"), record(action="tempfail")],
    )
    config = write_config(tmp_path, report_database)
    assert main(["report", "import", "--config", str(config), str(history)]) == 0
    assert "imported 3 record(s) from 1 file(s)" in capsys.readouterr().out
    assert main(["report", "import", "--config", str(config), str(history)]) == 0
    assert "imported 0 record(s)" in capsys.readouterr().out

    assert main(["report", "show", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "sender.example: 3 message(s), 2026-12-05 00:00 UTC to 2026-12-06 00:00 UTC" in text
    assert "1 not yet reported" in text
    assert "reports to    mailto:dmarc@sender.example" in text
    assert "DMARC         fail 1, pass 2" in text
    assert "top sources   192.0.2.25 2, 198.51.100.7 1" in text

    assert main(["report", "show", "--config", str(config), "--json", "--domain", "Sender.Example."]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["messages"] == 3 and shown["dmarc"] == {"pass": 2, "fail": 1}
    assert shown["periods"] == [{"begin": DAY, "end": DAY + 86400, "report_id": None}]
    assert shown["rua"] == ["mailto:dmarc@sender.example"]


def test_import_reads_the_configured_history_and_its_rotated_copies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = write_history(tmp_path / "history.jsonl", [record(queue_id="LIVE")])
    older = b"".join(json.dumps(record(queue_id=f"OLD{i}")).encode() + b"\n" for i in range(2))
    (tmp_path / "history.jsonl.2.gz").write_bytes(gzip.compress(older))
    config = write_config(tmp_path, f"sqlite://{tmp_path}/reports.sqlite", history=str(live))
    assert main(["report", "import", "--config", str(config)]) == 0
    assert "imported 3 record(s) from 2 file(s)" in capsys.readouterr().out


def test_import_without_files_or_history_path_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f"sqlite://{tmp_path}/reports.sqlite")
    assert main(["report", "import", "--config", str(config)]) == 1
    assert "[history] path is not set: give the HISTORY files to import" in capsys.readouterr().err


def test_an_unreadable_file_fails_the_import_and_a_vanished_one_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f"sqlite://{tmp_path}/reports.sqlite")
    good = write_history(tmp_path / "history.jsonl", [record()])
    assert main(["report", "import", "--config", str(config), str(tmp_path / "gone"), str(good)]) == 0
    assert "gone: not found (rotated away, or not written yet)" in capsys.readouterr().out
    assert main(["report", "import", "--config", str(config), str(tmp_path)]) == 1
    assert f"{tmp_path}: cannot open" in capsys.readouterr().out


def test_a_database_that_is_down_fails_with_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://reports@127.0.0.1:{free_port('127.0.0.1')}/reports"
    config = write_config(tmp_path, url)
    history = write_history(tmp_path / "history.jsonl", [record()])
    assert main(["report", "import", "--config", str(config), str(history)]) == 1
    assert f"authmilter: report database {url}: cannot connect" in capsys.readouterr().err


def test_show_on_an_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, f"sqlite://{tmp_path}/reports.sqlite")
    assert main(["report", "show", "--config", str(config), "--since", "2026-12-01"]) == 0
    assert capsys.readouterr().out.strip() == "no records in the report store"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1796428800", DAY),
        ("2026-12-05", DAY),
        ("2026-12-05T10:00", DAY + 36000),
        ("2026-12-05T10:00+01:00", DAY + 32400),
        ("2d", NOW - 2 * 86400),
        ("12h", NOW - 12 * 3600),
    ],
)
def test_times_on_the_command_line(text: str, expected: int) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "5m", "d", "2026-13-01"])
def test_a_bad_time_is_a_usage_error(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, f"sqlite://{tmp_path}/reports.sqlite")
    with pytest.raises(SystemExit) as info:
        parse_args(["report", "show", "--config", str(config), "--since", text])
    assert info.value.code == 2
    assert f"--since: '{text}' is not a time" in capsys.readouterr().err


def test_report_needs_a_subcommand() -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["report"])
    assert info.value.code == 2


# --- report send: a real SQLite store, filled by report import, and a loopback relay ---------------

SEND_DOMAIN = "rpt-cli.example"
SEND_UNTIL = str(DAY + 86400)  # the day of the records has ended


@pytest.fixture
def relay() -> Iterator[tuple[RelayHandler, int]]:
    handler = RelayHandler()
    with running_relay(handler) as port:
        yield handler, port


def send_site(tmp_path: Path, dns_server: AuthoritativeDns, relay_port: int) -> Path:
    """A config whose store holds one ended day of one domain's mail (imported, as in production)."""
    history = write_history(
        tmp_path / "history.jsonl",
        [
            record(domain=SEND_DOMAIN, time=DAY + 60),
            record(domain=SEND_DOMAIN, time=DAY + 120, aligned=False),
        ],
    )
    config = write_config(
        tmp_path,
        f"sqlite://{tmp_path}/reports.sqlite",
        str(history),
        extra=f'org_name = "Receiver Org"\nemail = "dmarc-reports@receiver.example"\n'
        f'smtp_host = "{HOST}"\nsmtp_port = {relay_port}\nsmtp_starttls = "no"\n'
        f'[dns]\nnameservers = ["{dns_server.host}"]\nport = {dns_server.port}\ntimeout = 2.0\n',
    )
    assert main(["report", "import", "--config", str(config)]) == 0
    return config


def send(config: Path, *options: str) -> int:
    return main(["report", "send", "--config", str(config), "--until", SEND_UNTIL, *options])


def test_send_mails_each_report_once(
    tmp_path: Path,
    dns_server: AuthoritativeDns,
    relay: tuple[RelayHandler, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler, port = relay
    config = send_site(tmp_path, dns_server, port)
    capsys.readouterr()
    assert send(config) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{SEND_DOMAIN} {DAY}-{DAY + 86399}: sent to dmarc@{SEND_DOMAIN} "), out
    assert len(handler.received) == 1
    assert send(config) == 0, "a second run delivers nothing again"
    assert capsys.readouterr().out == "no report due\n"
    assert len(handler.received) == 1


def test_dry_run_prints_and_records_nothing_and_out_writes_files(
    tmp_path: Path,
    dns_server: AuthoritativeDns,
    relay: tuple[RelayHandler, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler, port = relay
    config = send_site(tmp_path, dns_server, port)
    capsys.readouterr()
    assert send(config, "--dry-run") == 0
    assert capsys.readouterr().out.startswith(f"dry run: {SEND_DOMAIN} {DAY}-{DAY + 86399}: would send to ")
    assert handler.received == []
    out = tmp_path / "out"
    out.mkdir()
    assert send(config, "--out", str(out)) == 0
    files = list(out.iterdir())
    assert len(files) == 1 and files[0].name.endswith(".xml.gz")
    assert f": written to dmarc@{SEND_DOMAIN} {files[0]}" in capsys.readouterr().out
    assert send(config) == 0 and handler.received == [], "the written report counts as delivered"


def test_a_period_not_yet_ended_is_not_due(
    tmp_path: Path,
    dns_server: AuthoritativeDns,
    relay: tuple[RelayHandler, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = send_site(tmp_path, dns_server, relay[1])
    capsys.readouterr()
    assert main(["report", "send", "--config", str(config), "--until", str(DAY + 86399)]) == 0
    assert capsys.readouterr().out == "no report due\n"


def test_a_relay_that_is_down_exits_1_and_keeps_the_report(
    tmp_path: Path,
    dns_server: AuthoritativeDns,
    relay: tuple[RelayHandler, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = send_site(tmp_path, dns_server, free_port(HOST))
    capsys.readouterr()
    assert send(config) == 1
    assert ": failed to dmarc@" in capsys.readouterr().out
    handler, port = relay
    config.write_text(_with_relay_port(config.read_text(), port))
    assert send(config) == 0 and len(handler.received) == 1, "the report was kept for the next run"


def _with_relay_port(text: str, port: int) -> str:
    return "\n".join(
        f"smtp_port = {port}" if line.startswith("smtp_port") else line for line in text.splitlines()
    )


def test_send_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, f"sqlite://{tmp_path}/reports.sqlite")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "send", "--config", str(config), "--until", "yesterday"])
    assert exit_info.value.code == 2
    assert "--until: 'yesterday' is not a time" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "send", "--config", str(config), "--out", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "not a directory" in capsys.readouterr().err


# --- report prune, and report send pruning after it sent ([reports] keep_days) ----------------------

OLD_DAY = DAY - 40 * 86400  # a day whose period is removed, where DAY's stays


def keep_days_line() -> str:
    """``keep_days`` such that the cutoff (now - keep_days) falls 9-10 days before DAY, whatever now is."""
    return f"keep_days = {(int(time.time()) - DAY) // 86400 + 10}\n"


def test_prune_removes_the_old_periods_and_counts_the_reports_never_delivered(
    report_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = write_history(tmp_path / "history.jsonl", [record(time=OLD_DAY + 60), record()])
    # Imported while the store keeps everything: an import skips what keep_days would prune.
    config = write_config(tmp_path, report_database, extra="keep_days = 0\n")
    assert main(["report", "import", "--config", str(config), str(history)]) == 0
    write_config(tmp_path, report_database, extra=keep_days_line())
    capsys.readouterr()
    assert main(["report", "prune", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: would remove 1 period(s) that ended before "), out
    assert "; 1 of them have a report due and not delivered, lost once removed" in out
    assert main(["report", "prune", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed 1 period(s) that ended before "), out
    assert "; 1 of them had a report due and never delivered, now lost" in out
    assert main(["report", "show", "--config", str(config), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["messages"] == 1 and [p["begin"] for p in shown["periods"]] == [DAY]
    assert main(["report", "prune", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("removed 0 period(s)")


def test_prune_names_the_history_files_whose_import_offsets_it_forgot(
    report_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = write_history(tmp_path / "history.jsonl", [record(time=OLD_DAY + 60)])
    config = write_config(tmp_path, report_database, extra="keep_days = 0\n")
    assert main(["report", "import", "--config", str(config), str(history)]) == 0
    with open_store(report_database) as store, store._db.transaction() as db:
        db.execute("UPDATE imported_files SET updated_at = ?", (OLD_DAY + 3600,))
    write_config(tmp_path, report_database, extra=keep_days_line())
    capsys.readouterr()
    assert main(["report", "prune", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed 1 period(s) that ended before "), out
    assert ", and the import offsets of 1 history file(s) last imported a period and a day before that" in out


def test_keep_days_0_keeps_everything(
    tmp_path: Path,
    dns_server: AuthoritativeDns,
    relay: tuple[RelayHandler, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler, port = relay
    config = prune_site(tmp_path, dns_server, port, keep_days="keep_days = 0\n")
    capsys.readouterr()
    assert main(["report", "prune", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out == "[reports] keep_days = 0: the store keeps every period; nothing removed\n"
    assert send(config) == 0 and len(handler.received) == 2
    assert "removed" not in capsys.readouterr().out
    assert main(["report", "show", "--config", str(config), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert [p["begin"] for p in shown["periods"]] == [OLD_DAY, DAY]


def prune_site(
    tmp_path: Path, dns_server: AuthoritativeDns, relay_port: int, keep_days: str = ""
) -> Path:
    """send_site's store with one more report due, of a day old enough to be pruned."""
    config = send_site(tmp_path, dns_server, relay_port)
    # Imported while the store keeps everything: an import skips what keep_days would prune.
    config.write_text(config.read_text().replace("[dns]\n", "keep_days = 0\n[dns]\n"))
    old = write_history(tmp_path / "old.jsonl", [record(domain=SEND_DOMAIN, time=OLD_DAY + 60)])
    assert main(["report", "import", "--config", str(config), str(old)]) == 0
    config.write_text(config.read_text().replace("keep_days = 0\n", keep_days or keep_days_line()))
    return config


def test_import_skips_the_periods_keep_days_prunes(
    report_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A history file older than keep_days (a rotated copy, a late import) must not bring back the
    # periods the store pruned, nor get their reports sent weeks late.
    history = write_history(tmp_path / "history.jsonl", [record(time=OLD_DAY + 60), record()])
    config = write_config(tmp_path, report_database, extra=keep_days_line())
    assert main(["report", "import", "--config", str(config), str(history)]) == 0
    out = capsys.readouterr().out
    assert "imported 1 record(s)" in out and ", 1 of periods older than [reports] keep_days" in out
    assert main(["report", "show", "--config", str(config), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert [p["begin"] for p in shown["periods"]] == [DAY]


def test_send_prunes_after_sending(
    tmp_path: Path,
    dns_server: AuthoritativeDns,
    relay: tuple[RelayHandler, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler, port = relay
    config = prune_site(tmp_path, dns_server, port)
    capsys.readouterr()
    assert send(config) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(handler.received) == 2, "the old period's report is sent before its period goes"
    assert lines[-1].startswith("removed 1 period(s) that ended before "), lines
    assert "never delivered" not in lines[-1]
    assert send(config) == 0
    assert capsys.readouterr().out == "no report due\n", "nothing removed: no line"


def test_send_says_when_a_pruned_report_was_never_delivered(
    tmp_path: Path, dns_server: AuthoritativeDns, capsys: pytest.CaptureFixture[str]
) -> None:
    config = prune_site(tmp_path, dns_server, free_port(HOST))
    capsys.readouterr()
    assert send(config) == 1
    out = capsys.readouterr().out
    assert ": failed to dmarc@" in out
    assert "removed 1 period(s) that ended before " in out
    assert "; 1 of them had a report due and never delivered, now lost" in out


def test_a_dry_run_send_prunes_nothing(
    tmp_path: Path,
    dns_server: AuthoritativeDns,
    relay: tuple[RelayHandler, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler, port = relay
    config = prune_site(tmp_path, dns_server, port)
    capsys.readouterr()
    assert send(config, "--dry-run") == 0
    assert "removed" not in capsys.readouterr().out
    assert send(config) == 0 and len(handler.received) == 2, "both reports were still there"

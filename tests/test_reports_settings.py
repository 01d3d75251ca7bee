"""The ``[reports]`` section: defaults from the authserv-id, and every value validated at load."""

from __future__ import annotations

import pytest

from authmilter.config import ConfigError, default_config, parse_config
from authmilter.reports import period_start

CONFIG = "/etc/authmilter/authmilter.toml"


def test_a_database_alone_is_enough_and_names_come_from_the_authserv_id() -> None:
    config = parse_config(
        '[milter]\nauthserv_id = "mx.receiver.example"\n[reports]\ndatabase = "postgresql://reports@db/reports"\n',
        CONFIG,
    )
    reports = config.reports
    assert reports.database == "postgresql://reports@db/reports"
    assert reports.org_name == "mx.receiver.example"
    assert (
        reports.email == reports.envelope_sender == reports.from_address == "postmaster@mx.receiver.example"
    )
    assert (reports.period, reports.smtp_host, reports.smtp_port, reports.smtp_starttls) == (
        86400,
        "127.0.0.1",
        25,
        "opportunistic",
    )


def test_the_built_in_defaults_are_complete() -> None:
    reports = default_config().reports
    assert reports.keep_days == 30
    assert reports.database == "sqlite:///var/lib/authmilter/reports.sqlite"
    assert reports.org_name and reports.email.startswith("postmaster@")


def test_given_names_and_addresses_are_kept() -> None:
    reports = parse_config(
        '[reports]\norg_name = "Receiver Inc."\nemail = "dmarc@receiver.example"\n'
        'from_address = "reports@receiver.example"\nsuppress_domains = ["Quiet.Example."]\n',
        CONFIG,
    ).reports
    assert (reports.org_name, reports.envelope_sender, reports.from_address) == (
        "Receiver Inc.",
        "dmarc@receiver.example",
        "reports@receiver.example",
    )
    assert reports.suppress_domains == ("quiet.example",)


@pytest.mark.parametrize("hours", [1, 2, 3, 4, 6, 8, 12, 24, 48, 168])
def test_periods_that_keep_to_utc_days_are_accepted(hours: int) -> None:
    assert parse_config(f"[reports]\nperiod = {hours * 3600}\n", CONFIG).reports.period == hours * 3600


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("period = 1800", r"out of range"),
        ("period = 5400", r"whole number of hours"),
        ("period = 18000", r"hours that divide a day"),
        ("period = 129600", r"hours that divide a day"),
        ("period = 691200", r"out of range"),
        ('database = "mysql://db/reports"', r"not a report database URL"),
        ('database = "sqlite://reports.sqlite"', r"absolute path"),
        ('email = "dmarc"', r"not a mail address"),
        ('envelope_sender = "a b@c"', r"not a mail address"),
        ('smtp_starttls = "yes"', r"not one of: no, opportunistic, required"),
        ("smtp_port = 0", r"out of range"),
        ('smtp_password_file = "secret"', r"absolute path"),
        ('smtp_user = "reports"', r"set smtp_user and smtp_password_file together"),
        ('suppress_domains = "x.example"', r"expected a list"),
        ("keep_days = -1", r"out of range \(0 to 3650\)"),
        ('keep_days = "30d"', r"expected an integer"),
    ],
)
def test_bad_values_name_the_file_line_and_key(line: str, problem: str) -> None:
    key = line.split(" ")[0]
    with pytest.raises(ConfigError, match=rf"^{CONFIG}:3: \[reports\] {key}: .*{problem}"):
        parse_config(f"[reports]\n# a comment\n{line}\n", CONFIG)


@pytest.mark.parametrize(
    ("time", "period", "start"),
    [(1796464800, 86400, 1796428800), (1796464800, 3600, 1796464800), (1796468399, 3600, 1796464800)],
)
def test_periods_start_on_hour_and_utc_day_boundaries(time: int, period: int, start: int) -> None:
    assert period_start(time, period) == start

"""DMARC aggregate reports (RFC 9990): the history file → a store of counts → reports.

Modules: ``model`` (the data of one report), ``aggregate`` (history record ↔ stored row key,
store → :class:`~authmilter.reports.model.ReportData`, the summaries of ``report show``),
``store`` (SQLite or PostgreSQL, one schema, migrations, delivery state and the send lock),
``importer`` (history files → store, idempotent). This module holds the ``[reports]`` settings,
validated where they are defined; config.py composes them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from authmilter.settings import bounded, one_of, validate

SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86400
# Longest period: a week. RFC 9990 expects daily reports; longer ones only delay feedback.
MAX_PERIOD = 7 * SECONDS_PER_DAY
# Longest [reports] keep_days: ten years; past that, 0 (keep everything) says what is meant.
MAX_KEEP_DAYS = 3650

SQLITE_PREFIX = "sqlite://"
POSTGRESQL_PREFIXES = ("postgresql://", "postgres://")
SMTP_STARTTLS_MODES = frozenset({"no", "opportunistic", "required"})

# Files read by `report send`, which may run from anywhere: absolute paths only.
_ABSOLUTE_PATH_EXAMPLES = {
    "smtp_password_file": "/etc/authmilter/smtp-password",
    "smtp_ca_file": "/etc/ssl/certs/relay-ca.pem",
}
_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+")


@dataclass(frozen=True)
class ReportsSettings:
    """Section ``[reports]``: the report store and how reports are made and sent.

    Attributes:
        database: the store: ``sqlite:///absolute/path`` (one MX) or ``postgresql://...``
            (psycopg 3 connection URL; shared by several MX hosts).
        period: the reporting period in seconds: a whole number of hours that divides a day,
            or a whole number of days (at most 7). Periods start at 00:00 UTC (RFC 7489 §7.2,
            kept by RFC 9990: hour boundaries, days from 00:00 UTC).
        keep_days: days a period stays in the store after it ended, delivered or not: ``report
            send`` then removes it with its rows (``report prune`` on demand); 0 = keep all.
        org_name: ``report_metadata/org_name``; empty = the authserv-id.
        email: ``report_metadata/email``; empty = ``postmaster@`` the authserv-id (a host that
            takes mail has a postmaster, RFC 5321 §4.5.1).
        extra_contact_info: ``report_metadata/extra_contact_info``; empty = none.
        suppress_domains: policy domains (and their subdomains) never reported on or to: their
            records are not imported and no report is made for them.
        smtp_host, smtp_port: the relay reports are sent through.
        smtp_starttls: "no", "opportunistic" (when offered) or "required".
        smtp_user: SMTP AUTH user; empty = no AUTH. Needs ``smtp_password_file``.
        smtp_password_file: a file holding the SMTP AUTH password (first line).
        envelope_sender: MAIL FROM of report messages; empty = ``email``.
        from_address: the From of report messages; empty = ``email``.
        smtp_ca_file: CA certificates that sign the relay's certificate with ``required``
            STARTTLS (absolute path); empty = the system's.
        smtp_timeout: seconds for one SMTP exchange with the relay.
    """

    database: str = "sqlite:///var/lib/authmilter/reports.sqlite"
    period: int = bounded(SECONDS_PER_DAY, SECONDS_PER_HOUR, MAX_PERIOD)
    keep_days: int = bounded(30, 0, MAX_KEEP_DAYS)
    org_name: str = ""
    email: str = ""
    extra_contact_info: str = ""
    suppress_domains: tuple[str, ...] = ()
    smtp_host: str = "127.0.0.1"
    smtp_port: int = bounded(25, 1, 65535)
    smtp_starttls: str = one_of("opportunistic", SMTP_STARTTLS_MODES)
    smtp_user: str = ""
    smtp_password_file: str = ""
    envelope_sender: str = ""
    from_address: str = ""
    smtp_ca_file: str = ""
    smtp_timeout: float = bounded(60.0, 1, 600)

    def __post_init__(self) -> None:
        validate(self)

    def with_defaults(self, authserv_id: str) -> ReportsSettings:
        """These settings with the empty names and addresses filled in from the authserv-id.

        Raises:
            SettingProblem: ``smtp_user`` without ``smtp_password_file`` or the reverse.
        """
        if bool(self.smtp_user) != bool(self.smtp_password_file):
            given = "smtp_user" if self.smtp_user else "smtp_password_file"
            raise SettingProblem(given, "set smtp_user and smtp_password_file together, or neither")
        email = self.email or f"postmaster@{authserv_id}"
        return dataclasses.replace(
            self,
            org_name=self.org_name or authserv_id,
            email=email,
            envelope_sender=self.envelope_sender or email,
            from_address=self.from_address or email,
        )


class SettingProblem(ValueError):
    """A ``[reports]`` value that is wrong only together with another one; names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


def check_setting(key: str, value: object) -> object:
    """Validate (and normalise) one ``[reports]`` value beyond its type.

    Returns:
        The value to keep.

    Raises:
        ValueError: the value is unusable; the text says why and what would do.
    """
    if key == "database" and isinstance(value, str):
        check_database_url(value)
    elif key == "period" and isinstance(value, int):
        check_period(value)
    elif key in ("email", "envelope_sender", "from_address") and isinstance(value, str):
        if value and not _ADDRESS.fullmatch(value):
            raise ValueError(f"'{value}' is not a mail address like dmarc-reports@example.org")
    elif key == "suppress_domains" and isinstance(value, tuple):
        return tuple(normalise_domain(d) for d in value)
    elif key in _ABSOLUTE_PATH_EXAMPLES and isinstance(value, str) and value and not value.startswith("/"):
        raise ValueError(f"must be an absolute path, e.g. {_ABSOLUTE_PATH_EXAMPLES[key]}")
    return value


def check_database_url(url: str) -> None:
    """``sqlite:///absolute/path`` or ``postgresql://...``.

    Raises:
        ValueError: another scheme, or a relative SQLite path.
    """
    if url.startswith(SQLITE_PREFIX):
        if not url[len(SQLITE_PREFIX) :].startswith("/"):
            raise ValueError(
                f"'{url}': give an absolute path, e.g. sqlite:///var/lib/authmilter/reports.sqlite"
            )
        return
    if not url.startswith(POSTGRESQL_PREFIXES):
        raise ValueError(
            f"'{url}' is not a report database URL: use sqlite:///PATH or postgresql://USER@HOST/DBNAME"
        )


def check_period(seconds: int) -> None:
    """A period that keeps to hour boundaries and to UTC days (RFC 7489 §7.2).

    Raises:
        ValueError: shorter than an hour, not whole hours, or not fitting whole into a day or a week.
    """
    if seconds < SECONDS_PER_HOUR or seconds % SECONDS_PER_HOUR:
        raise ValueError(f"{seconds} s: a period is a whole number of hours, at least 3600 (one hour)")
    if seconds > MAX_PERIOD:
        raise ValueError(f"{seconds} s: a period is at most {MAX_PERIOD} (7 days)")
    if SECONDS_PER_DAY % seconds and seconds % SECONDS_PER_DAY:
        raise ValueError(
            f"{seconds} s: choose hours that divide a day (1, 2, 3, 4, 6, 8, 12, 24 h) or whole days, "
            "so periods start at 00:00 UTC"
        )


def normalise_domain(name: str) -> str:
    """A domain as the history file writes it: lower case, no final dot."""
    return name.strip().rstrip(".").lower()


def is_within(domain: str, parents: tuple[str, ...]) -> bool:
    """Whether ``domain`` is one of ``parents`` or a subdomain of one (all normalised)."""
    return any(domain == parent or domain.endswith("." + parent) for parent in parents)


def period_start(time: int, period: int) -> int:
    """The start of the period that holds ``time``: epoch-aligned, so days begin at 00:00 UTC."""
    return time - time % period

"""Delivering aggregate reports: ``rua`` URIs, external destinations, naming, MIME, SMTP, files.

RFC 9990 ("Report Delivery", "Email", "Verifying External Destinations") read with RFC 9989.
Choices made where the RFCs leave room, or where this code reads them a particular way:

- URIs (RFC 9990 "Report Delivery": "If any of the URIs are malformed, they SHOULD be ignored").
  Only ``mailto:`` is supported ("Other Methods"); other schemes and malformed URIs are skipped
  with a log line. A ``mailto:`` must name exactly one address; header fields (``?subject=``)
  are ignored. At most :data:`MAX_DESTINATIONS` URIs per report are used.
- Size limits: RFC 7489's ``!size`` suffix (digits with an optional k/m/g/t unit) is parsed, so a
  URI carrying one is not taken for malformed, but the limit is not applied: RFC 9989 Appendix C.4
  removed the suffix and RFC 9990 dropped the rule that a report larger than the limit must not
  be sent there. A report is never split (RFC 9990 has no splitting); one the relay refuses
  as too large stays unsent and is logged, like any other refusal.
- External destinations: a destination whose Organizational Domain differs from the policy
  domain's is used only when ``<policy-domain>._report._dmarc.<destination host>`` has a TXT
  record starting with ``v=DMARC1``. When that record has a ``rua``, its URIs replace the
  destination, and they must all be on the same host, else neither is used (step 9). A DNS
  error there defers the whole report to the next run (step 5: "MAY elect to temporarily fail").
- Identity: the Report-ID and the file name's unique-id are one value ("MUST be identical"),
  derived from the report's receiver, policy domain and period: a report sent again after a
  crash carries the same file name (as "If a report generator needs to re-send a report" asks),
  Report-ID and Message-ID, so the Report Consumer can drop the duplicate.
- Delivery: one message per report, one SMTP transaction with every destination as a recipient.
  The report counts as delivered once the relay accepted it for at least one recipient (the
  relay queues and retries); refused recipients are logged. A relay that refuses the message or
  cannot be reached leaves the report unsent for the next run; after a connection, TLS or AUTH
  failure the run stops sending. A report with no usable destination is marked delivered
  without being sent (it would otherwise come back every run), with a log line saying why.
- Suppression: ``suppress_domains`` names domains never reported to: a destination on such a
  domain or below it is dropped (the store also leaves out reports whose policy domain is listed).
- Reports about our reports: history has no Subject or media type, so a received report cannot
  be told from other mail. Our own reports are never in history when they go out through the
  configured relay on an ``[milter] internal_hosts`` address (127.0.0.1 by default): the milter
  records no outbound mail. docs/reports.md says so.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import re
import smtplib
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formataddr, formatdate
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from authmilter.dmarc import DmarcSettings, organizational_domain, parse_dmarc_record
from authmilter.reports.model import ReportData, ReportPeriod
from authmilter.reports.xml import ReporterInfo, date_range, report_xml
from authmilter.resolver import DnsStatus, Resolver

log = logging.getLogger(__name__)

STARTTLS_MODES = ("no", "opportunistic", "required")
# RFC 9990 "Report Delivery": "up to the Receiver's limits on supported URIs"; history keeps 10.
MAX_DESTINATIONS = 10
# RFC 1035 §2.3.4.
MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
# RFC 7489 §6.4: "k" = kibibytes ... "t" = tebibytes; "the numeric portion MUST fit within an
# unsigned 64-bit integer".
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_SUFFIX = re.compile(r"!([0-9]+)([kmgt]?)$", re.IGNORECASE)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)
# A dot-atom local part (RFC 5322 §3.2.3); quoted local parts are not accepted in a rua.
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
# RFC 5322 §2.1.1: lines "MUST be no more than 998 characters"; the Subject's ABNF (RFC 9990
# "Email") has no room for encoded words, so it is folded only beyond that.
MESSAGE_POLICY = SMTP_POLICY.clone(max_line_length=998)
# Temporary files in --out start with this, so nothing picks up a half-written report.
TEMP_PREFIX = ".authmilter-report-"
REPORT_FILE_MODE = 0o640


class SettingsError(ValueError):
    """A delivery setting is unusable."""


@dataclass(frozen=True)
class DeliverySettings:
    """How reports are sent: who we are, the relay, the envelope.

    Attributes:
        org_name: the Reporting Organization (``org_name``; also the From display name).
        email: its contact address (``email``); the From address unless ``from_address`` is set.
        extra_contact_info: ``extra_contact_info``; omitted when empty.
        smtp_host: the relay.
        smtp_port: its port.
        smtp_starttls: ``no``; ``opportunistic`` (TLS when offered, certificate not checked, as
            Postfix's ``may``); ``required`` (TLS or nothing, certificate and host name checked).
        smtp_user: AUTH user name; empty: no AUTH.
        smtp_password_file: the file holding the AUTH password (its first line).
        smtp_ca_file: CA certificates for ``required``; empty: the system's.
        smtp_timeout: seconds for one SMTP exchange.
        envelope_sender: MAIL FROM; empty: the From address.
        from_address: the From address; empty: ``email``.
        suppress_domains: domains never reported to.
    """

    org_name: str
    email: str
    extra_contact_info: str = ""
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_starttls: str = "opportunistic"
    smtp_user: str = ""
    smtp_password_file: str = ""
    smtp_ca_file: str = ""
    smtp_timeout: float = 60.0
    envelope_sender: str = ""
    from_address: str = ""
    suppress_domains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.smtp_starttls not in STARTTLS_MODES:
            raise SettingsError(
                f"smtp_starttls must be one of {', '.join(STARTTLS_MODES)}, not {self.smtp_starttls!r}"
            )
        if self.smtp_user and not self.smtp_password_file:
            raise SettingsError("smtp_user is set but smtp_password_file is not: AUTH needs both")
        if "@" not in self.sender_address:
            raise SettingsError(f"the report From address {self.sender_address!r} has no domain")

    @property
    def sender_address(self) -> str:
        """The From address."""
        return self.from_address or self.email

    @property
    def envelope_address(self) -> str:
        """The MAIL FROM address."""
        return self.envelope_sender or self.sender_address

    @property
    def receiver(self) -> str:
        """The Mail Receiver's domain in file names and the Subject: the From address's domain."""
        return self.sender_address.rpartition("@")[2].lower()

    @property
    def reporter(self) -> ReporterInfo:
        return ReporterInfo(self.org_name, self.email, self.extra_contact_info)


class ReportStore(Protocol):
    """What delivery needs from the report store (authmilter.reports.store)."""

    def due_reports(self, until: int) -> Iterator[ReportData]:
        """Reports of closed periods ending by ``until``, undelivered, with a rua, not suppressed."""
        ...

    def mark_delivered(self, policy_domain: str, period: ReportPeriod, report_id: str) -> None: ...

    def send_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held while sending: exclusive across processes and hosts."""
        ...


# ---------------------------------------------------------------------------------------------
# rua URIs


class BadUri(ValueError):
    """A rua URI that is malformed or of a scheme we do not send to."""


@dataclass(frozen=True)
class Destination:
    """One ``mailto:`` rua URI.

    Attributes:
        uri: as published.
        address: the mailbox, local part as written, domain in lower-case A-label form.
        host: that domain.
        size_limit: the ``!size`` suffix in bytes, or None (parsed, not applied: see above).
    """

    uri: str
    address: str
    host: str
    size_limit: int | None = None


def parse_rua(uri: str) -> Destination:
    """Parse one rua URI.

    Raises:
        BadUri: not a URI, not ``mailto:``, not exactly one valid address, or a bad ``!size``.
    """
    text = uri.strip(" \t")
    size_limit = None
    if "!" in text:
        match = _SIZE_SUFFIX.search(text)
        if match is None or "!" in text[: match.start()]:
            raise BadUri("an exclamation point other than a !size suffix (RFC 7489 §6.4 wants it encoded)")
        size_limit = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if size_limit >= 1 << 64:
            raise BadUri("the !size limit does not fit in 64 bits")
        text = text[: match.start()]
    scheme = _SCHEME.fullmatch(text)
    if scheme is None:
        raise BadUri("not a URI (no scheme)")
    if scheme.group(1).lower() != "mailto":
        raise BadUri(f"unsupported scheme {scheme.group(1)!r}: only mailto: is supported")
    recipients = scheme.group(2).partition("?")[0]
    if "," in recipients:
        raise BadUri("more than one address")
    address = urllib.parse.unquote(recipients)
    local, at, domain = address.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local):
        raise BadUri(f"not a valid mailbox: {address!r}")
    host = _hostname(domain)
    if host is None:
        raise BadUri(f"not a valid domain: {domain!r}")
    return Destination(uri, f"{local}@{host}", host, size_limit)


def _hostname(domain: str) -> str | None:
    name = domain.rstrip(".")
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = name.split(".")
    if len(name) > MAX_NAME_LENGTH or len(labels) < 2:
        return None
    valid = all(_HOST_LABEL.fullmatch(label) and len(label) <= MAX_LABEL_LENGTH for label in labels)
    return name if valid else None


def parse_rua_list(policy_domain: str, uris: Sequence[str]) -> list[Destination]:
    """The usable destinations among ``uris``, in order; the others are logged and skipped."""
    destinations = []
    for uri in uris:
        try:
            destinations.append(parse_rua(uri))
        except BadUri as e:
            log.warning("report for %s: rua %r skipped: %s", policy_domain, uri, e)
    if len(destinations) > MAX_DESTINATIONS:
        log.warning(
            "report for %s: %d rua URIs, only the first %d are used",
            policy_domain,
            len(destinations),
            MAX_DESTINATIONS,
        )
    return destinations[:MAX_DESTINATIONS]


# ---------------------------------------------------------------------------------------------
# External destinations (RFC 9990 "Verifying External Destinations")


class DnsDeferred(Exception):
    """A DNS error while verifying a destination: try the report again on the next run."""


def verify_destination(
    policy_domain: str, destination: Destination, resolver: Resolver, dmarc: DmarcSettings
) -> list[Destination]:
    """The destinations to use for ``destination``: itself, its override, or none.

    Args:
        policy_domain: where the DMARC record was found (lower-case A-labels, as in history).
        destination: one parsed rua URI of that record.
        resolver: our resolver.
        dmarc: how Organizational Domains are found (tree walk or PSL), as for evaluation.

    Returns:
        ``[destination]`` when it is within the policy domain's Organizational Domain or the
        external destination is authorised; the authorising record's own rua destinations when it
        has any (all on the same host); ``[]`` when not authorised (logged).

    Raises:
        DnsDeferred: the TXT lookup failed temporarily.
    """
    policy_org = organizational_domain(policy_domain, resolver, dmarc)
    if organizational_domain(destination.host, resolver, dmarc) == policy_org:
        return [destination]
    name = f"{policy_domain}._report._dmarc.{destination.host}"
    if len(name) > MAX_NAME_LENGTH or any(len(label) > MAX_LABEL_LENGTH for label in name.split(".")):
        log.warning(
            "report for %s: %s skipped: %s is longer than DNS allows", policy_domain, destination.uri, name
        )
        return []
    answer = resolver.txt(name)
    if answer.status is DnsStatus.TEMPFAIL:
        raise DnsDeferred(f"TXT {name}: {answer.reason or 'temporary DNS failure'}")
    records = [r for r in (parse_dmarc_record(text) for text in answer.texts) if r is not None]
    if not records:
        log.warning(
            "report for %s: %s skipped: external destination not authorised (no v=DMARC1 TXT record at %s)",
            policy_domain,
            destination.uri,
            name,
        )
        return []
    if not records[0].rua:
        return [destination]
    overrides = parse_rua_list(policy_domain, records[0].rua)
    if not overrides or any(o.host != destination.host for o in overrides):
        log.warning(
            "report for %s: %s skipped: the rua override at %s is empty or names another host",
            policy_domain,
            destination.uri,
            name,
        )
        return []
    return overrides


def _suppressed(host: str, suppress_domains: Sequence[str]) -> bool:
    return any(host == d or host.endswith("." + d) for d in suppress_domains)


def usable_destinations(
    report: ReportData, settings: DeliverySettings, resolver: Resolver, dmarc: DmarcSettings
) -> list[Destination]:
    """Every destination of ``report`` to send to, verified, suppressed ones left out, no repeats.

    Raises:
        DnsDeferred: a verification lookup failed temporarily.
    """
    suppressed = tuple(d.lower().rstrip(".") for d in settings.suppress_domains)
    chosen: dict[str, Destination] = {}
    for destination in parse_rua_list(report.policy_domain, report.policy.rua):
        if _suppressed(destination.host, suppressed):
            log.info("report for %s: %s skipped: suppressed domain", report.policy_domain, destination.uri)
            continue
        if destination.size_limit is not None:
            log.info(
                "report for %s: %s: size limit not applied (RFC 9989 Appendix C.4 removed it)",
                report.policy_domain,
                destination.uri,
            )
        for verified in verify_destination(report.policy_domain, destination, resolver, dmarc):
            chosen.setdefault(verified.address.lower(), verified)
    return list(chosen.values())


# ---------------------------------------------------------------------------------------------
# Naming and the message (RFC 9990 "Email")


def report_id(receiver: str, report: ReportData) -> str:
    """The Report-ID, also the file name's unique-id: ``1*(ALPHA / DIGIT)``, the same on every run."""
    begin, end = date_range(report.period)
    return hashlib.sha256(f"{receiver}!{report.policy_domain}!{begin}!{end}".encode()).hexdigest()[:32]


def report_filename(receiver: str, report: ReportData, unique_id: str) -> str:
    """``receiver "!" policy-domain "!" begin-timestamp "!" end-timestamp "!" unique-id ".xml.gz"``."""
    begin, end = date_range(report.period)
    return f"{receiver}!{report.policy_domain}!{begin}!{end}!{unique_id}.xml.gz"


def report_subject(receiver: str, report: ReportData, unique_id: str) -> str:
    """``Report Domain: <policy domain> Submitter: <receiver> Report-ID: <id>``."""
    return f"Report Domain: {report.policy_domain} Submitter: {receiver} Report-ID: <{unique_id}>"


def compress(document: bytes) -> bytes:
    """GZIP (RFC 1952) with no file name and mtime 0, so the same report gives the same bytes."""
    return gzip.compress(document, mtime=0)


@dataclass(frozen=True)
class BuiltReport:
    """A report ready to deliver."""

    report: ReportData
    report_id: str
    filename: str
    subject: str
    gzipped: bytes


def build_report(report: ReportData, settings: DeliverySettings) -> BuiltReport:
    receiver = settings.receiver
    unique_id = report_id(receiver, report)
    document = report_xml(report, settings.reporter, unique_id)
    return BuiltReport(
        report,
        unique_id,
        report_filename(receiver, report, unique_id),
        report_subject(receiver, report, unique_id),
        compress(document),
    )


def build_message(
    built: BuiltReport, settings: DeliverySettings, recipients: Sequence[str], date: float | None = None
) -> EmailMessage:
    """The report mail: a text/plain annotation and the ``application/gzip`` report (RFC 9990 "Email")."""
    message = EmailMessage(policy=MESSAGE_POLICY)
    message["From"] = formataddr((settings.org_name, settings.sender_address))
    message["To"] = ", ".join(recipients)
    message["Subject"] = built.subject
    message["Date"] = formatdate(date, usegmt=True)
    # RFC 9990 "Email": the sender "MAY choose to use the same ridtxt" in the Message-Id.
    message["Message-ID"] = f"<{built.report_id}@{settings.receiver}>"
    # RFC 3834 §5: no auto-replies (vacation notices) to a report.
    message["Auto-Submitted"] = "auto-generated"
    begin, end = date_range(built.report.period)
    message.set_content(
        f"DMARC aggregate report (RFC 9990) for {built.report.policy_domain} from {settings.org_name},\n"
        f"covering {_utc(begin)} to {_utc(end)} UTC. The report is attached.\n"
        f"Contact: {settings.email}\n"
    )
    message.add_attachment(built.gzipped, maintype="application", subtype="gzip", filename=built.filename)
    return message


def _utc(timestamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


# ---------------------------------------------------------------------------------------------
# SMTP


class RelayError(Exception):
    """The relay did not take the message; it stays unsent."""


class RelayUnavailable(RelayError):
    """No usable session with the relay (connection, TLS or AUTH): stop sending for this run."""


class SmtpRelay:
    """One SMTP session with the relay, opened on first use and reused for every report.

    Args:
        settings: relay, STARTTLS mode, AUTH.
    """

    def __init__(self, settings: DeliverySettings) -> None:
        self.settings = settings
        self._smtp: smtplib.SMTP | None = None

    def __enter__(self) -> SmtpRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                self._smtp.quit()
            self._smtp = None

    def send(self, envelope_sender: str, recipients: Sequence[str], data: bytes) -> dict[str, str]:
        """Send one message.

        Returns:
            The recipients the relay refused, each with its reply (the others were accepted).

        Raises:
            RelayError: the relay took the message for no recipient.
            RelayUnavailable: no session could be opened or it broke.
        """
        smtp = self._session()
        try:
            refused = smtp.sendmail(envelope_sender, list(recipients), data)
        except smtplib.SMTPRecipientsRefused as e:
            raise RelayError(f"every recipient refused: {_replies(e.recipients)}") from None
        except smtplib.SMTPResponseException as e:
            raise RelayError(f"{self._name}: {e.smtp_code} {_decode(e.smtp_error)}") from None
        except (smtplib.SMTPException, OSError) as e:
            self._smtp = None
            raise RelayUnavailable(f"{self._name}: {e}") from None
        return {rcpt: f"{code} {_decode(text)}" for rcpt, (code, text) in refused.items()}

    @property
    def _name(self) -> str:
        return f"relay {self.settings.smtp_host}:{self.settings.smtp_port}"

    def _session(self) -> smtplib.SMTP:
        if self._smtp is None:
            self._smtp = self._connect()
        return self._smtp

    def _connect(self) -> smtplib.SMTP:
        settings = self.settings
        try:
            smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout)
        except (smtplib.SMTPException, OSError) as e:
            raise RelayUnavailable(f"{self._name}: cannot connect: {e}") from None
        try:
            smtp.ehlo_or_helo_if_needed()
            self._starttls(smtp)
            if settings.smtp_user:
                smtp.login(settings.smtp_user, self._password())
        except smtplib.SMTPAuthenticationError as e:
            smtp.close()
            raise RelayUnavailable(
                f"{self._name}: AUTH as {settings.smtp_user!r} refused: {e.smtp_code} {_decode(e.smtp_error)}"
            ) from None
        except RelayUnavailable:
            smtp.close()
            raise
        except (smtplib.SMTPException, OSError) as e:
            smtp.close()
            raise RelayUnavailable(f"{self._name}: {e}") from None
        return smtp

    def _starttls(self, smtp: smtplib.SMTP) -> None:
        mode = self.settings.smtp_starttls
        if mode == "no":
            return
        if not smtp.has_extn("starttls"):
            if mode == "required":
                raise RelayUnavailable(f"{self._name} offers no STARTTLS and smtp_starttls is 'required'")
            return
        if mode == "required":
            context = ssl.create_default_context(cafile=self.settings.smtp_ca_file or None)
        else:
            # Opportunistic: encryption against passive listening, no authentication (RFC 7435).
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        smtp.starttls(context=context)
        smtp.ehlo()

    def _password(self) -> str:
        path = self.settings.smtp_password_file
        try:
            return Path(path).read_text(encoding="utf-8").splitlines()[0]
        except (OSError, UnicodeError, IndexError) as e:
            reason = "empty" if isinstance(e, IndexError) else e
            raise RelayUnavailable(f"smtp_password_file {path}: cannot read the password: {reason}") from None


def _decode(text: bytes | str) -> str:
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else text


def _replies(refused: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{rcpt}: {code} {_decode(text)}" for rcpt, (code, text) in refused.items())


# ---------------------------------------------------------------------------------------------
# Files (--out)


def write_report_file(directory: Path, built: BuiltReport) -> Path:
    """Write the gzipped report as ``directory/<file name>``, atomically (temporary file + rename).

    Raises:
        OSError: the file could not be written; nothing is left under the final name.
    """
    target = directory / built.filename
    fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(built.gzipped)
            file.flush()
            os.fchmod(file.fileno(), REPORT_FILE_MODE)
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_directory(directory)
    return target


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# A run of ``authmilter report send``


class Status(StrEnum):
    SENT = "sent"
    WRITTEN = "written"
    WOULD_SEND = "would send"
    NO_DESTINATION = "no usable destination"
    UNREPORTABLE = "unreportable"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    """What happened to one report."""

    report: ReportData
    status: Status
    filename: str = ""
    recipients: tuple[str, ...] = ()
    detail: str = ""

    def line(self) -> str:
        begin, end = date_range(self.report.period)
        where = f" to {', '.join(self.recipients)}" if self.recipients else ""
        detail = f" ({self.detail})" if self.detail else ""
        name = f" {self.filename}" if self.filename else ""
        return f"{self.report.policy_domain} {begin}-{end}: {self.status}{where}{name}{detail}"


class Sender(Protocol):
    def send(self, envelope_sender: str, recipients: Sequence[str], data: bytes) -> dict[str, str]: ...


@dataclass
class SendRun:
    """One run over the due reports.

    Attributes:
        store: where due reports come from and deliveries are recorded.
        settings: who we are, the relay.
        resolver: for external destination checks.
        dmarc: how Organizational Domains are found.
        sender: the relay session (mail); unused with ``out_dir`` or ``dry_run``.
        out_dir: write files here instead of sending mail.
        dry_run: change nothing in the store and send nothing (files are still written).
    """

    store: ReportStore
    settings: DeliverySettings
    resolver: Resolver
    dmarc: DmarcSettings
    sender: Sender
    out_dir: Path | None = None
    dry_run: bool = False
    outcomes: list[Outcome] = field(default_factory=list)

    def run(self, until: int) -> list[Outcome]:
        """Deliver every report due by ``until``; return what happened to each.

        The store's send lock is held throughout (not for a dry run, which records nothing).
        A report is marked delivered only after the relay accepted it or its file is complete.
        """
        lock = contextlib.nullcontext() if self.dry_run else self.store.send_lock()
        with lock:
            reports = self.store.due_reports(until)
            for report in reports:
                outcome = self._deliver(report)
                self.outcomes.append(outcome)
                if outcome.status is Status.FAILED and self.out_dir is None:
                    self._leave_the_rest(reports, outcome.detail)
                    break
        return self.outcomes

    def _leave_the_rest(self, reports: Iterator[ReportData], reason: str) -> None:
        left = sum(1 for _ in reports)
        if left:
            log.error("relay unavailable (%s): %d more report(s) left for the next run", reason, left)

    def _deliver(self, report: ReportData) -> Outcome:
        problem = _unreportable(report)
        if problem:
            # It can never be sent: recorded, so that it does not come back on every run.
            log.error("report for %r not sent: %s", report.policy_domain, problem)
            self._mark_unsendable(report)
            return Outcome(report, Status.UNREPORTABLE, detail=problem)
        built = build_report(report, self.settings)
        try:
            destinations = usable_destinations(report, self.settings, self.resolver, self.dmarc)
        except DnsDeferred as e:
            log.warning("report for %s deferred to the next run: %s", report.policy_domain, e)
            return Outcome(report, Status.DEFERRED, built.filename, detail=str(e))
        if not destinations:
            log.warning("report for %s: no usable rua destination; not sent", report.policy_domain)
            self._mark(built)
            return Outcome(report, Status.NO_DESTINATION, built.filename)
        recipients = tuple(d.address for d in destinations)
        if self.out_dir is not None:
            return self._write(built, recipients)
        if self.dry_run:
            return Outcome(report, Status.WOULD_SEND, built.filename, recipients)
        return self._send(built, recipients)

    def _write(self, built: BuiltReport, recipients: tuple[str, ...]) -> Outcome:
        assert self.out_dir is not None
        try:
            path = write_report_file(self.out_dir, built)
        except OSError as e:
            log.error("report for %s: cannot write into %s: %s", built.report.policy_domain, self.out_dir, e)
            return Outcome(built.report, Status.DEFERRED, built.filename, recipients, str(e))
        self._mark(built)
        return Outcome(built.report, Status.WRITTEN, str(path), recipients)

    def _send(self, built: BuiltReport, recipients: tuple[str, ...]) -> Outcome:
        message = build_message(built, self.settings, recipients)
        try:
            refused = self.sender.send(self.settings.envelope_address, recipients, message.as_bytes())
        except RelayUnavailable as e:
            log.error("report for %s not sent: %s", built.report.policy_domain, e)
            return Outcome(built.report, Status.FAILED, built.filename, recipients, str(e))
        except RelayError as e:
            log.error("report for %s not sent, left for the next run: %s", built.report.policy_domain, e)
            return Outcome(built.report, Status.DEFERRED, built.filename, recipients, str(e))
        for recipient, reply in refused.items():
            log.warning("report for %s: relay refused %s: %s", built.report.policy_domain, recipient, reply)
        self._mark(built)
        accepted = tuple(r for r in recipients if r not in refused)
        domain = built.report.policy_domain
        log.info("report for %s sent to %s: %s", domain, ", ".join(accepted), built.filename)
        return Outcome(built.report, Status.SENT, built.filename, accepted)

    def _mark(self, built: BuiltReport) -> None:
        if not self.dry_run:
            self.store.mark_delivered(built.report.policy_domain, built.report.period, built.report_id)

    def _mark_unsendable(self, report: ReportData) -> None:
        if not self.dry_run:
            self.store.mark_delivered(report.policy_domain, report.period, "")


def _unreportable(report: ReportData) -> str:
    # The policy domain goes into the Subject and the file name: it must be a plain host name.
    if _hostname(report.policy_domain) != report.policy_domain:
        return "the policy domain is not a valid lower-case host name"
    if not report.rows:
        return "no rows (RFC 9990 requires at least one record)"
    if report.period.end <= report.period.begin:
        return f"empty period {report.period.begin}-{report.period.end}"
    return ""

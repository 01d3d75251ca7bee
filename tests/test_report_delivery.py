"""Report delivery: rua URIs, external destinations (real Knot), names, MIME, SMTP (loopback relay), files."""

from __future__ import annotations

import email
import email.policy
import gzip
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

import parsedmarc
import pytest

from authmilter.dmarc import DmarcSettings
from authmilter.reports.delivery import (
    TEMP_PREFIX,
    BadUri,
    DeliverySettings,
    DnsDeferred,
    RelayError,
    RelayUnavailable,
    SendRun,
    SettingsError,
    SmtpRelay,
    Status,
    build_message,
    build_report,
    parse_rua,
    parse_rua_list,
    report_filename,
    report_id,
    report_subject,
    verify_destination,
)
from authmilter.reports.model import ReportData, ReportPeriod
from authmilter.reports.xml import report_xml
from authmilter.resolver import NameserverSource, Resolver
from dnsserver import AuthoritativeDns, free_port
from reportdata import PERIOD, SCHEMA, MemoryStore, report, with_rua
from smtprelay import HOST, RelayHandler, running_relay, self_signed_certificate

POLICY_DOMAIN = "rpt-sender.example"
RECEIVER = "receiver.example"
DMARC = DmarcSettings()


def settings(**changes: object) -> DeliverySettings:
    base = DeliverySettings(
        org_name="Receiver Org",
        email=f"dmarc-reports@{RECEIVER}",
        extra_contact_info="https://receiver.example/dmarc",
        smtp_host=HOST,
        smtp_starttls="no",
        smtp_timeout=10.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def sample(domain: str = POLICY_DOMAIN, *rua: str, period: ReportPeriod = PERIOD) -> ReportData:
    return report(domain, rua or (f"mailto:dmarc@{domain}",), period)


# --- rua URIs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "address", "size"),
    [
        ("mailto:dmarc@sender.example", "dmarc@sender.example", None),
        (" MAILTO:Dmarc@Sender.Example ", "Dmarc@sender.example", None),
        ("mailto:dmarc@sender.example!10m", "dmarc@sender.example", 10 << 20),
        ("mailto:dmarc@sender.example!500", "dmarc@sender.example", 500),
        ("mailto:dmarc@sender.example!2K", "dmarc@sender.example", 2 << 10),
        ("mailto:dmarc@sender.example!1g", "dmarc@sender.example", 1 << 30),
        ("mailto:dmarc@sender.example!3t", "dmarc@sender.example", 3 << 40),
        ("mailto:dmarc%2Breports@sender.example", "dmarc+reports@sender.example", None),
        ("mailto:dmarc@sender.example?subject=ignored", "dmarc@sender.example", None),
        ("mailto:dmarc@bücher.example", "dmarc@xn--bcher-kva.example", None),
    ],
)
def test_mailto_uris_parse_with_their_size_suffix(uri: str, address: str, size: int | None) -> None:
    destination = parse_rua(uri)
    assert (destination.address, destination.size_limit) == (address, size)
    assert destination.host == address.rpartition("@")[2]


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://reports.example/dmarc", "unsupported scheme"),
        ("ftp://x.example/a", "unsupported scheme"),
        ("dmarc@sender.example", "no scheme"),
        ("mailto:", "not a valid mailbox"),
        ("mailto:@sender.example", "not a valid mailbox"),
        ("mailto:dmarc", "not a valid mailbox"),
        ("mailto:a b@sender.example", "not a valid mailbox"),
        ("mailto:a@sender.example,b@sender.example", "more than one address"),
        ("mailto:dmarc@-bad-.example", "not a valid domain"),
        ("mailto:dmarc@localhost", "not a valid domain"),
        ("mailto:dmarc@sender..example", "not a valid domain"),
        ("mailto:dmarc@sender.example!10x", "exclamation point"),
        ("mailto:dmarc@sender.example!", "exclamation point"),
        ("mailto:dm!rc@sender.example!10m", "exclamation point"),
        ("mailto:dmarc@sender.example!99999999999t", "64 bits"),
    ],
)
def test_bad_and_unsupported_uris_are_refused_with_the_reason(uri: str, reason: str) -> None:
    with pytest.raises(BadUri, match=reason):
        parse_rua(uri)


def test_a_list_keeps_the_good_uris_in_order_and_logs_the_others(caplog: pytest.LogCaptureFixture) -> None:
    uris = ["https://x.example/r", "mailto:a@sender.example", "mailto:bad", "mailto:b@sender.example!1k"]
    with caplog.at_level(logging.WARNING):
        destinations = parse_rua_list("sender.example", uris)
    assert [d.address for d in destinations] == ["a@sender.example", "b@sender.example"]
    assert "rua 'https://x.example/r' skipped: unsupported scheme" in caplog.text
    assert "rua 'mailto:bad' skipped" in caplog.text


def test_at_most_ten_destinations_are_used() -> None:
    uris = [f"mailto:r{i}@sender.example" for i in range(12)]
    assert len(parse_rua_list("sender.example", uris)) == 10


# --- Names, subject, MIME (RFC 9990 "Email") -------------------------------------------------------

# RFC 9990 "Email": filename = receiver "!" policy-domain "!" begin "!" end ["!" unique-id] "." extension
FILENAME = re.compile(
    r"(?P<receiver>[^!]+)!(?P<domain>[^!]+)!(?P<begin>\d+)!(?P<end>\d+)!(?P<id>[A-Za-z0-9]+)\.xml\.gz"
)
# dmarc-subject = "Report" 1*FWS "Domain:" 1*FWS domain-name 1*FWS "Submitter:" 1*FWS domain-name
#                 1*FWS [ "Report-ID:" 1*FWS ridtxt ]
SUBJECT = re.compile(r"Report\s+Domain:\s+(\S+)\s+Submitter:\s+(\S+)\s+Report-ID:\s+<([A-Za-z0-9]+)>")


def test_file_name_and_subject_follow_rfc9990() -> None:
    data = sample()
    unique_id = report_id(RECEIVER, data)
    name = FILENAME.fullmatch(report_filename(RECEIVER, data, unique_id))
    assert name is not None
    assert name.group("receiver", "domain", "begin", "end", "id") == (
        RECEIVER,
        POLICY_DOMAIN,
        str(PERIOD.begin),
        str(PERIOD.end - 1),
        unique_id,
    )
    subject = SUBJECT.fullmatch(report_subject(RECEIVER, data, unique_id))
    assert subject is not None and subject.groups() == (POLICY_DOMAIN, RECEIVER, unique_id)


def test_the_report_id_is_stable_and_unique_per_domain_and_period() -> None:
    data = sample()
    assert report_id(RECEIVER, data) == report_id(RECEIVER, sample())
    later = ReportPeriod(PERIOD.end, PERIOD.end + 86400)
    others = {report_id(RECEIVER, sample("other.example")), report_id(RECEIVER, sample(period=later))}
    assert report_id(RECEIVER, data) not in others and len(others) == 2


def test_the_gzip_file_has_no_time_stamp_so_a_resent_report_is_identical() -> None:
    gzipped = build_report(sample(), settings()).gzipped
    # RFC 1952 §2.3: MTIME (bytes 4-7) 0 means "no time stamp is available"; FLG has no FNAME.
    assert gzipped[4:8] == b"\0\0\0\0" and gzipped[3] == 0
    assert gzipped == build_report(sample(), settings()).gzipped


def parse_mail(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_the_message_carries_the_gzipped_report_as_application_gzip() -> None:
    built = build_report(sample(), settings())
    raw = build_message(built, settings(), ["dmarc@rpt-sender.example"], date=PERIOD.end + 3600).as_bytes()
    message = parse_mail(raw)
    assert message["Subject"] == built.subject
    assert message["From"] == f"Receiver Org <dmarc-reports@{RECEIVER}>"
    assert message["To"] == "dmarc@rpt-sender.example"
    assert message["Message-ID"] == f"<{built.report_id}@{RECEIVER}>"
    assert message["Auto-Submitted"] == "auto-generated"
    attachments = list(message.iter_attachments())
    assert len(attachments) == 1
    part = attachments[0]
    assert part.get_content_type() == "application/gzip"
    assert part.get_filename() == built.filename
    document = gzip.decompress(part.get_payload(decode=True))
    assert document == report_xml(sample(), settings().reporter, built.report_id)
    SCHEMA.validate(document)
    # Lines stay within RFC 5322's limit; the Subject is not MIME-encoded.
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"Subject: Report Domain: rpt-sender.example Submitter: receiver.example Report-ID: <" in raw


def test_parsedmarc_reads_the_report_mail() -> None:
    built = build_report(sample(), settings())
    raw = build_message(built, settings(), ["dmarc@rpt-sender.example"]).as_bytes()
    parsed = parsedmarc.parse_report_email(raw, offline=True, always_use_local_files=True)
    assert parsed["report_type"] == "aggregate"
    result = parsed["report"]
    assert result["report_metadata"]["report_id"] == built.report_id
    assert result["policy_published"]["domain"] == POLICY_DOMAIN
    assert [r["count"] for r in result["records"]] == [r.count for r in sample().rows]


def test_a_long_policy_domain_is_not_encoded_in_the_subject_or_the_file_name() -> None:
    domain = f"{'a' * 63}.{'b' * 63}.{'c' * 40}.example"
    built = build_report(sample(domain), settings())
    raw = build_message(built, settings(), [f"dmarc@{domain}"]).as_bytes()
    assert f"Subject: {built.subject}\r\n".encode() in raw
    assert f'filename="{built.filename}"'.encode() in raw


def test_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="smtp_starttls"):
        settings(smtp_starttls="maybe")
    with pytest.raises(SettingsError, match="smtp_password_file"):
        settings(smtp_user="reports")
    with pytest.raises(SettingsError, match="no domain"):
        settings(email="postmaster")
    assert settings(from_address="noreply@out.example").receiver == "out.example"
    assert settings(envelope_sender="bounces@out.example").envelope_address == "bounces@out.example"
    assert settings().envelope_address == f"dmarc-reports@{RECEIVER}"


# --- External destinations (RFC 9990 "Verifying External Destinations"), real DNS ----------------


@pytest.fixture(scope="module")
def report_dns(dns_server: AuthoritativeDns) -> AuthoritativeDns:
    dns_server.add_zone(POLICY_DOMAIN, f'_dmarc TXT "v=DMARC1; p=reject; rua=mailto:dmarc@{POLICY_DOMAIN}"')
    dns_server.add_zone("rpt-consumer.example", f'{POLICY_DOMAIN}._report._dmarc TXT "v=DMARC1"')
    dns_server.add_zone("rpt-wildcard.example", '*._report._dmarc TXT "v=DMARC1;"')
    dns_server.add_zone("rpt-closed.example", "www A 192.0.2.1")
    dns_server.add_zone("rpt-notfirst.example", f'{POLICY_DOMAIN}._report._dmarc TXT "p=none; v=DMARC1"')
    dns_server.add_zone(
        "rpt-override.example",
        f'{POLICY_DOMAIN}._report._dmarc TXT "v=DMARC1; rua=mailto:inbox@rpt-override.example"',
    )
    dns_server.add_zone(
        "rpt-elsewhere.example",
        f'{POLICY_DOMAIN}._report._dmarc TXT "v=DMARC1; rua=mailto:inbox@rpt-consumer.example"',
    )
    dns_server.reload()
    return dns_server


@pytest.fixture
def resolver(report_dns: AuthoritativeDns) -> Resolver:
    return Resolver(NameserverSource([report_dns.host], port=report_dns.port, timeout=2.0))


def verified(uri: str, resolver: Resolver) -> list[str]:
    return [d.address for d in verify_destination(POLICY_DOMAIN, parse_rua(uri), resolver, DMARC)]


def test_a_destination_in_the_policy_domains_organization_needs_no_authorisation(resolver: Resolver) -> None:
    assert verified(f"mailto:dmarc@reports.{POLICY_DOMAIN}", resolver) == [f"dmarc@reports.{POLICY_DOMAIN}"]


def test_an_external_destination_is_used_when_it_publishes_the_authorisation(resolver: Resolver) -> None:
    assert verified("mailto:r@rpt-consumer.example", resolver) == ["r@rpt-consumer.example"]
    assert verified("mailto:r@rpt-wildcard.example", resolver) == ["r@rpt-wildcard.example"]


@pytest.mark.parametrize("host", ["rpt-closed.example", "rpt-notfirst.example", "rpt-nonexistent.example"])
def test_an_external_destination_without_a_valid_authorisation_is_skipped(
    host: str, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert verified(f"mailto:r@{host}", resolver) == []
    assert f"no v=DMARC1 TXT record at {POLICY_DOMAIN}._report._dmarc.{host}" in caplog.text


def test_the_authorising_record_may_override_the_address_on_the_same_host(resolver: Resolver) -> None:
    assert verified("mailto:r@rpt-override.example", resolver) == ["inbox@rpt-override.example"]


def test_an_override_to_another_host_cancels_both(
    resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert verified("mailto:r@rpt-elsewhere.example", resolver) == []
    assert "names another host" in caplog.text


def test_a_dns_failure_defers_the_report() -> None:
    silent = Resolver(NameserverSource([HOST], port=free_port(HOST), timeout=0.3))
    with pytest.raises(DnsDeferred, match=r"_report\._dmarc\.rpt-consumer\.example"):
        verify_destination(POLICY_DOMAIN, parse_rua("mailto:r@rpt-consumer.example"), silent, DMARC)


# --- Sending runs against a loopback relay ---------------------------------------------------------


@pytest.fixture
def handler() -> RelayHandler:
    return RelayHandler()


@pytest.fixture
def relay_port(handler: RelayHandler) -> Iterator[int]:
    with running_relay(handler) as port:
        yield port


def run(
    store: MemoryStore,
    resolver: Resolver,
    delivery: DeliverySettings,
    *,
    out_dir: Path | None = None,
    dry_run: bool = False,
    until: int = PERIOD.end,
) -> list[Status]:
    with SmtpRelay(delivery) as relay:
        outcomes = SendRun(store, delivery, resolver, DMARC, relay, out_dir, dry_run).run(until)
    return [o.status for o in outcomes]


def test_a_run_sends_each_due_report_once(handler: RelayHandler, relay_port: int, resolver: Resolver) -> None:
    store = MemoryStore([sample(), sample("rpt-other.example", "mailto:r@rpt-consumer.example")])
    later = sample(period=ReportPeriod(PERIOD.end, PERIOD.end + 86400))
    store.reports.append(later)
    delivery = settings(smtp_port=relay_port, envelope_sender=f"bounces@{RECEIVER}")
    assert run(store, resolver, delivery) == [Status.SENT, Status.NO_DESTINATION]
    # rpt-other.example's external destination has no authorisation for it: nothing sent, marked.
    assert [(m.mail_from, m.rcpt_tos) for m in handler.received] == [
        (f"bounces@{RECEIVER}", (f"dmarc@{POLICY_DOMAIN}",))
    ]
    assert set(store.delivered) == {(POLICY_DOMAIN, PERIOD), ("rpt-other.example", PERIOD)}
    assert store.delivered[(POLICY_DOMAIN, PERIOD)] == report_id(RECEIVER, sample())
    message = parse_mail(handler.received[0].data)
    assert SUBJECT.fullmatch(message["Subject"]) is not None
    # A second run finds nothing new for the same period; the next day is due once it has ended.
    assert run(store, resolver, delivery) == []
    assert run(store, resolver, delivery, until=later.period.end) == [Status.SENT]
    assert len(handler.received) == 2


def test_a_dry_run_sends_nothing_and_changes_nothing(
    handler: RelayHandler, relay_port: int, resolver: Resolver
) -> None:
    store = MemoryStore([sample()])
    assert run(store, resolver, settings(smtp_port=relay_port), dry_run=True) == [Status.WOULD_SEND]
    assert handler.received == [] and store.delivered == {}


def test_out_writes_the_same_file_the_mail_carries(
    handler: RelayHandler, relay_port: int, resolver: Resolver, tmp_path: Path
) -> None:
    mailed = MemoryStore([sample()])
    run(mailed, resolver, settings(smtp_port=relay_port))
    attachment = next(parse_mail(handler.received[0].data).iter_attachments())
    written = MemoryStore([sample()])
    assert run(written, resolver, settings(smtp_port=relay_port), out_dir=tmp_path) == [Status.WRITTEN]
    assert len(handler.received) == 1  # nothing more was mailed
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [attachment.get_filename()]
    assert files[0].read_bytes() == attachment.get_payload(decode=True)
    assert oct(files[0].stat().st_mode & 0o777) == "0o640"
    assert written.delivered == mailed.delivered
    assert not any(f.name.startswith(TEMP_PREFIX) for f in tmp_path.iterdir())


def test_out_with_dry_run_writes_the_files_but_records_nothing(resolver: Resolver, tmp_path: Path) -> None:
    store = MemoryStore([sample()])
    assert run(store, resolver, settings(smtp_port=1), out_dir=tmp_path, dry_run=True) == [Status.WRITTEN]
    assert len(list(tmp_path.iterdir())) == 1 and store.delivered == {}


def test_an_unwritable_out_directory_leaves_the_report_unsent(resolver: Resolver, tmp_path: Path) -> None:
    store = MemoryStore([sample()])
    missing = tmp_path / "missing"
    assert run(store, resolver, settings(), out_dir=missing) == [Status.DEFERRED]
    assert store.delivered == {}


@pytest.mark.parametrize(
    "refusal",
    ["451 4.3.0 try again later", "554 5.7.1 no thanks"],
)
def test_a_relay_that_refuses_the_message_leaves_the_report_for_the_next_run(
    handler: RelayHandler, relay_port: int, resolver: Resolver, refusal: str
) -> None:
    store = MemoryStore([sample(), sample("rpt-sender2.example")])
    handler.refuse_data = refusal
    assert run(store, resolver, settings(smtp_port=relay_port)) == [Status.DEFERRED, Status.DEFERRED]
    assert store.delivered == {}
    handler.refuse_data = ""
    assert run(store, resolver, settings(smtp_port=relay_port)) == [Status.SENT, Status.SENT]
    assert len(store.delivered) == 2


def test_recipients_refused_one_by_one_do_not_stop_the_others(
    handler: RelayHandler, relay_port: int, resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    data = sample(POLICY_DOMAIN, f"mailto:a@{POLICY_DOMAIN}", f"mailto:b@{POLICY_DOMAIN}")
    store = MemoryStore([data])
    handler.refuse_rcpt[f"a@{POLICY_DOMAIN}"] = "550 5.1.1 no such user"
    with caplog.at_level(logging.WARNING):
        assert run(store, resolver, settings(smtp_port=relay_port)) == [Status.SENT]
    assert handler.received[0].rcpt_tos == (f"b@{POLICY_DOMAIN}",)
    assert f"relay refused a@{POLICY_DOMAIN}: 550 5.1.1 no such user" in caplog.text
    assert len(store.delivered) == 1


def test_every_recipient_refused_leaves_the_report_unsent(handler: RelayHandler, relay_port: int) -> None:
    handler.refuse_rcpt[f"dmarc@{POLICY_DOMAIN}"] = "450 4.2.0 mailbox busy"
    with SmtpRelay(settings(smtp_port=relay_port)) as relay, pytest.raises(RelayError, match=r"450 4\.2\.0"):
        relay.send(f"r@{RECEIVER}", [f"dmarc@{POLICY_DOMAIN}"], b"Subject: x\r\n\r\nx\r\n")


def test_an_unreachable_relay_stops_the_run_and_leaves_every_report(
    resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore([sample(), sample("rpt-sender2.example"), sample("rpt-sender3.example")])
    with caplog.at_level(logging.ERROR):
        assert run(store, resolver, settings(smtp_port=free_port(HOST))) == [Status.FAILED]
    assert store.delivered == {}
    assert "cannot connect" in caplog.text
    assert "2 more report(s) left for the next run" in caplog.text


def test_a_report_larger_than_the_relay_accepts_stays_unsent(
    handler: RelayHandler, resolver: Resolver
) -> None:
    store = MemoryStore([sample()])
    with running_relay(handler, data_size_limit=1000) as port:
        assert run(store, resolver, settings(smtp_port=port)) == [Status.DEFERRED]
    assert store.delivered == {} and handler.received == []


def test_a_rua_size_limit_is_not_applied(handler: RelayHandler, relay_port: int, resolver: Resolver) -> None:
    # RFC 9989 Appendix C.4 removed "!size"; RFC 9990 no longer withholds larger reports.
    store = MemoryStore([sample(POLICY_DOMAIN, f"mailto:dmarc@{POLICY_DOMAIN}!1k")])
    assert run(store, resolver, settings(smtp_port=relay_port)) == [Status.SENT]
    assert len(handler.received[0].data) > 1024


def test_suppressed_destinations_are_never_sent_to(
    handler: RelayHandler, relay_port: int, resolver: Resolver
) -> None:
    data = with_rua(sample(), f"mailto:a@{POLICY_DOMAIN}", "mailto:r@rpt-consumer.example")
    store = MemoryStore([data])
    delivery = settings(smtp_port=relay_port, suppress_domains=("rpt-consumer.example",))
    assert run(store, resolver, delivery) == [Status.SENT]
    assert handler.received[0].rcpt_tos == (f"a@{POLICY_DOMAIN}",)


def test_a_dns_failure_defers_only_that_report(handler: RelayHandler, relay_port: int) -> None:
    silent = Resolver(NameserverSource([HOST], port=free_port(HOST), timeout=0.3))
    store = MemoryStore([with_rua(sample(), "mailto:r@rpt-consumer.example")])
    assert run(store, silent, settings(smtp_port=relay_port)) == [Status.DEFERRED]
    assert store.delivered == {} and handler.received == []


# --- STARTTLS and AUTH ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "smtp-password"
    path.write_text("s3cret\n")
    return path


def send_one(delivery: DeliverySettings) -> None:
    with SmtpRelay(delivery) as relay:
        relay.send(delivery.envelope_address, [f"dmarc@{POLICY_DOMAIN}"], b"Subject: t\r\n\r\nbody\r\n")


def test_starttls_required_with_a_verified_certificate_and_auth(
    handler: RelayHandler, certificate: tuple[Path, Path], password_file: Path
) -> None:
    with running_relay(handler, certificate=certificate, user="reports", password="s3cret") as port:
        send_one(
            settings(
                smtp_port=port,
                smtp_starttls="required",
                smtp_ca_file=str(certificate[0]),
                smtp_user="reports",
                smtp_password_file=str(password_file),
            )
        )
    assert [(m.tls, m.authenticated_as) for m in handler.received] == [(True, "reports")]


def test_starttls_required_refuses_an_unverified_certificate(
    handler: RelayHandler, certificate: tuple[Path, Path]
) -> None:
    refused = pytest.raises(RelayUnavailable, match="CERTIFICATE_VERIFY_FAILED")
    with running_relay(handler, certificate=certificate) as port, refused:
        send_one(settings(smtp_port=port, smtp_starttls="required"))
    assert handler.received == []


def test_starttls_required_refuses_a_relay_without_it(handler: RelayHandler, relay_port: int) -> None:
    with pytest.raises(RelayUnavailable, match="offers no STARTTLS"):
        send_one(settings(smtp_port=relay_port, smtp_starttls="required"))


def test_opportunistic_starttls_encrypts_when_offered(
    handler: RelayHandler, certificate: tuple[Path, Path]
) -> None:
    with running_relay(handler, certificate=certificate) as port:
        send_one(settings(smtp_port=port, smtp_starttls="opportunistic"))
    assert [m.tls for m in handler.received] == [True]


def test_opportunistic_starttls_sends_in_clear_when_not_offered(
    handler: RelayHandler, relay_port: int
) -> None:
    send_one(settings(smtp_port=relay_port, smtp_starttls="opportunistic"))
    assert [m.tls for m in handler.received] == [False]


def test_a_wrong_password_is_reported_with_the_user(
    handler: RelayHandler, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    delivery = settings(smtp_starttls="opportunistic", smtp_user="reports", smtp_password_file=str(wrong))
    refused = pytest.raises(RelayUnavailable, match="AUTH as 'reports' refused: 535")
    with running_relay(handler, certificate=certificate, user="reports", password="s3cret") as port, refused:
        send_one(replace(delivery, smtp_port=port))
    assert handler.received == []


def test_an_unreadable_password_file_is_named(handler: RelayHandler, relay_port: int, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    with pytest.raises(RelayUnavailable, match=f"smtp_password_file {missing}: cannot read"):
        send_one(settings(smtp_port=relay_port, smtp_user="reports", smtp_password_file=str(missing)))



@pytest.mark.parametrize(
    "broken",
    [
        replace(sample(), policy_domain="../../etc/evil.example"),
        replace(sample(), policy_domain="Upper.Example"),
        replace(sample(), rows=()),
        replace(sample(), period=ReportPeriod(PERIOD.begin, PERIOD.begin)),
    ],
    ids=["path", "upper-case", "no-rows", "empty-period"],
)
def test_a_report_that_cannot_be_built_is_recorded_and_never_written(
    broken: ReportData, resolver: Resolver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore([broken, sample("rpt-good.example")])
    with caplog.at_level(logging.ERROR):
        assert run(store, resolver, settings(), out_dir=tmp_path) == [Status.UNREPORTABLE, Status.WRITTEN]
    assert len(list(tmp_path.iterdir())) == 1
    assert store.delivered[(broken.policy_domain, broken.period)] == ""
    assert "not sent" in caplog.text

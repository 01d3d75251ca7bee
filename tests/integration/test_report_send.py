"""Aggregate reports sent through the real Postfix (with authmilter in front) to the sink.

The report leaves as ``authmilter report send`` sends it: SMTP from 127.0.0.1 to the relay, which
queues and relays it to the sink; the tests read the sink's copy.
"""

from __future__ import annotations

import email
import email.policy
import gzip

import parsedmarc
import pytest
from postfix import DELIVERY_TIMEOUT, Mta

from authmilter.dmarc import DmarcSettings
from authmilter.reports.delivery import DeliverySettings, SendRun, SmtpRelay, Status, report_id
from authmilter.resolver import NameserverSource, Resolver
from dnsserver import AuthoritativeDns
from reportdata import PERIOD, SCHEMA, MemoryStore, report

POLICY_DOMAIN = "rpt-postfix.example"
RECEIVER = "receiver.example"


@pytest.fixture
def resolver(dns_server: AuthoritativeDns) -> Resolver:
    return Resolver(NameserverSource([dns_server.host], port=dns_server.port, timeout=2.0))


def delivery(mta: Mta) -> DeliverySettings:
    return DeliverySettings(
        org_name="Receiver Org",
        email=f"dmarc-reports@{RECEIVER}",
        smtp_host=mta.host,
        smtp_port=mta.port,
        envelope_sender=f"bounces@{RECEIVER}",
    )


def test_a_report_reaches_its_destination_through_postfix(
    mta: Mta, request: pytest.FixtureRequest, resolver: Resolver
) -> None:
    request.getfixturevalue("local_postfix")  # the loopback set-up, not an external one
    data = report(POLICY_DOMAIN, (f"mailto:dmarc@{POLICY_DOMAIN}", f"mailto:copy@{POLICY_DOMAIN}"))
    store = MemoryStore([data])
    settings = delivery(mta)
    with SmtpRelay(settings) as relay:
        outcomes = SendRun(store, settings, resolver, DmarcSettings(), relay).run(PERIOD.end)
    assert [o.status for o in outcomes] == [Status.SENT]
    unique_id = report_id(RECEIVER, data)
    assert store.delivered == {(POLICY_DOMAIN, PERIOD): unique_id}

    delivered = mta.sink.wait_for(f"<{unique_id}@{RECEIVER}>", DELIVERY_TIMEOUT)
    assert delivered.mail_from == f"bounces@{RECEIVER}"
    assert sorted(delivered.rcpt_to) == [f"copy@{POLICY_DOMAIN}", f"dmarc@{POLICY_DOMAIN}"]
    parsed = parsedmarc.parse_report_email(delivered.data, offline=True, always_use_local_files=True)
    assert parsed["report_type"] == "aggregate"
    records = parsed["report"]["records"]
    assert [(r["count"], r["policy_evaluated"]["disposition"]) for r in records] == [
        (row.count, row.key.disposition) for row in data.rows
    ]
    message = email.message_from_bytes(delivered.data, policy=email.policy.default)
    attachment = next(part for part in message.walk() if part.get_content_type() == "application/gzip")
    SCHEMA.validate(gzip.decompress(attachment.get_payload(decode=True)))
    # Sent from 127.0.0.1 (an internal host), the report is outbound to authmilter: not evaluated for
    # DMARC, so never in the history, so never reported on in turn.
    assert not any("dmarc=" in value for value in delivered.header_values("Authentication-Results"))


def test_a_second_run_sends_nothing(mta: Mta, request: pytest.FixtureRequest, resolver: Resolver) -> None:
    request.getfixturevalue("local_postfix")
    domain = f"again.{POLICY_DOMAIN}"
    store = MemoryStore([report(domain, (f"mailto:dmarc@{domain}",))])
    settings = delivery(mta)
    with SmtpRelay(settings) as relay:
        first = SendRun(store, settings, resolver, DmarcSettings(), relay).run(PERIOD.end)
        second = SendRun(store, settings, resolver, DmarcSettings(), relay).run(PERIOD.end)
    assert [o.status for o in first] == [Status.SENT] and second == []

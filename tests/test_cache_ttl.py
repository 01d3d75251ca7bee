"""Caches stay honest (issue 11): a changed SPF record, DMARC record or DKIM key is seen once its TTL ends.

Real Knot serves the records with a short TTL; the resolver (and its derived results: SPF verdicts,
DMARC tree walks, parsed DKIM keys) runs on a clock the test moves, so "wait past the TTL" needs no
sleep. Each test evaluates a message, changes the zone and reloads the server, evaluates again just
before the TTL ends (the cached result, without asking the server: the cache is in use) and just after
it (the new record). A cache that ignored the TTL, for answers or for derived results, would still
report the old result after it.
"""

from __future__ import annotations

import dataclasses

import pytest

from authmilter.config import Config, default_config
from authmilter.message import parse_message
from authmilter.model import Verdict
from authmilter.pipeline import Connection, Transaction, evaluate
from authmilter.resolver import NameserverSource, Resolver
from dnsserver import AuthoritativeDns
from signing import SigningKey, make_message, rsa_key, sign, zone_txt

TTL = 60  # of every record and of the negative answers (SOA MINIMUM)
CLIENT_IP = "192.0.2.10"
CONFIG: Config = dataclasses.replace(
    default_config(), milter=dataclasses.replace(default_config().milter, authserv_id="mx.receiver.example")
)


class MovableClock:
    """Monotonic seconds the test moves by hand (the resolver's cache clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> tuple[SigningKey, SigningKey]:
    return rsa_key(2048), rsa_key(2048)


def publish(server: AuthoritativeDns, zone: str, records: str) -> None:
    server.add_zone(zone, records, default_ttl=TTL, soa_ttl=TTL, soa_minimum=TTL)
    server.reload()


def verdict(resolver: Resolver, raw: bytes, domain: str) -> Verdict:
    transaction = Transaction(
        connection=Connection(client_ip=CLIENT_IP, helo=f"mx.{domain}"),
        mail_from=f"bob@{domain}",
        recipients=("alice@receiver.example",),
        message=parse_message(raw, max_headers=CONFIG.milter.max_headers),
        queue_id="4TTL1",
    )
    return evaluate(transaction, resolver, CONFIG)


def results_across_the_ttl(
    server: AuthoritativeDns, zone: str, before: str, after: str, raw: bytes, domain: str
) -> tuple[str, str, str]:
    """A-R of the message: first, just before the TTL ends after the change, just after it."""
    clock = MovableClock()
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0), clock=clock)
    publish(server, zone, before)
    first = verdict(resolver, raw, domain).authentication_results
    publish(server, zone, after)
    clock.now += TTL - 1
    queries = resolver.queries
    cached = verdict(resolver, raw, domain).authentication_results
    assert resolver.queries == queries, "within the TTL every answer must come from the cache"
    clock.now += 2
    return first, cached, verdict(resolver, raw, domain).authentication_results


def test_a_changed_spf_record_is_seen_after_its_ttl(dns_server: AuthoritativeDns) -> None:
    zone = "spf-ttl.example"
    allowed, refused = f"@ TXT {zone_txt(f'v=spf1 ip4:{CLIENT_IP} -all')}", f"@ TXT {zone_txt('v=spf1 -all')}"
    raw = make_message(f"Bob <bob@{zone}>")
    first, cached, after = results_across_the_ttl(dns_server, zone, allowed, refused, raw, zone)
    assert "spf=pass" in first
    assert "spf=pass" in cached
    assert "spf=fail" in after


def test_a_changed_dmarc_record_found_by_the_tree_walk_is_seen_after_its_ttl(
    dns_server: AuthoritativeDns,
) -> None:
    # The sender is a sub-domain: its policy comes from the tree walk (RFC 9989 §4.10), a derived
    # result kept as long as the answers it read, the walk's NXDOMAIN for the sub-domain included.
    zone, sender = "dmarc-ttl.example", "mail.dmarc-ttl.example"
    spf = f"mail TXT {zone_txt(f'v=spf1 ip4:{CLIENT_IP} -all')}"
    raw = make_message(f"Bob <bob@{sender}>")
    published = f"{spf}\n_dmarc TXT {zone_txt('v=DMARC1; p=reject')}"
    first, cached, after = results_across_the_ttl(dns_server, zone, published, spf, raw, sender)
    assert "dmarc=pass" in first
    assert "dmarc=pass" in cached
    assert "dmarc=none" in after


def test_a_replaced_dkim_key_is_seen_after_its_ttl(
    dns_server: AuthoritativeDns, keys: tuple[SigningKey, SigningKey]
) -> None:
    zone = "dkim-ttl.example"
    signing_key, other_key = keys
    raw = sign(make_message(f"Bob <bob@{zone}>"), signing_key, zone, "s1")
    before = f"s1._domainkey TXT {zone_txt(signing_key.txt_record())}"
    after = f"s1._domainkey TXT {zone_txt(other_key.txt_record())}"
    first, cached, later = results_across_the_ttl(dns_server, zone, before, after, raw, zone)
    assert "dkim=pass" in first
    assert "dkim=pass" in cached
    assert "dkim=fail" in later


def test_a_reused_dmarc_verdict_ends_with_the_existence_answers_it_read(dns_server: AuthoritativeDns) -> None:
    # The DMARC verdict itself is a derived result: np= applies to an Author Domain that does not
    # exist (RFC 9989 §4.10.1), judged from its A, AAAA and MX answers, so once the domain gets an
    # address the kept verdict must end with those answers' TTL.
    zone, sender = "np-ttl.example", "ghost.np-ttl.example"
    policy = f"_dmarc TXT {zone_txt('v=DMARC1; p=none; np=reject')}"
    raw = make_message(f"Bob <bob@{sender}>")
    first, cached, after = results_across_the_ttl(
        dns_server, zone, policy, f"{policy}\nghost A 192.0.2.1", raw, sender
    )
    assert "dmarc=fail (p=reject dis=reject)" in first
    assert "dmarc=fail (p=reject dis=reject)" in cached
    assert "dmarc=fail (p=none dis=none)" in after

"""Parallel lookups started with the checks (issue 11): same verdicts, each name asked once.

``[dns] prefetch_queries`` makes ``pipeline.evaluate`` ask the names every check declares
(:meth:`Check.prefetch`) all at once before the checks run; the checks then find the answers cached
or on their way (the resolver joins a lookup already on its way instead of sending it again). Against
real Knot, each message below is evaluated with prefetching off and on, each time on a fresh resolver:
the Authentication-Results and the action must be identical, and no query may be sent twice.
"""

from __future__ import annotations

import dataclasses
import threading

import dns.rdatatype
import pytest

from authmilter.config import Config, default_config
from authmilter.message import parse_message
from authmilter.model import Verdict
from authmilter.pipeline import CHECKS, Connection, Transaction, evaluate, prefetch_questions
from authmilter.resolver import NameserverSource, Resolver
from dnsserver import AuthoritativeDns
from signing import SigningKey, make_message, rsa_key, sign, zone_txt

CLIENT_IP = "192.0.2.10"
ZONE = "prefetch.example"
BASE: Config = dataclasses.replace(
    default_config(), milter=dataclasses.replace(default_config().milter, authserv_id="mx.receiver.example")
)


def with_prefetch(queries: int) -> Config:
    return dataclasses.replace(BASE, dns=dataclasses.replace(BASE.dns, prefetch_queries=queries))


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return rsa_key(2048)


@pytest.fixture(scope="module")
def server(dns_server: AuthoritativeDns, key: SigningKey) -> AuthoritativeDns:
    spf_pass = zone_txt(f"v=spf1 ip4:{CLIENT_IP} -all")
    dns_server.add_zone(
        ZONE,
        f"""
        reject          TXT {spf_pass}
        _dmarc.reject   TXT {zone_txt("v=DMARC1; p=reject")}
        s1._domainkey.reject TXT {zone_txt(key.txt_record())}
        mail.org        TXT {zone_txt(f"v=spf1 include:provider.{ZONE} -all")}
        provider        TXT {spf_pass}
        _dmarc.org      TXT {zone_txt("v=DMARC1; p=quarantine")}
        s1._domainkey.mail.org TXT {zone_txt(key.txt_record())}
        none            TXT {zone_txt("v=spf1 ~all")}
        _dmarc.none     TXT {zone_txt("v=DMARC1; p=none")}
        bare            TXT {spf_pass}
        """,
    )
    dns_server.reload()
    return dns_server


def run(server: AuthoritativeDns, raw: bytes, sender: str, config: Config) -> tuple[Verdict, int]:
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    transaction = Transaction(
        connection=Connection(client_ip=CLIENT_IP, helo=f"mx.{ZONE}"),
        mail_from=f"bob@{sender}",
        recipients=("alice@receiver.example",),
        message=parse_message(raw, max_headers=config.milter.max_headers),
        queue_id="4PRE1",
    )
    return evaluate(transaction, resolver, config), resolver.queries


MESSAGES = [
    # (From/MAIL FROM domain, signing domain or "" for unsigned, key published)
    (f"reject.{ZONE}", f"reject.{ZONE}"),
    (f"reject.{ZONE}", ""),
    (f"mail.org.{ZONE}", f"mail.org.{ZONE}"),
    (f"none.{ZONE}", ""),
    (f"bare.{ZONE}", f"bare.{ZONE}"),  # no DMARC record, no key: dkim fails, dmarc none
    (f"missing.{ZONE}", ""),  # nothing published
]


@pytest.mark.parametrize(("sender", "signer"), MESSAGES)
def test_verdicts_are_identical_with_prefetch_on_and_off(
    server: AuthoritativeDns, key: SigningKey, sender: str, signer: str
) -> None:
    raw = make_message(f"Bob <bob@{sender}>")
    if signer:
        raw = sign(raw, key, signer, "s1")
    off, queries_off = run(server, raw, sender, with_prefetch(0))
    on, queries_on = run(server, raw, sender, with_prefetch(8))
    assert on.authentication_results == off.authentication_results
    assert on.action is off.action
    # Prefetched names are not asked again by their checks (joined or answered from the cache).
    assert queries_on == queries_off


def test_the_checks_declare_spf_dkim_and_dmarc_names(key: SigningKey) -> None:
    sender = f"reject.{ZONE}"
    raw = sign(make_message(f"Bob <bob@{sender}>"), key, sender, "s1")
    transaction = Transaction(
        connection=Connection(client_ip=CLIENT_IP, helo=f"mx.{ZONE}"),
        mail_from=f"bob@{sender}",
        recipients=("alice@receiver.example",),
        message=parse_message(raw),
    )
    names = {name.rstrip(".").lower() for name, _ in prefetch_questions(CHECKS, transaction, BASE)}
    assert {sender, f"mx.{ZONE}", f"s1._domainkey.{sender}", f"_dmarc.{sender}"} <= names


def test_a_lookup_on_its_way_is_joined_not_sent_again(server: AuthoritativeDns) -> None:
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    name = f"_dmarc.reject.{ZONE}"
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(resolver.txt(name))) for _ in range(8)]
    prefetched = resolver.prefetch([(name, dns.rdatatype.TXT)], limit=8)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert prefetched[0].result().texts == ("v=DMARC1; p=reject",)
    assert [answer.texts for answer in answers] == [("v=DMARC1; p=reject",)] * 8
    assert resolver.queries == 1


def test_prefetch_is_bounded_per_message(server: AuthoritativeDns) -> None:
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    questions = [(f"n{number}.{ZONE}", dns.rdatatype.TXT) for number in range(20)]
    for future in resolver.prefetch(questions, limit=5):
        future.result()
    assert resolver.queries == 5


def test_names_already_cached_are_not_handed_to_the_prefetch_threads(server: AuthoritativeDns) -> None:
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    name = f"reject.{ZONE}"
    resolver.txt(name)
    assert resolver.prefetch([(name, dns.rdatatype.TXT)], limit=8) == []
    assert resolver.queries == 1

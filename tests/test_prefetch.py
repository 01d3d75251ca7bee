"""Parallel lookups started early (issue 11): each name asked as soon as it is known, once.

The milter's session hands the DNS names a message tells to the resolver at the callback that
tells them: the SPF records at MAIL FROM, ``_dmarc`` when the From field arrives, a key with each
DKIM-Signature field. Each query goes out on its own socket at once and its answer waits there for
the check that asks the name; the sockets nobody read are closed when the message ends. A message
read whole (``authmilter check``) asks all its names together at end of message. Against real Knot:
the queries leave at the right callbacks, are read (not asked again), are closed on abort, stay
within their bounds, fall back when a prefetched try times out, and change no verdict.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.name
import dns.rdatatype
import Milter
import pytest

from authmilter import resolver as resolver_module
from authmilter.config import Config, default_config
from authmilter.message import parse_message
from authmilter.milter_app import AuthMilter, Runtime
from authmilter.model import Verdict
from authmilter.pipeline import CHECKS, Connection, Transaction, evaluate, field_questions, prefetch_questions
from authmilter.resolver import (
    DnsAnswer,
    DnsBudget,
    NameserverSource,
    Resolver,
    SentQuery,
    ZoneFileSource,
    waiting_prefetches,
)
from dnsserver import AuthoritativeDns
from signing import SigningKey, make_message, rsa_key, sign, zone_txt
from test_dns_faults import SilentNameserver
from test_milter_app import MtaCtx, mta_fields

CLIENT_IP = "192.0.2.10"
ZONE = "prefetch.example"
HELO = f"mx.{ZONE}"
BASE: Config = dataclasses.replace(
    default_config(), milter=dataclasses.replace(default_config().milter, authserv_id="mx.receiver.example")
)


def with_prefetch(queries: int) -> Config:
    return dataclasses.replace(BASE, dns=dataclasses.replace(BASE.dns, prefetch_queries=queries))


class CountingSource(NameserverSource):
    """Knot behind a NameserverSource that notes each name it sends ahead, reads, or looks up."""

    def __init__(self, server: AuthoritativeDns, nameservers: tuple[str, ...] = ()) -> None:
        super().__init__(nameservers or (f"{server.host}:{server.port}",), timeout=2.0)
        self.sent: list[str] = []
        self.read: list[str] = []
        self.looked_up: list[str] = []

    def send(self, wire_name: bytes, rdtype: int) -> SentQuery | None:
        self.sent.append(text_of(wire_name))
        return super().send(wire_name, rdtype)

    def receive(self, sent: SentQuery) -> DnsAnswer:
        self.read.append(text_of(sent.question))
        return super().receive(sent)

    def ask(self, wire_name: bytes, rdtype: int) -> DnsAnswer:
        self.looked_up.append(text_of(wire_name))
        return super().ask(wire_name, rdtype)


def text_of(wire: bytes) -> str:
    """The name a question or a name in wire form starts with, lower case."""
    return str(dns.name.from_wire(wire, 0)[0].to_text().lower())


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


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


@pytest.fixture(autouse=True)
def no_socket_left() -> Iterator[None]:
    """Every test ends with no prefetch socket waiting (a leak would also leak the count)."""
    yield
    assert waiting_prefetches.taken == 0


def run(server: AuthoritativeDns, raw: bytes, sender: str, config: Config) -> tuple[Verdict, int]:
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    transaction = Transaction(
        connection=Connection(client_ip=CLIENT_IP, helo=HELO),
        mail_from=f"bob@{sender}",
        recipients=("alice@receiver.example",),
        message=parse_message(raw, max_headers=config.milter.max_headers),
        queue_id="4PRE1",
    )
    return evaluate(transaction, resolver, config), resolver.queries


def milter(resolver: Resolver, config: Config, monkeypatch: pytest.MonkeyPatch) -> MtaCtx:
    """A milter connection as serve() opens it, from CLIENT_IP with HELO."""
    runtime = Runtime(config, resolver, None)
    monkeypatch.setattr(Milter, "factory", lambda: AuthMilter(runtime))
    ctx = MtaCtx()
    ctx.connect(ip=CLIENT_IP, helo=HELO)
    return ctx


def mail_from(ctx: MtaCtx, sender: str) -> None:
    ctx._stage = Milter.M_ENVFROM
    # Awaited while prefetching: the MTA hands MAIL FROM over at once (milter_app.negotiate).
    assert ctx.awaits_mail_reply
    assert ctx.app.envfrom_bytes(f"<bob@{sender}>".encode()) == Milter.CONTINUE


def header(ctx: MtaCtx, name: str, value: bytes) -> None:
    ctx._stage = Milter.M_DATA
    assert ctx.app.header_bytes(name, value) == Milter.NOREPLY


MESSAGES = [
    # (From/MAIL FROM domain, signing domain or "" for unsigned)
    (f"reject.{ZONE}", f"reject.{ZONE}"),
    (f"reject.{ZONE}", ""),
    (f"mail.org.{ZONE}", f"mail.org.{ZONE}"),
    (f"none.{ZONE}", ""),
    (f"bare.{ZONE}", f"bare.{ZONE}"),  # no DMARC record, no key: dkim fails, dmarc none
    (f"missing.{ZONE}", ""),  # nothing published
]


def message(key: SigningKey, sender: str, signer: str) -> bytes:
    raw = make_message(f"Bob <bob@{sender}>")
    return sign(raw, key, signer, "s1") if signer else raw


@pytest.mark.parametrize(("sender", "signer"), MESSAGES)
def test_verdicts_are_identical_with_prefetch_on_and_off(
    server: AuthoritativeDns, key: SigningKey, sender: str, signer: str
) -> None:
    raw = message(key, sender, signer)
    off, queries_off = run(server, raw, sender, with_prefetch(0))
    on, queries_on = run(server, raw, sender, with_prefetch(8))
    assert on.authentication_results == off.authentication_results
    assert on.action is off.action
    # Prefetched names are not asked again by their checks (read, joined or answered from the cache).
    assert queries_on == queries_off


@pytest.mark.parametrize(("sender", "signer"), MESSAGES)
def test_the_milter_gives_the_same_verdicts_with_prefetch_on_and_off(
    server: AuthoritativeDns, key: SigningKey, monkeypatch: pytest.MonkeyPatch, sender: str, signer: str
) -> None:
    raw = message(key, sender, signer)
    outcomes = []
    for queries in (0, 8):
        source = CountingSource(server)
        ctx = milter(Resolver(source), with_prefetch(queries), monkeypatch)
        code = ctx.send(raw, mail_from=f"bob@{sender}")
        asked = source.sent + source.looked_up
        outcomes.append((code, ctx.headers[0], sorted(asked)))
        assert len(asked) == len(set(asked)), f"a name was asked twice: {asked}"
    assert outcomes[0] == outcomes[1]


def test_the_checks_declare_spf_dkim_and_dmarc_names(key: SigningKey) -> None:
    sender = f"reject.{ZONE}"
    raw = sign(make_message(f"Bob <bob@{sender}>"), key, sender, "s1")
    transaction = Transaction(
        connection=Connection(client_ip=CLIENT_IP, helo=HELO),
        mail_from=f"bob@{sender}",
        recipients=("alice@receiver.example",),
        message=parse_message(raw),
    )
    names = {name.rstrip(".").lower() for name, _ in prefetch_questions(CHECKS, transaction, BASE)}
    # RFC 9989 §4.10: the whole tree walk, the Author Domain's name and every shorter one.
    walk = {f"_dmarc.{sender}", f"_dmarc.{ZONE}", "_dmarc.example"}
    assert names == {sender, HELO, f"s1._domainkey.{sender}", *walk}


def test_a_from_field_tells_the_same_names_message_after_message() -> None:
    # The DMARC questions of a From value are computed once: a caller changing its list must not
    # change what the next message is told.
    field = parse_message(f"From: Bob <bob@reject.{ZONE}>\r\n\r\n".encode()).headers.fields[0]
    first = field_questions(field, BASE)
    expected = list(first)
    first.clear()
    assert field_questions(field, BASE) == expected
    assert [name for name, _ in expected] == [f"_dmarc.reject.{ZONE}", f"_dmarc.{ZONE}", "_dmarc.example"]


def test_each_name_is_sent_at_the_callback_that_tells_it_and_read_by_its_check(
    server: AuthoritativeDns, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = f"reject.{ZONE}"
    source = CountingSource(server)
    ctx = milter(Resolver(source), with_prefetch(8), monkeypatch)
    raw = sign(make_message(f"Bob <bob@{sender}>"), key, sender, "s1")
    fields = mta_fields(raw, ctx.leading_space)
    ctx.headers = [(name, value.decode("latin-1")) for name, value in mta_fields(raw)]

    mail_from(ctx, sender)
    # RFC 7208 §4.4: the MAIL FROM domain's record and the HELO name's, before any header.
    assert source.sent == [f"{sender}.", f"{HELO}."]
    told = {}
    for name, value in fields:
        before = len(source.sent)
        header(ctx, name, value)
        told[name] = source.sent[before:]
    # The From field tells the whole DMARC tree walk (RFC 9989 §4.10), asked at once.
    assert told["From"] == [f"_dmarc.{sender}.", f"_dmarc.{ZONE}.", "_dmarc.example."]
    assert told["DKIM-Signature"] == [f"s1._domainkey.{sender}."]
    assert len(source.sent) == 6
    assert ctx.app.body(raw.split(b"\r\n\r\n", 1)[1]) == Milter.NOREPLY
    assert ctx._eom() == Milter.ACCEPT
    assert "dkim=pass" in ctx.headers[0][1] and "dmarc=pass" in ctx.headers[0][1]
    # Each check read the query sent for its name and asked none again.
    assert sorted(source.read) == sorted(source.sent)
    assert not set(source.looked_up) & set(source.sent)


def test_outbound_mail_prefetches_nothing(
    server: AuthoritativeDns, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = CountingSource(server)
    ctx = milter(Resolver(source), with_prefetch(8), monkeypatch)
    ctx.macros = {Milter.M_ENVFROM: {"{auth_authen}": "bob"}}  # an authenticated client: signed only
    mail_from(ctx, f"reject.{ZONE}")
    header(ctx, "From", f" Bob <bob@reject.{ZONE}>".encode())
    assert source.sent == []
    ctx.rset()


def test_rset_and_a_new_mail_from_close_the_sockets_nobody_read(
    server: AuthoritativeDns, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = CountingSource(server)
    ctx = milter(Resolver(source), with_prefetch(8), monkeypatch)
    before = open_descriptors()
    mail_from(ctx, f"reject.{ZONE}")
    header(ctx, "From", f" Bob <bob@reject.{ZONE}>".encode())
    assert open_descriptors() == before + 5  # SPF for MAIL FROM and HELO, the walk's three names
    ctx.rset()
    assert open_descriptors() == before
    assert waiting_prefetches.taken == 0

    mail_from(ctx, f"reject.{ZONE}")
    mail_from(ctx, f"none.{ZONE}")  # MAIL FROM again without RSET: the first message is dropped
    assert open_descriptors() == before + 2
    assert ctx.app.close() == Milter.CONTINUE
    assert open_descriptors() == before
    # The names cancelled were never read, so none is cached: each message sent its own.
    assert source.sent == [
        *(f"reject.{ZONE}.", f"{HELO}.", f"_dmarc.reject.{ZONE}.", f"_dmarc.{ZONE}.", "_dmarc.example."),
        *(f"reject.{ZONE}.", f"{HELO}."),
        *(f"none.{ZONE}.", f"{HELO}."),
    ]
    assert source.read == []


def test_prefetch_is_bounded_per_message(server: AuthoritativeDns) -> None:
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    before = open_descriptors()
    with resolver.prefetch(limit=5) as lookups:
        lookups.start([(f"n{number}.{ZONE}", dns.rdatatype.TXT) for number in range(20)])
        assert (lookups.sent, resolver.queries, open_descriptors()) == (5, 5, before + 5)
    assert open_descriptors() == before


def test_prefetch_is_bounded_per_process(server: AuthoritativeDns, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waiting_prefetches, "limit", 3)
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    first, second = resolver.prefetch(limit=8), resolver.prefetch(limit=8)
    first.start([(f"a{number}.{ZONE}", dns.rdatatype.TXT) for number in range(4)])
    second.start([(f"b{number}.{ZONE}", dns.rdatatype.TXT) for number in range(4)])
    assert (first.sent, second.sent, waiting_prefetches.taken) == (3, 0, 3)
    # A check reading one of the first message's queries gives its room back.
    assert resolver.txt(f"a0.{ZONE}").status.value == "nxdomain"
    second.start([(f"b{number}.{ZONE}", dns.rdatatype.TXT) for number in range(4)])
    assert (second.sent, waiting_prefetches.taken) == (1, 3)
    first.cancel()
    second.cancel()


def test_prefetched_queries_are_charged_to_the_message_budget(server: AuthoritativeDns) -> None:
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    budget = DnsBudget(30, queries=2)
    with resolver.for_message(budget).prefetch(limit=8) as lookups:
        lookups.start([(f"n{number}.{ZONE}", dns.rdatatype.TXT) for number in range(5)])
        assert lookups.sent == 2
    assert budget.exceeded


def test_a_prefetched_query_is_read_once_by_many_askers(server: AuthoritativeDns) -> None:
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    name = f"_dmarc.reject.{ZONE}"
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(resolver.txt(name))) for _ in range(8)]
    with resolver.prefetch(limit=8) as lookups:
        lookups.start([(name, dns.rdatatype.TXT)])
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert [answer.texts for answer in answers] == [("v=DMARC1; p=reject",)] * 8
    assert resolver.queries == 1


def test_a_prefetched_query_that_times_out_falls_back_to_the_next_server(
    server: AuthoritativeDns, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolver_module, "_TRY_TIMEOUT", 0.3)  # the silent server's try ends soon
    silent = SilentNameserver()
    try:
        source = CountingSource(server, (f"127.0.0.1:{silent.port}", f"{server.host}:{server.port}"))
        resolver = Resolver(source)
        name = f"_dmarc.reject.{ZONE}"
        with resolver.prefetch(limit=8) as lookups:
            lookups.start([(name, dns.rdatatype.TXT)])
            assert resolver.txt(name).texts == ("v=DMARC1; p=reject",)
        assert silent.queries() == 1
        assert (source.sent, source.read, resolver.queries) == ([f"{name}."], [f"{name}."], 1)
    finally:
        silent.close()


def test_names_cached_or_on_their_way_are_not_sent_again(server: AuthoritativeDns) -> None:
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    cached, fresh = (f"reject.{ZONE}", dns.rdatatype.TXT), (f"none.{ZONE}", dns.rdatatype.TXT)
    resolver.txt(cached[0])
    with resolver.prefetch(limit=8) as first, resolver.prefetch(limit=8) as second:
        first.start([cached, fresh, fresh])
        second.start([fresh])
        assert (first.sent, second.sent, resolver.queries) == (1, 0, 2)


def test_a_zone_file_source_is_not_prefetched(tmp_path: Path) -> None:
    """Zone files answer from memory at once: nothing to overlap, so prefetch sends nothing."""
    zone = tmp_path / f"{ZONE}.zone"
    soa = "$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n"
    zone.write_text(f"{soa}reject TXT {zone_txt('v=spf1 -all')}\n")
    resolver = Resolver(ZoneFileSource([zone]))
    with resolver.prefetch(limit=8) as lookups:
        lookups.start([(f"reject.{ZONE}", dns.rdatatype.TXT)])
        assert lookups.sent == 0
    assert resolver.txt(f"reject.{ZONE}").texts == ("v=spf1 -all",)


def test_a_query_that_finds_a_prefetch_started_meanwhile_reads_it(server: AuthoritativeDns) -> None:
    """Another message prefetches the name between the asker's first look and its second: the asker
    must claim and read that query, never wait on it (nobody else would read it)."""
    resolver = Resolver(NameserverSource([server.host], port=server.port, timeout=2.0))
    name = f"_dmarc.reject.{ZONE}"
    other_message = resolver.prefetch(limit=8)

    class PrefetchedMeanwhile(DnsBudget):
        def charge(self) -> str:
            other_message.start([(name, dns.rdatatype.TXT)])
            return super().charge()

    view = resolver.for_message(PrefetchedMeanwhile(30, 10))
    answers: list[DnsAnswer] = []
    asker = threading.Thread(target=lambda: answers.append(view.txt(name)), daemon=True)
    asker.start()
    asker.join(timeout=10)
    other_message.cancel()
    assert not asker.is_alive(), "the asker waits on a query nobody reads"
    assert answers[0].texts == ("v=DMARC1; p=reject",)
    assert resolver.queries == 1

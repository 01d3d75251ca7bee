"""Tests of authmilter.resolver: NameserverSource against a real Knot server, the TTL/LRU cache,
ZoneFileSource, and malformed names.

The real server is the session's ``dns_server`` (tests/conftest.py); every zone here lives under
``resolver.example`` so other test files can share the server.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.exception
import dns.name
import dns.rdatatype
import pytest

from authmilter.resolver import (
    DEFAULT_NEGATIVE_TTL,
    MAX_CACHE_TTL,
    MAX_CNAME_CHAIN,
    MAX_KEPT_KEY_LENGTH,
    DnsAnswer,
    DnsBudget,
    DnsRecord,
    DnsSettings,
    DnsStatus,
    NameserverSource,
    Resolver,
    ZoneFileError,
    ZoneFileSource,
    build_resolver,
    wire_name,
)
from dnsserver import AuthoritativeDns

OK, NXDOMAIN, NODATA, TEMPFAIL = DnsStatus.OK, DnsStatus.NXDOMAIN, DnsStatus.NODATA, DnsStatus.TEMPFAIL

LIVE_ZONE = "live.resolver.example"
LIVE_RECORDS = """
    spf         TXT  "v=spf1 ip4:192.0.2.0/24 " "include:_spf.resolver.example " "-all"
    two         TXT  "first record"
    two         TXT  "second " "record"
    www    600  A    192.0.2.10
    www    600  A    192.0.2.11
    @           MX   10 mx1
    @           MX   20 mx2.elsewhere.example.
    mx1         A    192.0.2.25
    alias       CNAME middle
    middle      CNAME target
    target      TXT  "reached through CNAMEs"
    deep.below  TXT  "makes below an empty non-terminal"
    *.wild      TXT  "synthesised"
    host.wild   A    192.0.2.30
    *.cw        CNAME target
    dangling    CNAME nowhere
    big         TXT  {big}
    short  30   CNAME target
""".format(big=" ".join(f'"{chr(97 + n) * 250}"' for n in range(8)))
# Negative TTL = min(SOA TTL, SOA MINIMUM) (RFC 2308 §5): one zone where each is the smaller.
LOW_MINIMUM_ZONE = "low-minimum.resolver.example"
LOW_SOA_TTL_ZONE = "low-soa-ttl.resolver.example"

# Outage tests: one lookup, retries included, may take this long.
OUTAGE_TIMEOUT = 1.0
# Scheduling slack on a loaded CI machine.
SLACK = 0.5


def name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def ask(source: NameserverSource | ZoneFileSource, qname: str, rdtype: str) -> DnsAnswer:
    return source.lookup(name(qname), dns.rdatatype.RdataType.make(rdtype))


def ordered(answer: DnsAnswer) -> list[DnsRecord]:
    return sorted(answer.records, key=str)


class FakeClock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def live(dns_server: AuthoritativeDns) -> AuthoritativeDns:
    dns_server.add_zone(LIVE_ZONE, LIVE_RECORDS, soa_ttl=3600, soa_minimum=120)
    dns_server.add_zone(LOW_MINIMUM_ZONE, "www A 192.0.2.1", soa_ttl=3600, soa_minimum=45)
    dns_server.add_zone(LOW_SOA_TTL_ZONE, "www A 192.0.2.1", soa_ttl=30, soa_minimum=900)
    dns_server.reload()
    return dns_server


@pytest.fixture
def nameserver(live: AuthoritativeDns) -> NameserverSource:
    return NameserverSource([live.host], port=live.port, timeout=2.0)


@contextmanager
def outage(server: AuthoritativeDns) -> Iterator[None]:
    """The server is down inside the block, and up again after it, whatever happens."""
    server.stop()
    try:
        yield
    finally:
        server.start()


# --- NameserverSource against the real server ---------------------------------------------------


def test_txt_character_strings_are_joined_per_record(nameserver: NameserverSource) -> None:
    # RFC 7208 §3.3: the strings of one TXT record are concatenated without spaces.
    answer = ask(nameserver, f"spf.{LIVE_ZONE}", "TXT")
    assert answer.status is OK
    assert answer.texts == ("v=spf1 ip4:192.0.2.0/24 include:_spf.resolver.example -all",)


def test_txt_records_stay_separate(nameserver: NameserverSource) -> None:
    answer = ask(nameserver, f"two.{LIVE_ZONE}", "TXT")
    assert sorted(answer.texts) == ["first record", "second record"]


def test_a_records_with_their_ttl(nameserver: NameserverSource) -> None:
    answer = ask(nameserver, f"www.{LIVE_ZONE}", "A")
    assert answer.status is OK
    assert ordered(answer) == ["192.0.2.10", "192.0.2.11"]
    assert answer.ttl == 600


def test_mx_records(nameserver: NameserverSource) -> None:
    answer = ask(nameserver, LIVE_ZONE, "MX")
    assert answer.status is OK
    assert ordered(answer) == [(10, f"mx1.{LIVE_ZONE}"), (20, "mx2.elsewhere.example")]


def test_nxdomain_is_not_nodata(nameserver: NameserverSource) -> None:
    missing = ask(nameserver, f"missing.{LIVE_ZONE}", "TXT")
    assert (missing.status, missing.exists, missing.records) == (NXDOMAIN, False, ())
    # www exists with A records only.
    no_txt = ask(nameserver, f"www.{LIVE_ZONE}", "TXT")
    assert (no_txt.status, no_txt.exists, no_txt.records) == (NODATA, True, ())


def test_empty_non_terminal_is_nodata(nameserver: NameserverSource) -> None:
    # RFC 8020: a name with descendants exists even without records of its own.
    assert ask(nameserver, f"below.{LIVE_ZONE}", "TXT").status is NODATA


def test_cname_chain_is_followed(nameserver: NameserverSource) -> None:
    answer = ask(nameserver, f"alias.{LIVE_ZONE}", "TXT")
    assert answer.status is OK
    assert answer.texts == ("reached through CNAMEs",)


def test_truncated_answer_is_asked_again_over_tcp(nameserver: NameserverSource) -> None:
    # 2 KB of TXT exceeds the 1232-byte UDP payload we offer: the server truncates (TC), and the
    # answer comes whole over TCP (RFC 7766 §5), not cut short or as a failure.
    answer = ask(nameserver, f"big.{LIVE_ZONE}", "TXT")
    assert answer.status is OK
    assert answer.texts == ("".join(chr(97 + n) * 250 for n in range(8)),)


def test_an_answer_through_cnames_lives_as_long_as_its_shortest_link(nameserver: NameserverSource) -> None:
    # RFC 2181 §5.2: the record reached through "short" (30 s) cannot be cached for the target's 300 s.
    assert ask(nameserver, f"target.{LIVE_ZONE}", "TXT").ttl == 300
    answer = ask(nameserver, f"short.{LIVE_ZONE}", "TXT")
    assert (answer.status, answer.texts, answer.ttl) == (OK, ("reached through CNAMEs",), 30)


@pytest.mark.parametrize(
    ("zone", "expected_ttl"),
    [(LIVE_ZONE, 120), (LOW_MINIMUM_ZONE, 45), (LOW_SOA_TTL_ZONE, 30)],
)
def test_negative_ttl_comes_from_the_soa(nameserver: NameserverSource, zone: str, expected_ttl: int) -> None:
    # RFC 2308 §5: min(SOA TTL, SOA MINIMUM), for NXDOMAIN and NODATA alike.
    nxdomain = ask(nameserver, f"missing.{zone}", "TXT")
    nodata = ask(nameserver, f"www.{zone}", "TXT")
    assert (nxdomain.status, nxdomain.ttl) == (NXDOMAIN, expected_ttl)
    assert (nodata.status, nodata.ttl) == (NODATA, expected_ttl)


def test_server_down_is_tempfail_within_the_timeout(live: AuthoritativeDns) -> None:
    source = NameserverSource([live.host], port=live.port, timeout=OUTAGE_TIMEOUT)
    with outage(live):
        started = time.monotonic()
        answer = ask(source, f"spf.{LIVE_ZONE}", "TXT")
        elapsed = time.monotonic() - started
    assert answer.status is TEMPFAIL
    assert "timeout" in answer.reason
    assert answer.ttl == 0
    assert elapsed < OUTAGE_TIMEOUT + SLACK


def test_tempfail_is_not_cached(live: AuthoritativeDns) -> None:
    resolver = Resolver(NameserverSource([live.host], port=live.port, timeout=OUTAGE_TIMEOUT))
    with outage(live):
        assert resolver.txt(f"spf.{LIVE_ZONE}").status is TEMPFAIL
    # The server is back: the next query asks it again instead of replaying the failure.
    assert resolver.txt(f"spf.{LIVE_ZONE}").status is OK
    assert resolver.queries == 2


def test_build_resolver_asks_the_configured_nameservers(live: AuthoritativeDns) -> None:
    resolver = build_resolver(DnsSettings(nameservers=(live.host,), port=live.port, timeout=2.0))
    assert resolver.txt(f"target.{LIVE_ZONE}").texts == ("reached through CNAMEs",)


# Names asked of both the real server and ZoneFileSource loading the very same zone file: the
# offline source must answer as an authoritative server does (RFC 1034 §4.3.2, RFC 4592).
SAME_AS_SERVER = [
    ("spf", "TXT"),
    ("www", "A"),
    ("www", "TXT"),
    ("@", "MX"),
    ("missing", "A"),
    ("below", "TXT"),
    ("deep.below", "TXT"),
    ("alias", "TXT"),
    ("alias", "A"),
    ("alias", "CNAME"),
    ("anything.wild", "TXT"),
    ("two.labels.wild", "TXT"),
    ("wild", "TXT"),
    ("host.wild", "TXT"),
    ("below.host.wild", "TXT"),
    ("x.cw", "TXT"),
    ("dangling", "TXT"),
]


@pytest.mark.parametrize(("relative", "rdtype"), SAME_AS_SERVER)
def test_zone_file_source_answers_like_the_server(
    live: AuthoritativeDns, nameserver: NameserverSource, relative: str, rdtype: str
) -> None:
    offline = ZoneFileSource([live.zone_dir / f"{LIVE_ZONE}.zone"])
    qname = LIVE_ZONE if relative == "@" else f"{relative}.{LIVE_ZONE}"
    served, read = ask(nameserver, qname, rdtype), ask(offline, qname, rdtype)
    assert (read.status, ordered(read), read.ttl) == (served.status, ordered(served), served.ttl)


# --- The cache --------------------------------------------------------------------------------

CACHE_ZONE = """\
@    3600 IN SOA ns.cache.example. hostmaster.cache.example. 1 3600 600 86400 60
@    3600 IN NS  ns.elsewhere.example.
a     300 IN TXT "a"
b     300 IN TXT "b"
c     300 IN TXT "c"
forever 2147483647 IN TXT "capped"
loop1 300 IN CNAME loop2
loop2 300 IN CNAME loop1
"""


@pytest.fixture
def cache_zone(tmp_path: Path) -> ZoneFileSource:
    path = tmp_path / "cache.example.zone"
    path.write_text(CACHE_ZONE, encoding="utf-8")
    return ZoneFileSource([path])


def test_positive_answer_expires_at_its_ttl(cache_zone: ZoneFileSource) -> None:
    clock = FakeClock()
    resolver = Resolver(cache_zone, clock=clock)
    assert resolver.txt("a.cache.example").texts == ("a",)
    clock.now += 299
    resolver.txt("a.cache.example")
    assert resolver.queries == 1
    clock.now += 1
    assert resolver.txt("a.cache.example").texts == ("a",)
    assert resolver.queries == 2


@pytest.mark.parametrize(
    ("qname", "status"), [("missing.cache.example", NXDOMAIN), ("a.cache.example", NODATA)]
)
def test_negative_answer_expires_at_the_soa_minimum(
    cache_zone: ZoneFileSource, qname: str, status: DnsStatus
) -> None:
    clock = FakeClock()
    resolver = Resolver(cache_zone, clock=clock)
    assert resolver.query(qname, "A").status is status
    clock.now += 59
    assert resolver.query(qname, "A").status is status
    assert resolver.queries == 1
    clock.now += 1
    resolver.query(qname, "A")
    assert resolver.queries == 2


def test_ttl_is_capped(cache_zone: ZoneFileSource) -> None:
    clock = FakeClock()
    resolver = Resolver(cache_zone, clock=clock)
    assert resolver.txt("forever.cache.example").ttl == 2147483647
    clock.now += MAX_CACHE_TTL - 1
    resolver.txt("forever.cache.example")
    assert resolver.queries == 1
    clock.now += 1
    resolver.txt("forever.cache.example")
    assert resolver.queries == 2


def test_least_recently_used_is_evicted(cache_zone: ZoneFileSource) -> None:
    resolver = Resolver(cache_zone, cache_size=2, clock=FakeClock())
    for label in ("a", "b", "a", "c"):  # a is used again, so c evicts b
        resolver.txt(f"{label}.cache.example")
    assert resolver.queries == 3
    resolver.txt("a.cache.example")
    assert resolver.queries == 3
    resolver.txt("b.cache.example")
    assert resolver.queries == 4


def test_cache_size_zero_disables_the_cache(cache_zone: ZoneFileSource) -> None:
    resolver = Resolver(cache_zone, cache_size=0, clock=FakeClock())
    resolver.txt("a.cache.example")
    resolver.txt("a.cache.example")
    assert resolver.queries == 2


def test_cache_key_is_name_and_type(cache_zone: ZoneFileSource) -> None:
    resolver = Resolver(cache_zone, clock=FakeClock())
    assert resolver.query("a.cache.example", "TXT").status is OK
    assert resolver.query("A.Cache.Example.", "A").status is NODATA  # names compare case-blind
    assert resolver.query("A.CACHE.example", "TXT").status is OK
    assert resolver.queries == 2


def test_zone_file_tempfail_is_not_cached(cache_zone: ZoneFileSource) -> None:
    resolver = Resolver(cache_zone, cache_size=1, clock=FakeClock())
    resolver.txt("a.cache.example")
    assert resolver.txt("loop1.cache.example").status is TEMPFAIL
    assert resolver.txt("loop1.cache.example").status is TEMPFAIL
    # Nor does a failure take a cache slot: the one good answer is still there.
    resolver.txt("a.cache.example")
    assert resolver.queries == 3


# --- ZoneFileSource ---------------------------------------------------------------------------


def soa(ttl: int = 3600, minimum: int = 60) -> str:
    return f"@ {ttl} IN SOA ns.elsewhere.example. hostmaster.elsewhere.example. 1 3600 600 86400 {minimum}\n"


SOA = soa()


def write(directory: Path, filename: str, text: str) -> Path:
    path = directory / filename
    path.write_text(text, encoding="utf-8")
    return path


def test_origin_comes_from_the_file_name(tmp_path: Path) -> None:
    source = ZoneFileSource([write(tmp_path, "sender.example.zone", SOA + "www A 192.0.2.1\n")])
    assert ordered(ask(source, "www.sender.example", "A")) == ["192.0.2.1"]
    assert ask(source, "www.sender.example.zone", "A").status is NXDOMAIN


def test_origin_directive_wins_over_the_file_name(tmp_path: Path) -> None:
    text = "$ORIGIN other.example.\n" + SOA + "www A 192.0.2.2\n"
    source = ZoneFileSource([write(tmp_path, "misnamed.example.zone", text)])
    assert ordered(ask(source, "www.other.example", "A")) == ["192.0.2.2"]
    assert ask(source, "www.misnamed.example", "A").status is NXDOMAIN


def test_origin_directive_in_a_comment_is_ignored(tmp_path: Path) -> None:
    text = "; no $ORIGIN line: the file name gives it\n" + SOA + "www A 192.0.2.3\n"
    source = ZoneFileSource([write(tmp_path, "commented.example.zone", text)])
    assert ordered(ask(source, "www.commented.example", "A")) == ["192.0.2.3"]


def test_names_outside_every_zone_are_nxdomain(tmp_path: Path) -> None:
    source = ZoneFileSource([write(tmp_path, "sender.example.zone", SOA + "www A 192.0.2.1\n")])
    for qname in ("example", "other.example", "www.sender.example.net"):
        answer = ask(source, qname, "A")
        assert (answer.status, answer.ttl) == (NXDOMAIN, DEFAULT_NEGATIVE_TTL)


def test_most_specific_zone_answers(tmp_path: Path) -> None:
    parent = write(tmp_path, "example.zone", SOA + 'www.child TXT "from the parent"\n')
    child = write(tmp_path, "child.example.zone", SOA + 'www TXT "from the child"\n')
    for order in ([parent, child], [child, parent]):
        assert ZoneFileSource(order).lookup(name("www.child.example"), dns.rdatatype.TXT).texts == (
            "from the child",
        )


WILD_ZONE = (
    SOA
    + """\
*           TXT   "apex wildcard"
*.wild      TXT   "wild"
host.wild   A     192.0.2.30
sub.*.wild  TXT   "below a wildcard label"
"""
)


@pytest.mark.parametrize(
    ("relative", "rdtype", "status", "texts"),
    [
        ("x.wild", "TXT", OK, ("wild",)),
        ("y.x.wild", "TXT", OK, ("wild",)),
        ("x.wild", "A", NODATA, ()),
        ("host.wild", "TXT", NODATA, ()),  # an existing name blocks the wildcard (RFC 4592 §2.2.1)
        ("z.host.wild", "TXT", NXDOMAIN, ()),  # closest encloser host.wild has no '*' child
        ("unknown", "TXT", OK, ("apex wildcard",)),
        ("wild", "TXT", NODATA, ()),
        ("*.wild", "TXT", OK, ("wild",)),
    ],
)
def test_wildcards(
    tmp_path: Path, relative: str, rdtype: str, status: DnsStatus, texts: tuple[str, ...]
) -> None:
    source = ZoneFileSource([write(tmp_path, "wild.example.zone", WILD_ZONE)])
    answer = ask(source, f"{relative}.wild.example", rdtype)
    assert (answer.status, answer.texts) == (status, texts)


@pytest.mark.parametrize(("soa_ttl", "minimum", "expected"), [(3600, 60, 60), (30, 900, 30)])
def test_zone_file_negative_ttl_comes_from_the_soa(
    tmp_path: Path, soa_ttl: int, minimum: int, expected: int
) -> None:
    # RFC 2308 §5: min(SOA TTL, SOA MINIMUM).
    source = ZoneFileSource(
        [write(tmp_path, "neg.example.zone", soa(soa_ttl, minimum) + "www A 192.0.2.1\n")]
    )
    assert ask(source, "missing.neg.example", "A").ttl == expected
    assert ask(source, "www.neg.example", "TXT").ttl == expected


def test_empty_non_terminal_is_nodata_in_zone_files(tmp_path: Path) -> None:
    source = ZoneFileSource([write(tmp_path, "ent.example.zone", SOA + '_dmarc.sub TXT "v=DMARC1"\n')])
    answer = ask(source, "sub.ent.example", "TXT")
    assert (answer.status, answer.ttl) == (NODATA, 60)
    assert ask(source, "other.ent.example", "TXT").status is NXDOMAIN


def cname_chain(length: int) -> str:
    """``length`` CNAMEs from c0 to c<length>, which has the TXT record."""
    links = "".join(f"c{i} CNAME c{i + 1}\n" for i in range(length))
    return SOA + links + f'c{length} TXT "end"\n'


def test_cname_chain_is_followed_in_zone_files(tmp_path: Path) -> None:
    source = ZoneFileSource([write(tmp_path, "chain.example.zone", cname_chain(MAX_CNAME_CHAIN - 1))])
    assert ask(source, "c0.chain.example", "TXT").texts == ("end",)
    # Asking for the CNAME itself returns it rather than following it.
    assert ordered(ask(source, "c0.chain.example", "CNAME")) == ["c1.chain.example."]


def test_cname_loop_is_a_tempfail(tmp_path: Path) -> None:
    text = SOA + "a CNAME b\nb CNAME a\n"
    answer = ask(ZoneFileSource([write(tmp_path, "loop.example.zone", text)]), "a.loop.example", "TXT")
    assert answer.status is TEMPFAIL
    assert "CNAME chain" in answer.reason


def test_cname_chain_bound_is_exact(tmp_path: Path) -> None:
    at_bound = ZoneFileSource([write(tmp_path, "chain.example.zone", cname_chain(MAX_CNAME_CHAIN))])
    assert ask(at_bound, "c0.chain.example", "TXT").texts == ("end",)
    over_bound = ZoneFileSource([write(tmp_path, "over.example.zone", cname_chain(MAX_CNAME_CHAIN + 1))])
    assert ask(over_bound, "c0.over.example", "TXT").status is TEMPFAIL


def test_cname_out_of_every_zone_is_nxdomain(tmp_path: Path) -> None:
    text = SOA + "away CNAME host.nowhere.example.\n"
    source = ZoneFileSource([write(tmp_path, "out.example.zone", text)])
    assert ask(source, "away.out.example", "TXT").status is NXDOMAIN


def test_bad_zone_file_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.example.zone", SOA + "ok A 192.0.2.1\nwww IN BOGUS data\n")
    with pytest.raises(ZoneFileError) as error:
        ZoneFileSource([path])
    assert f"{path}:3:" in str(error.value)
    assert "BOGUS" in str(error.value)


def test_unreadable_zone_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.example.zone"
    with pytest.raises(ZoneFileError, match=str(path)):
        ZoneFileSource([path])


def test_build_resolver_reads_zone_files_offline(tmp_path: Path) -> None:
    path = write(tmp_path, "sender.example.zone", SOA + "www A 192.0.2.1\n")
    # The nameserver is unroutable: an answer can only come from the file.
    settings = DnsSettings(nameservers=("192.0.2.53",), timeout=0.1, zone_files=(str(path),))
    assert ordered(build_resolver(settings).query("www.sender.example", "A")) == ["192.0.2.1"]


# --- Malformed names --------------------------------------------------------------------------

MALFORMED_NAMES = [
    "a..example",  # empty label
    "..",
    ".example",
    "x" * 300,
    ("a" * 63 + ".") * 4 + "example",  # every label legal, the name over 255 octets
    "a" * 64 + ".example",
    "\udcff.example",  # a lone surrogate from a badly decoded header
    "bad\\999escape.example",
]


@pytest.mark.parametrize("qname", MALFORMED_NAMES)
def test_malformed_name_is_nxdomain_without_a_lookup(cache_zone: ZoneFileSource, qname: str) -> None:
    resolver = Resolver(cache_zone)
    answer = resolver.query(qname, "TXT")
    assert answer.status is NXDOMAIN
    assert answer.reason.startswith("invalid name")
    assert resolver.queries == 0


@pytest.mark.parametrize("qname", ["bücher.example", "例え.example", "_dmarc.ünïcode.cache.example"])
def test_non_ascii_name_never_raises(cache_zone: ZoneFileSource, qname: str) -> None:
    # IDNA-encodable names become A-labels and are looked up like any other.
    assert Resolver(cache_zone).txt(qname).status is NXDOMAIN


def _wire(parse: Callable[[str], bytes], text: str) -> bytes | None:
    try:
        return parse(text)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return None


@pytest.mark.parametrize(
    "text",
    [
        *MALFORMED_NAMES,
        "",
        ".",
        "@",
        "a.@",
        "Sel._DomainKey.Sender-1.example",
        "sender.example.",
        "*.wild.example",
        "with space.example",
        ("a" * 63 + ".") * 3 + "a" * 61,  # 255 octets: the longest name
        "bücher.example",
        "a" * 64 + "..example",  # two faults
        ("a" * 63 + ".") * 4 + ".example",
        "a" * 64 + "." + ("a" * 63 + ".") * 4,
    ],
)
def test_wire_name_is_dnspython_from_text(text: str) -> None:
    # The same wire form, case kept, or refused as dnspython's parser refuses it.
    assert _wire(wire_name, text) == _wire(lambda t: dns.name.from_text(t).to_wire(), text)


@pytest.mark.parametrize("rdtype", ["NOSUCHTYPE", "", 65536, -1])
def test_bad_record_type_never_raises(cache_zone: ZoneFileSource, rdtype: str | int) -> None:
    resolver = Resolver(cache_zone)
    assert resolver.query("a.cache.example", rdtype).status is NXDOMAIN  # type: ignore[arg-type]
    assert resolver.queries == 0


# --- Derived values (Resolver.derived) ----------------------------------------------------------


def _texts_of(resolver: Resolver, *labels: str) -> tuple[str, ...]:
    return tuple(text for label in labels for text in resolver.txt(f"{label}.cache.example").texts)


def test_derived_value_is_kept_until_its_first_answer_expires(cache_zone: ZoneFileSource) -> None:
    clock = FakeClock()
    resolver = Resolver(cache_zone, clock=clock)
    computed: list[int] = []

    def compute() -> tuple[str, ...]:
        computed.append(1)
        return _texts_of(resolver, "a", "forever")

    assert resolver.derived("both", compute) == ("a", "capped")
    clock.now += 299  # "a" has TTL 300, "forever" is capped at a day
    assert resolver.derived("both", compute) == ("a", "capped")
    assert len(computed) == 1
    clock.now += 2
    resolver.derived("both", compute)
    assert len(computed) == 2


def test_derived_value_that_saw_a_tempfail_is_not_kept(cache_zone: ZoneFileSource) -> None:
    resolver = Resolver(cache_zone, clock=FakeClock())
    computed: list[int] = []

    def compute() -> str:
        computed.append(1)
        return str(resolver.txt("loop1.cache.example").status)

    resolver.derived("loop", compute)
    resolver.derived("loop", compute)
    assert len(computed) == 2


def test_derived_value_refused_by_keep_is_not_kept(cache_zone: ZoneFileSource) -> None:
    resolver = Resolver(cache_zone, clock=FakeClock())
    computed: list[int] = []

    def compute() -> tuple[str, ...]:
        computed.append(1)
        return _texts_of(resolver, "a")

    for _ in range(2):
        resolver.derived("a", compute, keep=lambda value: False)
    assert len(computed) == 2


def test_derived_value_of_an_oversized_key_is_not_kept(cache_zone: ZoneFileSource) -> None:
    """Keys hold what senders send: a hostile one as long as a header field must not stay in memory."""
    resolver = Resolver(cache_zone, clock=FakeClock())
    computed: list[int] = []

    def compute() -> tuple[str, ...]:
        computed.append(1)
        return _texts_of(resolver, "a")

    hostile = ("dkim-key", b"s", b"d", b"rsa-sha256", b"@d" * MAX_KEPT_KEY_LENGTH)
    for _ in range(2):
        assert resolver.derived(hostile, compute) == ("a",)
    assert len(computed) == 2
    for _ in range(2):
        resolver.derived(hostile[:4], compute)
    assert len(computed) == 3  # a real key's is kept


def test_nested_derived_value_shortens_the_outer_one(cache_zone: ZoneFileSource) -> None:
    clock = FakeClock()
    resolver = Resolver(cache_zone, clock=clock)
    inner = lambda: _texts_of(resolver, "a")  # noqa: E731
    resolver.derived("inner", inner)  # kept; the outer computation below only gets the kept value
    outer_runs: list[int] = []

    def outer() -> tuple[str, ...]:
        outer_runs.append(1)
        return resolver.derived("inner", inner) + _texts_of(resolver, "forever")

    clock.now += 200
    resolver.derived("outer", outer)
    clock.now += 101  # past the inner value's expiry (300 s after it was computed)
    resolver.derived("outer", outer)
    assert len(outer_runs) == 2


class GatedSource:
    """Zone-file answers that wait at a gate the test opens, counting the lookups."""

    def __init__(self, zone: ZoneFileSource) -> None:
        self.zone = zone
        self.lookups = 0
        self.entered = threading.Event()
        self.gate = threading.Event()

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        self.lookups += 1
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.zone.lookup(name, rdtype)


def _blocked_in(thread: threading.Thread, function: str) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function and frame.f_code.co_filename.endswith("resolver.py"):
            return True
        frame = frame.f_back
    return False


def test_a_second_asker_waits_for_the_lookup_on_its_way(cache_zone: ZoneFileSource) -> None:
    source = GatedSource(cache_zone)
    resolver = Resolver(source)
    answers: dict[str, DnsAnswer] = {}
    first = threading.Thread(target=lambda: answers.setdefault("first", resolver.txt("a.cache.example")))
    second = threading.Thread(target=lambda: answers.setdefault("second", resolver.txt("A.cache.example")))
    first.start()
    assert source.entered.wait(30)
    second.start()
    deadline = time.monotonic() + 30
    while not _blocked_in(second, "wait") and second.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert _blocked_in(second, "wait"), "the second asker should wait for the first's lookup"
    source.gate.set()
    first.join(30)
    second.join(30)
    assert answers["first"].texts == answers["second"].texts == ("a",)
    assert (source.lookups, resolver.queries) == (1, 1)


def test_invalid_name_is_not_answered_from_a_similar_cached_name(cache_zone: ZoneFileSource) -> None:
    resolver = Resolver(cache_zone, clock=FakeClock())
    assert resolver.txt("a\\.").status is NXDOMAIN  # valid: one label "a." outside every zone
    assert resolver.txt("a\\").reason.startswith("invalid name")  # a dangling escape


# --- the per-message DNS budget -----------------------------------------------------------------


def test_a_message_budget_refuses_queries_past_its_count(
    cache_zone: ZoneFileSource, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = Resolver(cache_zone, clock=FakeClock())
    budget = DnsBudget(seconds=30, queries=2, queue_id="QB1")
    message = resolver.for_message(budget)
    budget.start("SPF (MAIL FROM)")
    assert message.txt("a.cache.example").texts == ("a",)
    assert message.txt("b.cache.example").texts == ("b",)
    with caplog.at_level(logging.WARNING):
        refused = message.txt("c.cache.example")
        assert message.txt("c.cache.example").status is TEMPFAIL
    assert refused.status is TEMPFAIL
    assert refused.reason == "DNS query budget of this message spent (2 queries)"
    assert resolver.queries == 2, "the view counts into the shared resolver; refused queries are not sent"
    assert message.txt("a.cache.example").texts == ("a",), "cached answers cost nothing"
    [line] = caplog.messages  # once per message, naming the queue id and the check
    assert "queue_id=QB1" in line and "SPF (MAIL FROM)" in line and "after 2 queries" in line
    # The resolver itself and another message's view are not bound by this budget.
    assert resolver.txt("c.cache.example").texts == ("c",)
    other = resolver.for_message(DnsBudget(seconds=30, queries=1))
    assert other.txt("c.cache.example").texts == ("c",)  # cached by the line before
    assert other.txt("forever.cache.example").texts == ("capped",)


def test_a_message_budget_refuses_queries_past_its_time(cache_zone: ZoneFileSource) -> None:
    clock = FakeClock()
    budget = DnsBudget(seconds=10, queries=100, queue_id="QB2", clock=clock)
    message = Resolver(cache_zone, clock=clock).for_message(budget)
    assert message.txt("a.cache.example").status is OK
    clock.now += 10
    refused = message.txt("b.cache.example")
    assert (refused.status, refused.reason) == (TEMPFAIL, "DNS time budget of this message spent (10 s)")
    assert budget.exceeded == refused.reason


def test_a_value_derived_past_the_budget_is_not_kept(cache_zone: ZoneFileSource) -> None:
    resolver = Resolver(cache_zone, clock=FakeClock())
    spent = resolver.for_message(DnsBudget(seconds=30, queries=0))
    assert spent.derived("a", lambda: spent.txt("a.cache.example").status) is TEMPFAIL
    assert resolver.derived("a", lambda: resolver.txt("a.cache.example").status) is OK

"""Tests of authmilter.dnswire: the parse of a response datagram equals what dnspython's parse gave
(responses built by dnspython, and real answers from Knot), and hostile datagrams are refused as
"unusable" (never another exception, never a hang).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import struct
from collections.abc import Iterator, Sequence

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from authmilter.dnswire import (
    DEFAULT_NEGATIVE_TTL,
    MAX_CACHE_TTL,
    MAX_CNAME_CHAIN,
    DnsAnswer,
    DnsStatus,
    UnusableAnswer,
    is_truncated,
    parse_response,
    record_value,
)
from authmilter.resolver import NameserverSource
from dnsserver import AuthoritativeDns

IN = dns.rdataclass.IN


def dnspython_answer(wire: bytes) -> DnsAnswer:
    """What NameserverSource made of a response before dnswire: ``dns.message.from_wire``, then
    the CNAME walk and negative TTL of resolver.py as they were (the reference to compare with)."""
    response = dns.message.from_wire(wire)
    if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise UnusableAnswer(dns.rcode.to_text(response.rcode()))
    question = response.question[0]
    if response.rcode() == dns.rcode.NXDOMAIN:
        return DnsAnswer(DnsStatus.NXDOMAIN, ttl=_dnspython_negative_ttl(response))
    ttl, current = MAX_CACHE_TTL, question.name
    for _ in range(MAX_CNAME_CHAIN + 1):
        rrset = response.get_rrset(response.answer, current, IN, question.rdtype)
        if rrset is not None:
            return DnsAnswer(DnsStatus.OK, tuple(map(record_value, rrset)), ttl=min(ttl, rrset.ttl))
        alias = response.get_rrset(response.answer, current, IN, dns.rdatatype.CNAME)
        if alias is None:
            break
        ttl, current = min(ttl, alias.ttl), alias[0].target
    return DnsAnswer(DnsStatus.NODATA, ttl=_dnspython_negative_ttl(response))


def _dnspython_negative_ttl(response: dns.message.Message) -> int:
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return int(min(rrset.ttl, rrset[0].minimum))
    return DEFAULT_NEGATIVE_TTL


def unordered(answer: DnsAnswer) -> DnsAnswer:
    """The answer with its records in a fixed order: the order within an RRset carries no
    meaning (RFC 2181 §5), and dnspython's rendering does not keep it."""
    return dataclasses.replace(answer, records=tuple(sorted(answer.records, key=repr)))


# --- responses built by dnspython ----------------------------------------------------------------

SOA = "ns.zone.example. hostmaster.zone.example. 1 3600 600 86400 {minimum}"


# An RRset to put in a section: owner, TTL, type, the records in zone-file text.
RRset = tuple[str, int, str, list[str]]


def response(
    qname: str,
    rdtype: str,
    answer: Sequence[RRset] = (),
    authority: Sequence[RRset] = (),
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
) -> bytes:
    """A response as a server writes it (name compression on), with an OPT record like Knot's."""
    query = dns.message.make_query(qname, rdtype, use_edns=0)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    for section, rrsets in ((reply.answer, answer), (reply.authority, authority)):
        for owner, ttl, rtype, texts in rrsets:
            section.append(dns.rrset.from_text_list(owner, ttl, IN, rtype, texts))
    return reply.to_wire(max_size=65535)


def _txt(*strings: str) -> str:
    return " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in strings)


CHAIN = [(f"c{n}.zone.example.", 300 - n, "CNAME", [f"c{n + 1}.zone.example."]) for n in range(12)]

CASES: dict[str, bytes] = {
    "txt": response("sender.example", "TXT", [("sender.example.", 300, "TXT", [_txt("v=spf1 -all")])]),
    "txt several strings and records": response(
        "sender.example",
        "TXT",
        [("sender.example.", 60, "TXT", [_txt("v=spf1 ", "ip4:192.0.2.1 ", "-all"), _txt("other", "")])],
    ),
    "txt empty string": response("e.example", "TXT", [("e.example.", 5, "TXT", ['""'])]),
    "txt 255 octets, quotes, escapes, 8-bit": response(
        "q.example", "TXT", [("q.example.", 5, "TXT", [_txt("a" * 255, 'say "hi"; \\', "\\255\\000")])]
    ),
    "mixed case owner": response("MiXed.Example", "TXT", [("mixed.EXAMPLE.", 30, "TXT", [_txt("found")])]),
    "cname chain": response(
        "c0.zone.example",
        "TXT",
        [*CHAIN[:3], ("C3.Zone.Example.", 600, "TXT", [_txt("end of chain")])],
    ),
    "cname chain at the bound": response(
        "c0.zone.example",
        "TXT",
        [*CHAIN[:MAX_CNAME_CHAIN], (f"c{MAX_CNAME_CHAIN}.zone.example.", 9, "TXT", ['"x"'])],
    ),
    "cname chain past the bound": response(
        "c0.zone.example",
        "TXT",
        [*CHAIN[: MAX_CNAME_CHAIN + 1], (f"c{MAX_CNAME_CHAIN + 1}.zone.example.", 9, "TXT", ['"x"'])],
    ),
    "cname to nothing": response(
        "c0.zone.example", "A", CHAIN[:2], [("zone.example.", 3600, "SOA", [SOA.format(minimum=40)])]
    ),
    "cname asked as such": response("c0.zone.example", "CNAME", CHAIN[:2]),
    "several rrsets": response(
        "multi.example",
        "A",
        [
            ("multi.example.", 300, "TXT", [_txt("not asked")]),
            ("other.example.", 300, "A", ["192.0.2.99"]),
            ("multi.example.", 300, "A", ["192.0.2.1", "192.0.2.2", "198.51.100.7"]),
            ("multi.example.", 300, "AAAA", ["2001:db8::1"]),
        ],
    ),
    "aaaa": response(
        "v6.example",
        "AAAA",
        [("v6.example.", 77, "AAAA", ["2001:db8::1", "::ffff:192.0.2.1", "2001:db8:0:1:2:3:4:5"])],
    ),
    "mx compressed": response(
        "mail.example",
        "MX",
        [("mail.example.", 3600, "MX", ["10 mx1.mail.example.", "20 MX2.Elsewhere.example.", "0 ."])],
    ),
    "mx odd labels": response(
        "odd.example", "MX", [("odd.example.", 60, "MX", ["5 a\\.b.c\\@d\\032e\\255.example."])]
    ),
    "ptr": response(
        "5.113.0.203.in-addr.arpa",
        "PTR",
        [("5.113.0.203.in-addr.arpa.", 86400, "PTR", ["client.Sender.example."])],
    ),
    "nxdomain with soa": response(
        "missing.zone.example",
        "TXT",
        authority=[("zone.example.", 3600, "SOA", [SOA.format(minimum=120)])],
        rcode=dns.rcode.NXDOMAIN,
    ),
    "nxdomain soa ttl smaller": response(
        "missing.zone.example",
        "TXT",
        authority=[("zone.example.", 30, "SOA", [SOA.format(minimum=900)])],
        rcode=dns.rcode.NXDOMAIN,
    ),
    "nxdomain without soa": response("missing.example", "TXT", rcode=dns.rcode.NXDOMAIN),
    "nodata with soa": response(
        "zone.example",
        "AAAA",
        [("zone.example.", 300, "A", ["192.0.2.1"])],
        [
            ("zone.example.", 3600, "NS", ["ns.zone.example."]),
            ("zone.example.", 3600, "SOA", [SOA.format(minimum=45)]),
        ],
    ),
    "nodata without soa": response("zone.example", "MX"),
    "soa asked": response("zone.example", "SOA", [("zone.example.", 3600, "SOA", [SOA.format(minimum=45)])]),
    "caa asked": response("zone.example", "CAA", [("zone.example.", 3600, "CAA", ['0 issue "ca.example"'])]),
    "spf type": response("old.example", "SPF", [("old.example.", 3600, "SPF", [_txt("v=spf1 -all")])]),
}


@pytest.mark.parametrize("wire", CASES.values(), ids=CASES.keys())
def test_parse_equals_dnspython(wire: bytes) -> None:
    assert unordered(parse_response(wire)) == unordered(dnspython_answer(wire))


def _question_of(wire: bytes) -> bytes:
    """The question section as the resolver sent it: the name in wire form, type, class."""
    question = dns.message.from_wire(wire).question[0]
    return bytes(question.name.to_wire()) + struct.pack("!HH", question.rdtype, question.rdclass)


@pytest.mark.parametrize("wire", CASES.values(), ids=CASES.keys())
def test_a_question_given_is_the_question_read(wire: bytes) -> None:
    # The resolver passes the question it sent (the response repeats it) instead of having it read.
    assert parse_response(wire, _question_of(wire)) == parse_response(wire)


def test_a_question_name_compressed_is_read_decompressed() -> None:
    # A pointer is allowed wherever it points backwards (RFC 1035 §4.1.4), even into the header:
    # here at the ARCOUNT of 0, which reads as the root name, the owner of the answer.
    wire = _header(answers=1) + b"\xc0\x0a" + struct.pack("!HH", 16, 1) + _owner(b"\x00")
    assert parse_response(wire) == dnspython_answer(wire)
    assert parse_response(wire).texts == ("ok",)


def test_an_owner_pointing_into_the_question_is_read_as_the_walk_reads_it() -> None:
    # Owners that point into the question's name are taken from it without the name walk: at a
    # label boundary the parent name (not the question's: no match), mid-label the walk's refusal.
    wire = CASES["txt"]
    owner = wire.index(b"\xc0\x0c", 12)
    parent = wire[:owner] + b"\xc0\x13" + wire[owner + 2 :]  # "example." in "sender.example."
    assert parent[0x13 : 0x13 + 8] == b"\x07example"
    assert parse_response(parent) == dnspython_answer(parent)
    assert parse_response(parent).status is DnsStatus.NODATA
    mid_label = wire[:owner] + b"\xc0\x0d" + wire[owner + 2 :]  # the "s" of "sender"
    with pytest.raises(UnusableAnswer, match="not a length"):
        parse_response(mid_label)


def test_a_response_to_another_question_is_unusable() -> None:
    wire = CASES["txt"]
    other = _question_of(CASES["mixed case owner"])
    with pytest.raises(UnusableAnswer, match="not to the question asked"):
        parse_response(wire, other)
    with pytest.raises(UnusableAnswer, match="not to the question asked"):
        parse_response(wire, _question_of(wire)[:-1] + b"\x02")  # class CH, not IN


def test_values_are_the_plain_values_the_checks_use() -> None:
    assert unordered(parse_response(CASES["txt several strings and records"])).records == (
        (b"other", b""),
        (b"v=spf1 ", b"ip4:192.0.2.1 ", b"-all"),
    )
    assert sorted(parse_response(CASES["mx compressed"]).records) == [
        (0, "."),
        (10, "mx1.mail.example"),
        (20, "MX2.Elsewhere.example"),
    ]
    assert parse_response(CASES["ptr"]).records == ("client.Sender.example",)
    assert sorted(parse_response(CASES["aaaa"]).records) == [
        "2001:db8:0:1:2:3:4:5",
        "2001:db8::1",
        "::ffff:192.0.2.1",
    ]
    chain = parse_response(CASES["cname chain"])
    assert (chain.texts, chain.ttl) == (("end of chain",), 298)  # the CNAMEs' shortest TTL
    assert parse_response(CASES["cname asked as such"]).records == ("c1.zone.example.",)
    assert parse_response(CASES["nxdomain soa ttl smaller"]) == DnsAnswer(DnsStatus.NXDOMAIN, ttl=30)


def _with_class_ch(wire: bytes, section: str, owner: str, rdtype: str, text: str) -> bytes:
    """``wire`` with a record of class CH added first to ``section`` (a server may send one)."""
    reply = dns.message.from_wire(wire)
    getattr(reply, section).insert(0, dns.rrset.from_text(owner, 1, dns.rdataclass.CH, rdtype, text))
    return reply.to_wire(max_size=65535)


@pytest.mark.parametrize(
    "case",
    [
        ("txt", "answer", "sender.example.", "TXT", '"chaos"'),
        ("cname chain", "answer", "c0.zone.example.", "CNAME", "elsewhere.example."),
        ("nxdomain with soa", "authority", "zone.example.", "SOA", SOA.format(minimum=7)),
    ],
    ids=["txt", "cname", "soa"],
)
def test_records_of_another_class_are_ignored(case: tuple[str, str, str, str, str]) -> None:
    # RFC 1035 §3.2: only class IN records answer an IN question (the negative TTL included).
    name, *record = case
    assert parse_response(_with_class_ch(CASES[name], *record)) == parse_response(CASES[name])


def _random_response(rng: random.Random) -> bytes:
    """A response mixing what servers send: aliases, several types and owners, case changes."""
    owners = [f"{rng.choice(['a', 'B', 'mx'])}{n}.Zone.example." for n in range(4)]
    rdtype = rng.choice(["TXT", "A", "AAAA", "MX", "PTR"])
    answer: list[RRset] = []
    for owner in rng.sample(owners, rng.randint(0, 4)):
        rtype = rng.choice([rdtype, rdtype, "CNAME", "TXT"])
        count = 1 if rtype == "CNAME" else rng.randint(1, 3)
        texts = {
            "TXT": lambda: _txt(
                *(rng.choice(["", "v=spf1", "x" * rng.randint(0, 255)]) for _ in range(rng.randint(1, 3)))
            ),
            "A": lambda: f"192.0.2.{rng.randint(0, 255)}",
            "AAAA": lambda: f"2001:db8::{rng.randint(0, 65535):x}",
            "MX": lambda: f"{rng.randint(0, 65535)} {rng.choice(owners).swapcase()}",
            "PTR": lambda: rng.choice(owners),
            "CNAME": lambda: rng.choice(owners).upper(),
        }[rtype]
        answer.append(
            (
                owner.lower() if rng.random() < 0.5 else owner,
                rng.randint(0, 2**31 - 1),
                rtype,
                [texts() for _ in range(count)],
            )
        )
    authority = [("zone.example.", rng.randint(0, 10**6), "SOA", [SOA.format(minimum=rng.randint(0, 10**6))])]
    rcode = rng.choice([dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN])
    return response(rng.choice(owners), rdtype, answer, authority if rng.random() < 0.7 else [], rcode)


def test_parse_equals_dnspython_on_random_responses() -> None:
    rng = random.Random(11)
    for _ in range(400):
        wire = _random_response(rng)
        assert unordered(parse_response(wire)) == unordered(dnspython_answer(wire)), dns.message.from_wire(
            wire
        ).to_text()
        assert parse_response(wire, _question_of(wire)) == parse_response(wire)


# --- against real Knot ---------------------------------------------------------------------------

WIRE_ZONE = "wire.resolver.example"
WIRE_RECORDS = """
    @           TXT  "v=spf1 " "a mx -all"
    @           TXT  ""
    @           A    192.0.2.1
    @           AAAA 2001:db8::25
    @           MX   10 mx
    @           MX   20 Backup.Elsewhere.example.
    mx          A    192.0.2.25
    Mixed       TXT  "Case"
    alias       CNAME Mixed
    loop1       CNAME loop2
    loop2       CNAME loop1
    1.2         PTR  host.wire.resolver.example.
"""


@pytest.fixture(scope="module")
def knot(dns_server: AuthoritativeDns) -> AuthoritativeDns:
    dns_server.add_zone(WIRE_ZONE, WIRE_RECORDS, soa_ttl=3600, soa_minimum=77)
    dns_server.reload()
    return dns_server


@pytest.mark.parametrize(
    ("relative", "rdtype"),
    [
        ("@", "TXT"),
        ("@", "A"),
        ("@", "AAAA"),
        ("@", "MX"),
        ("@", "SOA"),
        ("@", "NS"),
        ("@", "PTR"),
        ("MIXED", "TXT"),
        ("alias", "TXT"),
        ("alias", "CNAME"),
        ("loop1", "TXT"),
        ("1.2", "PTR"),
        ("nowhere", "TXT"),
        ("mx", "TXT"),
    ],
)
def test_nameserver_source_answers_as_dnspython_parsed(
    knot: AuthoritativeDns, relative: str, rdtype: str
) -> None:
    qname = dns.name.from_text(WIRE_ZONE if relative == "@" else f"{relative}.{WIRE_ZONE}")
    query = dns.message.make_query(qname, rdtype, use_edns=0, payload=1232)
    query.flags |= dns.flags.RD
    wire = dns.query.udp(query, knot.host, timeout=2.0, port=knot.port).to_wire()
    source = NameserverSource([knot.host], port=knot.port, timeout=2.0)
    assert unordered(source.lookup(qname, dns.rdatatype.from_text(rdtype))) == unordered(
        dnspython_answer(wire)
    )


# --- hostile datagrams ---------------------------------------------------------------------------


def _header(answers: int = 0, authorities: int = 0, additionals: int = 0, flags: int = 0x8180) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, 1, answers, authorities, additionals)


QUESTION = b"\x06sender\x07example\x00" + struct.pack("!HH", 16, 1)
# A TXT record at the question's name (a pointer to offset 12), for the hostile cases to alter.
RECORD = b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 300, 3) + b"\x02ok"


def test_a_well_formed_hand_built_answer_parses() -> None:
    # The base of the hostile cases below: with the fault removed they parse.
    assert parse_response(_header(answers=1) + QUESTION + RECORD).records == ((b"ok",),)


@pytest.mark.parametrize("wire", CASES.values(), ids=CASES.keys())
def test_every_truncation_is_unusable(wire: bytes) -> None:
    for end in range(len(wire)):
        with pytest.raises(UnusableAnswer):
            parse_response(wire[:end])


def _owner(name: bytes) -> bytes:
    return name + struct.pack("!HHIH", 16, 1, 300, 3) + b"\x02ok"


HOSTILE = {
    "pointer to itself": _header(answers=1) + QUESTION + _owner(b"\xc0\x20"),
    "pointer forward": _header(answers=1) + QUESTION + _owner(b"\xc0\x30") + b"\x00" * 20,
    "pointer loop through labels": _header(answers=1) + QUESTION + _owner(b"\x01a\xc0\x20"),
    "two pointers to each other": _header(answers=2) + QUESTION + _owner(b"\xc0\x2f") + _owner(b"\xc0\x20"),
    "pointer past the end": _header(answers=1) + QUESTION + b"\xc3",
    "label type 01": _header(answers=1) + QUESTION + _owner(b"\x40" + b"a" * 64 + b"\x00"),
    "label type 10": _header(answers=1) + QUESTION + _owner(b"\x80\x00"),
    "name over 255 octets": _header(answers=1)
    + QUESTION
    + _owner(b"\x3fa" + b"a" * 62 + (b"\x3f" + b"b" * 63) * 3 + b"\x01c\x00"),
    "name over 255 octets through pointers": _header(answers=2)
    + QUESTION
    + _owner((b"\x3f" + b"b" * 63) * 3 + b"\x00")
    + _owner(b"\x3f" + b"c" * 63 + b"\xc0\x20"),
    "answer count past the end": _header(answers=65535) + QUESTION + RECORD,
    "authority count past the end": _header(answers=1, authorities=40000) + QUESTION + RECORD,
    "rdata length past the end": _header(answers=1) + QUESTION + RECORD[:-5] + b"\xff\xff\x02ok",
    "txt string past its record": _header(answers=1) + QUESTION + RECORD[:-3] + b"\x05ok",
    "a record of 5 octets": _header(answers=1)
    + b"\x06sender\x07example\x00"
    + struct.pack("!HH", 1, 1)
    + b"\xc0\x0c"
    + struct.pack("!HHIH", 1, 1, 300, 5)
    + b"\x01\x02\x03\x04\x05",
    "mx without an exchange": _header(answers=1)
    + b"\x06sender\x07example\x00"
    + struct.pack("!HH", 15, 1)
    + b"\xc0\x0c"
    + struct.pack("!HHIH", 15, 1, 300, 2)
    + b"\x00\x0a",
    "soa too short": _header(authorities=1, flags=0x8183)
    + QUESTION
    + b"\xc0\x0c"
    + struct.pack("!HHIH", 6, 1, 300, 6)
    + b"\x00\x00\x00\x00\x00\x01",
    "trailing bytes": _header(answers=1) + QUESTION + RECORD + b"\x00",
    "a query, not a response": _header(answers=1, flags=0x0100) + QUESTION + RECORD,
    "two questions": struct.pack("!HHHHHH", 1, 0x8180, 2, 0, 0, 0) + QUESTION * 2,
    "no question": struct.pack("!HHHHHH", 1, 0x8180, 0, 0, 0, 0),
    "servfail": _header(flags=0x8182) + QUESTION,
    "refused": _header(flags=0x8185) + QUESTION,
    "extended rcode BADVERS": _header(additionals=1)
    + QUESTION
    + b"\x00"
    + struct.pack("!HHIH", 41, 1232, 1 << 24, 0),
}


@pytest.mark.parametrize("wire", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_datagram_is_unusable(wire: bytes) -> None:
    with pytest.raises(UnusableAnswer):
        parse_response(wire)


@pytest.mark.parametrize(
    "case",
    ["pointer to itself", "pointer forward", "pointer loop through labels", "two pointers to each other"],
)
def test_a_pointer_must_point_backwards(case: str) -> None:
    # RFC 1035 §4.1.4: a pointer refers to a prior occurrence; anything else could loop.
    with pytest.raises(UnusableAnswer, match="does not point backwards"):
        parse_response(HOSTILE[case])


def test_a_long_chain_of_backward_pointers_is_refused() -> None:
    # The data of a record of an unknown type holds a root label and 200 pointers, each to the one
    # before: every step points backwards, but there are more steps than any name has labels. The
    # next record's owner points at the last of them.
    start = 12 + len(QUESTION) + 12  # where the first record's data begins
    chain = b"\x00" + b"".join(struct.pack("!H", 0xC000 | (start + max(2 * n - 1, 0))) for n in range(200))
    holder = b"\xc0\x0c" + struct.pack("!HHIH", 65280, 1, 300, len(chain)) + chain
    owner = struct.pack("!H", 0xC000 | (start + 1 + 2 * 199))
    wire = _header(answers=2) + QUESTION + holder + _owner(owner)
    with pytest.raises(UnusableAnswer, match="too many compression pointers"):
        parse_response(wire)


def _mutations(rng: random.Random) -> Iterator[bytes]:
    for wire in CASES.values():
        for _ in range(60):
            data = bytearray(wire)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            yield bytes(data)


def test_corrupted_datagrams_parse_or_are_unusable() -> None:
    # Random octets changed anywhere: an answer or UnusableAnswer, never another exception.
    for data in _mutations(random.Random(1035)):
        with contextlib.suppress(UnusableAnswer):
            parse_response(data)


def test_a_ttl_with_the_top_bit_set_counts_as_zero() -> None:
    # RFC 2181 §8.
    record = b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 0x80000000, 3) + b"\x02ok"
    assert parse_response(_header(answers=1) + QUESTION + record).ttl == 0


def test_truncated_flag() -> None:
    assert is_truncated(_header(flags=0x8380) + QUESTION)
    assert not is_truncated(_header() + QUESTION)
    assert not is_truncated(b"\x12")


def test_texts_are_the_txt_records_joined() -> None:
    # Only TXT (and SPF) records, tuples of bytes, have texts: an MX tuple, an address or a name
    # has none, whichever records an answer holds.
    records = ((b"v=spf1 ", b"-all"), (), (10, "mx.example"), "192.0.2.1", (b"\xff",), (0, "."))
    answer = DnsAnswer(DnsStatus.OK, records, ttl=60)
    assert answer.texts == ("v=spf1 -all", "", "\ufffd")


def test_an_answer_made_with_every_field_given_holds_each_as_the_dataclass_would() -> None:
    # DnsAnswer's __init__ is written by hand (one dict update, not one setattr per field): a field
    # added to the class and not to it would be missing from every answer.
    given = {
        "status": DnsStatus.OK,
        "records": ((b"v=spf1 -all",),),
        "ttl": 300,
        "reason": "why",
        "timed_out": True,
    }
    assert {f.name for f in dataclasses.fields(DnsAnswer)} == set(given)
    answer = DnsAnswer(**given)  # type: ignore[arg-type]
    assert {name: getattr(answer, name) for name in given} == given
    assert answer == DnsAnswer(**given) and hash(answer) == hash(DnsAnswer(**given))  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        answer.ttl = 1  # type: ignore[misc]
    assert DnsAnswer(DnsStatus.NXDOMAIN) == DnsAnswer(DnsStatus.NXDOMAIN, (), 0, "", False)

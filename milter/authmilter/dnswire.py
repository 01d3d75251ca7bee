"""DNS answers as plain values: one pass over a response datagram (RFC 1035 §4.1), no dnspython objects.

A cold message (a sender never seen) sends five or more queries, and parsing each answer with
``dns.message.from_wire`` (Name objects, enums, immutable rdata) was half of its CPU (bench/README.md,
"A cheap cold path"). :func:`parse_response` reads only what a check needs: the header, the answer
section (following the CNAME chain from the question's name) and, for a negative answer, the SOA in
the authority section. The records come out as the values the checks and pyspf use (:data:`DnsRecord`).

Every input is hostile: each loop is bounded by the datagram's length, compression pointers must
point backwards, and anything that does not parse raises :class:`UnusableAnswer`, which the
resolver treats as "ask the next server".
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import StrEnum

import dns.exception
import dns.ipv4
import dns.ipv6
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import dns.rdtypes.mxbase

# RFC 2308 §5 lets a resolver cap negative caching; these bound what a hostile zone can make us keep.
MAX_CACHE_TTL = 86400
DEFAULT_NEGATIVE_TTL = 300
# CNAME chains followed within one answer (and within zone files).
MAX_CNAME_CHAIN = 8

# One record, as the checks and pyspf (``spf.DNSLookup``) want it:
# TXT and SPF: the character-strings (RFC 1035 §3.3.14); A and AAAA: the address as text;
# MX: (preference, exchange without the final dot); PTR: the target without the final dot;
# any other type: its presentation form (RFC 1035 §5.1), as dnspython writes it.
DnsRecord = tuple[bytes, ...] | str | tuple[int, str]


class DnsStatus(StrEnum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True, init=False)
class DnsAnswer:
    """The outcome of one query.

    Attributes:
        status: what happened.
        records: the records of the type asked when status is OK (:data:`DnsRecord`).
        ttl: seconds this answer may be cached (0 for TEMPFAIL: never cached).
        reason: for TEMPFAIL, what went wrong (``timeout``, ``SERVFAIL``...), for logs.
        timed_out: a TEMPFAIL because no nameserver answered in time (counted apart in metrics).
    """

    status: DnsStatus
    records: tuple[DnsRecord, ...] = ()
    ttl: int = 0
    reason: str = ""
    timed_out: bool = False

    def __init__(
        self,
        status: DnsStatus,
        records: tuple[DnsRecord, ...] = (),
        ttl: int = 0,
        reason: str = "",
        timed_out: bool = False,
    ) -> None:
        # The generated __init__ of a frozen dataclass sets each field by its own object.__setattr__
        # call; one update of the instance dict costs less than half as much (every query sent
        # makes an answer).
        self.__dict__.update(status=status, records=records, ttl=ttl, reason=reason, timed_out=timed_out)

    @property
    def texts(self) -> tuple[str, ...]:
        """TXT records, each with its character-strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2).

        Non-ASCII bytes are replaced: every TXT record we read (SPF, DKIM keys, DMARC) is ASCII.
        """
        return tuple(
            b"".join(record).decode("utf-8", "replace")
            for record in self.records
            # A tuple is TXT's strings (all bytes, perhaps none) or MX's (preference, exchange).
            if isinstance(record, tuple) and (not record or isinstance(record[0], bytes))
        )

    @property
    def exists(self) -> bool:
        """The name exists (it has records of this type, or of another one)."""
        return self.status in (DnsStatus.OK, DnsStatus.NODATA)


class UnusableAnswer(Exception):
    """This server's response cannot be used (SERVFAIL, REFUSED, malformed): ask the next one."""


def record_value(rdata: dns.rdata.Rdata) -> DnsRecord:
    """A dnspython record as the plain value :func:`parse_response` gives for its type.

    For the zone files (:class:`~authmilter.resolver.ZoneFileSource`) and the types this module
    does not decode itself.
    """
    if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT | dns.rdtypes.ANY.SPF.SPF):
        return tuple(rdata.strings)
    if rdata.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return str(rdata.address)  # type: ignore[attr-defined]
    if isinstance(rdata, dns.rdtypes.mxbase.MXBase) and rdata.rdtype == dns.rdatatype.MX:
        return (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
    if isinstance(rdata, dns.rdtypes.ANY.PTR.PTR):
        return str(rdata.target.to_text(omit_final_dot=True))
    return str(rdata.to_text())


_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLENGTH (RFC 1035 §4.1.3)
_SOA_TIMES = struct.Struct("!IIIII")  # SERIAL, REFRESH, RETRY, EXPIRE, MINIMUM (RFC 1035 §3.3.13)
_QR, _TC = 0x8000, 0x0200
_NOERROR, _NXDOMAIN = 0, 3
_RCODE_NAMES = {1: "FORMERR", 2: "SERVFAIL", 4: "NOTIMP", 5: "REFUSED"}
_CLASS_IN = 1
_TYPE_A, _TYPE_CNAME, _TYPE_SOA, _TYPE_PTR, _TYPE_MX, _TYPE_TXT = 1, 5, 6, 12, 15, 16
_TYPE_AAAA, _TYPE_OPT, _TYPE_SPF = 28, 41, 99
# RFC 1035 §2.3.4: a name is at most 255 octets on the wire, so at most 127 labels; an encoder
# writes at most one pointer per name, so a chain of more pointers than that is an attack.
_MAX_NAME = 255
_MAX_POINTERS = 127
_POINTER_TO_QUESTION = b"\xc0\x0c"  # the question's name starts right after the 12-octet header
# Label bytes dnspython writes as they are; anything else it escapes (``_escapify`` in dns.name).
_PLAIN_LABEL = re.compile(rb"[!#%&'*+,\-/0-9:<=>?A-Z\[\]^_`a-z{|}~]*")
_ESCAPED = frozenset(b'"().;\\@$')


def is_truncated(data: bytes) -> bool:
    """The TC bit (RFC 1035 §4.1.1): the answer did not fit and is to be asked over TCP (RFC 7766 §5)."""
    return len(data) >= _HEADER.size and bool(data[2] << 8 & _TC)


def parse_response(data: bytes, question: bytes | None = None) -> DnsAnswer:
    """One response as a :class:`DnsAnswer` for the question it carries (RFC 1035 §4.1).

    The caller has checked that the question is the one it asked (RFC 5452 §3). The CNAME chain
    from the question's name is followed within the answer section (names compared case-blind,
    RFC 4343), at most :data:`MAX_CNAME_CHAIN` links, and the records found are kept no longer
    than the shortest TTL on the way (RFC 2181 §5.2). NXDOMAIN and NODATA last min(SOA TTL, SOA
    MINIMUM) from the authority section (RFC 2308 §5), or :data:`DEFAULT_NEGATIVE_TTL` without one.

    Args:
        data: the response datagram.
        question: the question section as sent (the name in wire form, type and class), when the
            caller has it: it is then compared as it is instead of read from the response.

    Raises:
        UnusableAnswer: not a response, an RCODE other than NOERROR or NXDOMAIN, or malformed
            (a count running past the end, a bad compression pointer, a record that does not fit),
            or not to ``question``.
    """
    if len(data) < _HEADER.size:
        raise UnusableAnswer(f"response of {len(data)} bytes is shorter than a DNS header")
    _, flags, questions, answers, authorities, additionals = _HEADER.unpack_from(data)
    if not flags & _QR:
        raise UnusableAnswer("datagram is a query, not a response")
    if questions != 1:
        raise UnusableAnswer(f"response carries {questions} questions instead of 1")
    if question is None:
        name, offset = _read_name(data, _HEADER.size)
        if offset + 4 > len(data):
            raise UnusableAnswer("response ends inside its question")
        question, offset = name + data[offset : offset + 4], offset + 4
    elif data.startswith(question, _HEADER.size):
        offset = _HEADER.size + len(question)
    else:
        raise UnusableAnswer("the response is not to the question asked")
    qname = question[:-4].lower()
    qtype = question[-4] << 8 | question[-3]
    # Written out in full (a question asked is never compressed), the question's name is where a
    # pointer to a part of it leads: see _records.
    literal = offset == _HEADER.size + len(question)
    records, offset = _records(data, offset, answers + authorities + additionals, qname, literal)
    if offset != len(data):
        raise UnusableAnswer(f"{len(data) - offset} bytes after the last record")
    answer, authority = records[:answers], records[answers : answers + authorities]
    rcode = flags & 0xF
    for rtype, _, _, ttl, _, _ in records[answers + authorities :]:
        if rtype == _TYPE_OPT:  # RFC 6891 §6.1.3: the OPT TTL's top octet extends the RCODE
            rcode |= (ttl >> 24) << 4
    if rcode == _NXDOMAIN:
        return DnsAnswer(DnsStatus.NXDOMAIN, ttl=_negative_ttl(data, authority))
    if rcode != _NOERROR:
        raise UnusableAnswer(f"answered {_RCODE_NAMES.get(rcode, f'RCODE {rcode}')}")
    return _follow(data, qname, qtype, answer, authority)


# A resource record located in the datagram: TYPE, CLASS, lower-cased owner name (wire form), TTL,
# and where its RDATA starts and ends.
_Record = tuple[int, int, bytes, int, int, int]


def _records(
    data: bytes, offset: int, count: int, qname: bytes, literal: bool
) -> tuple[list[_Record], int]:
    """``count`` records from ``offset`` (the three sections in one pass: the caller slices them by
    their counts), and where they end; ``qname`` is the question's name, lower case, ``literal``
    whether the response writes it uncompressed after the header."""
    records: list[_Record] = []
    end = len(data)
    for _ in range(count):  # each record takes at least 11 bytes, so a huge count fails fast
        # The usual owners need no walk: a pointer to the question's name (offset 12, always
        # backwards from a record) or to one of its parent names (the zone's SOA in a negative
        # answer), or the root (an OPT record's).
        if data.startswith(_POINTER_TO_QUESTION, offset):
            owner, offset = qname, offset + 2
        elif data.startswith(b"\x00", offset):
            owner, offset = b"\x00", offset + 1
        elif literal and (suffix := _question_suffix(data, offset, qname)) is not None:
            owner, offset = suffix, offset + 2
        else:
            owner, offset = _read_name(data, offset)
            owner = owner.lower()
        if offset + _RR_FIXED.size > end:
            raise UnusableAnswer("response ends inside a record")
        rtype, rclass, ttl, length = _RR_FIXED.unpack_from(data, offset)
        start = offset + _RR_FIXED.size
        offset = start + length
        if offset > end:
            raise UnusableAnswer("a record's data runs past the end of the response")
        # RFC 2181 §8: a TTL with the top bit set counts as zero (OPT's TTL is flags, RFC 6891).
        if ttl >= 1 << 31 and rtype != _TYPE_OPT:
            ttl = 0
        records.append((rtype, rclass, owner, ttl, start, offset))
    return records, offset


def _question_suffix(data: bytes, offset: int, qname: bytes) -> bytes | None:
    """The name at ``offset`` in lower case when it is a pointer to one of the question's names
    (the question's or a parent's, where one of its labels starts), else None.

    What :func:`_read_name` would read there, without the walk: the question's name, written out
    after the header, is a valid name, and a pointer to it always points backwards from a record.
    """
    if offset + 1 >= len(data) or data[offset] < 0xC0:
        return None
    start = ((data[offset] & 0x3F) << 8 | data[offset + 1]) - _HEADER.size
    if not 0 <= start < len(qname):
        return None
    label = 0
    while label < start:  # each pass moves past one label of the question's name
        label += qname[label] + 1
    return qname[start:] if label == start else None


def _follow(
    data: bytes, qname: bytes, qtype: int, answer: list[_Record], authority: list[_Record]
) -> DnsAnswer:
    """The records of ``qtype`` at ``qname`` (lower case) or at the end of its CNAME chain
    (RFC 1034 §3.6.2)."""
    ttl, current = MAX_CACHE_TTL, qname
    for _ in range(MAX_CNAME_CHAIN + 1):
        # One pass over the answer section per name: the RRset of qtype (its TTL is the smallest
        # of its records', a record repeated counts once), else the first CNAME.
        values: dict[DnsRecord, None] = {}
        alias: _Record | None = None
        for record in answer:
            rtype, rclass, owner, record_ttl, start, end = record
            if owner != current or rclass != _CLASS_IN:
                continue
            if rtype == qtype:
                values[_value(data, qtype, start, end)] = None
                ttl = min(ttl, record_ttl)
            elif rtype == _TYPE_CNAME and alias is None:
                alias = record
        if values:
            return DnsAnswer(DnsStatus.OK, tuple(values), ttl=ttl)
        if alias is None:
            break
        _, _, _, alias_ttl, start, end = alias
        target, after = _read_name(data, start)
        if after != end:
            raise UnusableAnswer("a CNAME record holds more than its target")
        ttl, current = min(ttl, alias_ttl), target.lower()
    return DnsAnswer(DnsStatus.NODATA, ttl=_negative_ttl(data, authority))


def _negative_ttl(data: bytes, authority: list[_Record]) -> int:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM) seconds."""
    for rtype, rclass, _, ttl, start, end in authority:
        if rtype == _TYPE_SOA and rclass == _CLASS_IN:
            _, offset = _read_name(data, start)  # MNAME
            _, offset = _read_name(data, offset)  # RNAME
            if offset + _SOA_TIMES.size != end:
                raise UnusableAnswer("malformed SOA record in the authority section")
            minimum: int = _SOA_TIMES.unpack_from(data, offset)[4]
            return min(ttl, minimum)
    return DEFAULT_NEGATIVE_TTL


def _value(data: bytes, rtype: int, start: int, end: int) -> DnsRecord:
    """One record's RDATA as its :data:`DnsRecord`."""
    if rtype in (_TYPE_TXT, _TYPE_SPF):
        return _character_strings(data, start, end)
    # The address text as dnspython's ``address`` (pyspf's own lookups return that).
    if rtype == _TYPE_A and end - start == 4:
        return dns.ipv4.inet_ntoa(data[start:end])
    if rtype == _TYPE_AAAA and end - start == 16:
        return dns.ipv6.inet_ntoa(data[start:end])
    if rtype == _TYPE_MX and end - start >= 3:
        exchange, offset = _read_name(data, start + 2)
        if offset == end:
            return ((data[start] << 8) | data[start + 1], _name_text(exchange))
    elif rtype == _TYPE_PTR:
        target, offset = _read_name(data, start)
        if offset == end:
            return _name_text(target)
    elif rtype not in (_TYPE_A, _TYPE_AAAA, _TYPE_MX):
        return _other_value(data, rtype, start, end)
    raise UnusableAnswer(f"malformed {_type_text(rtype)} record")


def _character_strings(data: bytes, start: int, end: int) -> tuple[bytes, ...]:
    """TXT RDATA: one or more <character-string>s, each a length octet and that many octets
    (RFC 1035 §3.3.14, §3.3). dnspython also reads an empty RDATA as zero strings."""
    strings = []
    offset = start
    while offset < end:  # each pass consumes at least the length octet
        length = data[offset]
        offset += 1 + length
        if offset > end:
            raise UnusableAnswer("a TXT string runs past its record")
        strings.append(data[offset - length : offset])
    return tuple(strings)


def _other_value(data: bytes, rtype: int, start: int, end: int) -> DnsRecord:
    """A record of a type the checks do not ask for (a CNAME asked as such, an SOA...): decoded by
    dnspython, which knows every type, as its presentation form."""
    try:
        rdtype = dns.rdatatype.RdataType.make(rtype)
        rdata = dns.rdata.from_wire(dns.rdataclass.IN, rdtype, data, start, end - start)
    except (dns.exception.DNSException, ValueError) as e:
        raise UnusableAnswer(f"malformed {_type_text(rtype)} record: {e}") from e
    return record_value(rdata)


def _type_text(rtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rtype))


def _read_name(data: bytes, offset: int) -> tuple[bytes, int]:
    """The domain name at ``offset`` in wire form without compression, and the offset after it.

    RFC 1035 §4.1.4: a name is labels ending in the root label or in a pointer to an earlier
    name. Each pointer must point before where the name (or the part reached by the last pointer)
    began, so the walk always moves backwards and ends; labels longer than 63 octets (the
    extended label types of RFC 6891 §5) and names longer than 255 octets are refused.
    """
    end = len(data)
    parts = []  # the name's pieces in wire form, up to each pointer and the root label
    size = 0
    after = -1  # the offset after the name where it is written (its first pointer ends it)
    start = offset  # where the current part begins: the next pointer must point before it
    for _ in range(_MAX_POINTERS + 1):
        while True:  # labels: each pass moves forward, bounded by the datagram
            if offset >= end:
                raise UnusableAnswer("a name runs past the end of the response")
            length = data[offset]
            if length == 0:
                parts.append(data[start : offset + 1])
                if size + offset + 1 - start > _MAX_NAME:
                    raise UnusableAnswer("a name is longer than 255 octets")
                return b"".join(parts), offset + 1 if after < 0 else after
            if length >= 0xC0:
                break
            if length > 63:
                raise UnusableAnswer(f"label type {length >> 6:#04b} is not a length (RFC 1035 §4.1.4)")
            offset += 1 + length
        parts.append(data[start:offset])
        size += offset - start
        if size > _MAX_NAME:
            raise UnusableAnswer("a name is longer than 255 octets")
        if offset + 1 >= end:
            raise UnusableAnswer("a compression pointer runs past the end of the response")
        pointer = (length & 0x3F) << 8 | data[offset + 1]
        if after < 0:
            after = offset + 2
        if pointer >= start:
            raise UnusableAnswer("a compression pointer does not point backwards")
        offset = start = pointer
    raise UnusableAnswer("too many compression pointers in one name")


def _name_text(wire: bytes) -> str:
    """A name (wire form) as dnspython's ``to_text(omit_final_dot=True)`` writes it."""
    labels = []
    offset = 0
    while wire[offset]:
        length = wire[offset]
        labels.append(_label_text(wire[offset + 1 : offset + 1 + length]))
        offset += 1 + length
    return ".".join(labels) if labels else "."


def _label_text(label: bytes) -> str:
    if _PLAIN_LABEL.fullmatch(label):
        return label.decode("ascii")
    return "".join(
        "\\" + chr(byte) if byte in _ESCAPED else chr(byte) if 0x20 < byte < 0x7F else f"\\{byte:03d}"
        for byte in label
    )

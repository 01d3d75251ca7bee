"""The one DNS resolver every check asks: dnspython, a TTL-honouring LRU cache, pluggable sources.

A lookup never raises for a DNS outcome. It returns a :class:`DnsAnswer` whose status says what
happened: records, NXDOMAIN, NODATA (the name exists, the type does not) or TEMPFAIL (timeout,
SERVFAIL, refused...); its records are plain values (:data:`~authmilter.dnswire.DnsRecord`), the
same from every source. Each check maps TEMPFAIL to its own ``temperror`` (RFC 7208 §2.6.6,
RFC 6376 §6.1.2, RFC 9989 §4.10) and NXDOMAIN/NODATA to "no record".

A :class:`DnsBudget` bounds what one message may spend on DNS: :meth:`Resolver.for_message` gives
the checks a view of the shared resolver (same cache, same source) that charges every query sent to
the message's budget and answers TEMPFAIL at once when it is spent.

:meth:`Resolver.prefetch` asks a message's names before its checks do, without threads: each query
is sent at once on its own socket (:meth:`NameserverSource.send`) and registered as on its way; the
first check asking that name claims it and reads the answer waiting in the socket
(:meth:`NameserverSource.receive`), later askers wait for the claimer, and what nobody claimed is
closed when the message ends (:meth:`Prefetch.cancel`).

Sources:
- :class:`NameserverSource` asks real nameservers (the system's, or the ones configured).
- :class:`ZoneFileSource` answers from RFC 1035 zone files, for offline checks and tests; names
  outside every zone are NXDOMAIN.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import re
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, cast

import dns.exception
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.zone

from authmilter.dnswire import DEFAULT_NEGATIVE_TTL as DEFAULT_NEGATIVE_TTL
from authmilter.dnswire import MAX_CACHE_TTL as MAX_CACHE_TTL
from authmilter.dnswire import MAX_CNAME_CHAIN as MAX_CNAME_CHAIN
from authmilter.dnswire import DnsAnswer as DnsAnswer
from authmilter.dnswire import DnsRecord as DnsRecord
from authmilter.dnswire import DnsStatus as DnsStatus
from authmilter.dnswire import UnusableAnswer, is_truncated, parse_response, record_value
from authmilter.settings import bounded, validate

log = logging.getLogger(__name__)

# A directive starts a line (RFC 1035 §5.1); the word in a comment or a TXT string is not one.
_ORIGIN_DIRECTIVE = re.compile(r"^\$ORIGIN\s", re.IGNORECASE | re.MULTILINE)


def tempfail(reason: str, timed_out: bool = False) -> DnsAnswer:
    return DnsAnswer(DnsStatus.TEMPFAIL, reason=reason, timed_out=timed_out)


class DnsSource(Protocol):
    """Where answers come from. Implementations never raise for a DNS outcome."""

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer: ...


# A stub query (RFC 1035 §4.1.1): ID, flags with RD set, one question, no answers, one OPT record
# (RFC 6891 §6.1.2) offering 1232-byte UDP answers (DNS Flag Day 2020: no IP fragmentation), so a
# 2048-bit DKIM key fits in a datagram and TCP is only needed past that.
_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_RECURSION_DESIRED = 0x0100
_EDNS_UDP_PAYLOAD = 1232
_OPT_RECORD = b"\x00" + struct.pack("!HHIH", dns.rdatatype.OPT, _EDNS_UDP_PAYLOAD, 0, 0)
_MAX_DATAGRAM = 65535
_TCP_LENGTH = struct.Struct("!H")
# Seconds for one try at one server; the rest of ``timeout`` goes to retries and other servers.
_TRY_TIMEOUT = 2.0
# Datagrams a try reads once its time is over (its answer among strays or spoofs) before it gives up.
_MAX_LATE_DATAGRAMS = 64


class NameserverSource:
    """Asks real nameservers: one UDP datagram per query, TCP when the answer is truncated.

    Not dnspython's ``Resolver``: its per-query machinery (query objects, selectors, retry
    bookkeeping) cost about as much CPU as parsing the answer, and a milter meeting a new sender
    sends five or more queries per message (bench/README.md, "A cheap cold path"). The query is
    built from a fixed template; the answer is parsed once into plain values by
    :func:`~authmilter.dnswire.parse_response` (``dns.message.from_wire`` and its objects took
    over ten times the CPU: bench/README.md). Each query takes a fresh socket, so
    its source port is random (RFC 5452 §9.2), and an answer counts only if it comes from the
    server asked, with the query's ID and question (RFC 5452 §3). :meth:`send` and
    :meth:`receive` split a lookup's first try in two, for prefetching.

    Servers are tried in order, each try waiting at most 2 s, round after round until ``timeout``
    (a timed-out try moves to the next server); a server that answers SERVFAIL, REFUSED or garbage
    is not asked again for this lookup. NXDOMAIN and NODATA carry the negative TTL of RFC 2308 §5.

    Args:
        nameservers: IP addresses to ask; empty means the system's (/etc/resolv.conf).
        port: the port they listen on (53 unless a test or a local cache says otherwise).
        timeout: seconds for one lookup, retries included.
    """

    def __init__(self, nameservers: Sequence[str] = (), port: int = 53, timeout: float = 5.0) -> None:
        servers: list[tuple[str, int]]
        if nameservers:
            servers = [
                (address, own_port or port) for address, own_port in map(parse_nameserver, nameservers)
            ]
        else:
            system = dns.resolver.Resolver(configure=True)
            servers = [
                (n.address, n.port) if isinstance(n, dns.nameserver.Do53Nameserver) else (str(n), port)
                for n in system.nameservers
            ]
        self._servers = [
            (ipaddress.ip_address(address).compressed, server_port) for address, server_port in servers
        ]
        self._timeout = timeout
        self.description = ",".join(f"{address} port {server_port}" for address, server_port in self._servers)

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        return self.ask(cast(bytes, name.to_wire()), rdtype)

    def ask(self, wire_name: bytes, rdtype: int) -> DnsAnswer:
        """:meth:`lookup` for a name in wire form (RFC 1035 §3.1), as the :class:`Resolver` has it
        (it builds no ``dns.name.Name``)."""
        return self._resolve(_question(wire_name, rdtype), None)

    def send(self, wire_name: bytes, rdtype: int) -> SentQuery | None:
        """Send the first try of a lookup of ``wire_name`` (:meth:`ask`) to the first server and
        return at once.

        The answer waits in the socket's buffer until :meth:`receive` reads it; no thread waits
        for it. The caller must pass the query to :meth:`receive` or close it.

        Returns:
            The query on its way, or None when it could not be sent (the lookup then goes the
            normal way when it is needed).
        """
        try:
            return _send_query(self._servers[0], _question(wire_name, rdtype))
        except (OSError, IndexError):
            return None

    def receive(self, sent: SentQuery) -> DnsAnswer:
        """The answer to a query :meth:`send` sent, as :meth:`lookup` would give it.

        Waits only for what is left of the first try's 2 s (an answer already in the buffer is
        read even when that time is over); should that try fail or time out, the lookup goes on
        as :meth:`lookup` does (the next servers, further rounds), within ``timeout`` from now.
        The socket is closed in every case.
        """
        return self._resolve(sent.question, sent)

    def _resolve(self, question: bytes, sent: SentQuery | None) -> DnsAnswer:
        """The lookup loop for one question (:func:`_question`); ``sent`` is a first try already
        sent to the first server."""
        deadline = time.monotonic() + self._timeout
        servers = self._servers  # copied only when one fails
        failures: list[str] = []
        while servers:
            for server in servers:
                attempt, sent = sent, None
                try:
                    if attempt is None:
                        if deadline - time.monotonic() <= 0:
                            return tempfail(f"timeout asking {self.description}", timed_out=True)
                        attempt = _send_query(server, question)
                    answer = _read_answer(attempt, deadline)
                except TimeoutError:
                    continue
                except (UnusableAnswer, OSError, EOFError) as e:
                    failures.append(f"{server[0]} port {server[1]}: {e or type(e).__name__}")
                    servers = [other for other in servers if other is not server]  # this round goes on
                    continue
                return answer
        return tempfail(f"no nameserver answered ({'; '.join(failures)})")


class SentQuery:
    """One try of a lookup, sent on its own socket, its answer not read yet.

    Attributes:
        server: the (address, port) asked.
        wire, question: the query as sent, and its question section (the answer must repeat it).
        started: ``time.perf_counter()`` when it was sent (metrics time the lookup from there).
    """

    __slots__ = ("_expires", "_udp", "question", "server", "started", "wire")

    def __init__(self, udp: socket.SocketType, server: tuple[str, int], wire: bytes, question: bytes) -> None:
        self._udp = udp
        self.server = server
        self.wire = wire
        self.question = question
        self._expires = time.monotonic() + _TRY_TIMEOUT
        self.started = time.perf_counter()

    def datagram(self, deadline: float) -> bytes:
        """The server's answer, waiting until the try's 2 s or ``deadline`` are over, whichever
        comes first; datagrams that arrived before are read even when that time has passed.

        Raises:
            TimeoutError: no answer in time.
            OSError: the socket failed.
        """
        until, late_reads = min(self._expires, deadline), 0
        # What already waits (a prefetched answer, usually) is read first without waiting: a read
        # with a timeout costs two more system calls (ioctl to make the socket non-blocking, poll).
        waiting = False
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                # Past the try's time only what already waits is read (a prefetched answer read
                # late), and not for ever should datagrams keep coming.
                late_reads += 1
                if late_reads > _MAX_LATE_DATAGRAMS:
                    raise TimeoutError
            try:
                if waiting:
                    self._udp.settimeout(max(remaining, 0.0))
                    data, source = self._udp.recvfrom(_MAX_DATAGRAM)
                else:  # the socket has no timeout yet, so the flag alone keeps this read from waiting
                    data, source = self._udp.recvfrom(_MAX_DATAGRAM, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if waiting or remaining <= 0:
                    raise TimeoutError from None
                waiting = True
                continue
            # RFC 5452 §3: anything else is a stray or spoofed datagram: keep waiting for the answer.
            if (
                source[:2] == self.server
                and data[:2] == self.wire[:2]
                and data[12 : 12 + len(self.question)] == self.question
            ):
                return data

    def close(self) -> None:
        self._udp.close()


def _question(wire_name: bytes, rdtype: int) -> bytes:
    """A query's question section (RFC 1035 §4.1.2): the name, its type, class IN."""
    return wire_name + _QUESTION_TAIL.pack(rdtype, dns.rdataclass.IN)


def _send_query(server: tuple[str, int], question: bytes) -> SentQuery:
    """Send one try of ``question`` (:func:`_question`) on a fresh socket, so its source port is
    random (RFC 5452 §9.2).

    Raises:
        OSError: no socket, or the datagram could not be sent.
    """
    query_id = random.getrandbits(16)
    wire = _HEADER.pack(query_id, _RECURSION_DESIRED, 1, 0, 0, 1) + question + _OPT_RECORD
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    # The socket type itself (the C one; close-on-exec all the same), not socket.socket: its
    # Python layer (__init__, close, the file-object bookkeeping) is not used by a datagram socket.
    udp = socket.SocketType(family, socket.SOCK_DGRAM)
    try:
        udp.sendto(wire, server)
    except OSError:
        udp.close()
        raise
    return SentQuery(udp, server, wire, question)


def _read_answer(sent: SentQuery, deadline: float) -> DnsAnswer:
    """One try's usable answer (NOERROR or NXDOMAIN); its socket is closed.

    Raises:
        TimeoutError: no answer in time.
        UnusableAnswer, OSError, EOFError: the answer cannot be used.
    """
    try:
        data = sent.datagram(deadline)
    finally:
        sent.close()
    if is_truncated(data):
        # RFC 7766 §5: a truncated answer is asked again over TCP, a try of its own.
        tcp_deadline = min(time.monotonic() + _TRY_TIMEOUT, deadline)
        data = _ask_over_tcp(sent.server, sent.wire, sent.question, tcp_deadline)
    return parse_response(data, sent.question)


def _ask_over_tcp(server: tuple[str, int], wire: bytes, question: bytes, deadline: float) -> bytes:
    """The answer to ``wire`` over TCP, each message behind its 2-octet length (RFC 1035 §4.2.2).

    Raises:
        TimeoutError: no full answer before ``deadline``.
        UnusableAnswer: the answer is not to this query.
        OSError, EOFError: the connection failed or closed early.
    """
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as tcp:
        tcp.settimeout(max(deadline - time.monotonic(), 0.001))
        tcp.connect(server)
        tcp.sendall(_TCP_LENGTH.pack(len(wire)) + wire)
        (length,) = _TCP_LENGTH.unpack(_receive(tcp, _TCP_LENGTH.size, deadline))
        data = _receive(tcp, length, deadline)
    if data[:2] != wire[:2] or data[12 : 12 + len(question)] != question:
        raise UnusableAnswer("the TCP answer is not to the query sent")
    return data


def _receive(tcp: socket.socket, size: int, deadline: float) -> bytes:
    """Exactly ``size`` bytes (at most 65535: one DNS message) from a stream socket."""
    data = bytearray()
    while len(data) < size:  # each pass reads at least one byte or ends
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        tcp.settimeout(remaining)
        chunk = tcp.recv(size - len(data))
        if not chunk:
            raise EOFError("the server closed the TCP connection before the whole answer")
        data += chunk
    return bytes(data)


def parse_nameserver(text: str) -> tuple[str, int | None]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address → (address, port or None).

    The one syntax of ``[dns] nameservers`` and of ``--nameserver``.

    Raises:
        ValueError: not an IP address (a host name would need a resolver to find the resolver),
            or a port outside 1-65535; the message says which syntax is expected.
    """
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"'{text}': expected [IPv6] or [IPv6]:PORT")
        port = rest[1:] or None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"'{text}' is not an IP address: write IP, IP:PORT or [IPv6]:PORT (no host names)"
        ) from None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{text}': port must be a number from 1 to 65535")
    return host, int(port)


class ZoneFileError(ValueError):
    """A zone file could not be read or parsed; the message names the file."""


class ZoneFileSource:
    """Answers from RFC 1035 zone files; everything outside them is NXDOMAIN.

    A file without ``$ORIGIN`` takes its origin from its name without ``.zone``
    (``sender.example.zone`` is ``sender.example.``). CNAMEs are followed within the zones;
    ``*`` wildcards are answered as RFC 4592 §3.3.1 describes for the closest encloser.
    """

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self._zones: list[dns.zone.Zone] = [self._load(Path(p)) for p in paths]
        # Longest origin first, so a delegated child zone wins over its parent.
        self._zones.sort(key=lambda z: len(z.origin or dns.name.root), reverse=True)

    @staticmethod
    def _load(path: Path) -> dns.zone.Zone:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ZoneFileError(f"{path}: cannot read zone file: {e.strerror}") from e
        origin = None
        if not _ORIGIN_DIRECTIVE.search(text):
            stem = path.name[: -len(".zone")] if path.name.endswith(".zone") else path.name
            origin = dns.name.from_text(stem)
        try:
            return dns.zone.from_text(
                text, origin=origin, relativize=False, filename=str(path), check_origin=False
            )
        except dns.exception.SyntaxError as e:
            raise ZoneFileError(str(e)) from e  # dnspython's message starts with file:line
        except dns.exception.DNSException as e:
            raise ZoneFileError(f"{path}: not a usable zone file: {e}") from e

    def _zone_for(self, name: dns.name.Name) -> dns.zone.Zone | None:
        for zone in self._zones:
            if zone.origin is not None and name.is_subdomain(zone.origin):
                return zone
        return None

    @staticmethod
    def _negative_ttl(zone: dns.zone.Zone) -> int:
        soa = zone.get_rdataset(zone.origin or dns.name.root, dns.rdatatype.SOA)
        if soa is None or not len(soa):
            return DEFAULT_NEGATIVE_TTL
        return int(min(soa.ttl, soa[0].minimum))

    @staticmethod
    def _has_descendants(zone: dns.zone.Zone, name: dns.name.Name) -> bool:
        return any(n != name and n.is_subdomain(name) for n in zone.nodes)

    def _wildcard_node(self, zone: dns.zone.Zone, name: dns.name.Name) -> dns.node.Node | None:
        parent = name.parent()
        origin = zone.origin or dns.name.root
        while parent.is_subdomain(origin):
            if parent in zone.nodes or self._has_descendants(zone, parent):
                return zone.get_node(dns.name.Name((b"*", *parent.labels)))
            if parent == origin:
                break
            parent = parent.parent()
        return None

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        # One pass for the queried name, then one per CNAME followed.
        for _ in range(MAX_CNAME_CHAIN + 1):
            zone = self._zone_for(name)
            if zone is None:
                return DnsAnswer(DnsStatus.NXDOMAIN, ttl=DEFAULT_NEGATIVE_TTL)
            node = zone.get_node(name)
            if node is None:
                if self._has_descendants(zone, name):
                    return DnsAnswer(DnsStatus.NODATA, ttl=self._negative_ttl(zone))
                node = self._wildcard_node(zone, name)
                if node is None:
                    return DnsAnswer(DnsStatus.NXDOMAIN, ttl=self._negative_ttl(zone))
            rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if rdataset is not None and len(rdataset):
                return DnsAnswer(DnsStatus.OK, tuple(map(record_value, rdataset)), ttl=rdataset.ttl)
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None or not len(cname):
                return DnsAnswer(DnsStatus.NODATA, ttl=self._negative_ttl(zone))
            name = cname[0].target
        return tempfail(f"CNAME chain longer than {MAX_CNAME_CHAIN} at {name}")


T = TypeVar("T")
# The record types the checks ask for by name, resolved once (RdataType.make costs a lookup chain).
_RDTYPES: dict[str, dns.rdatatype.RdataType] = {
    name: dns.rdatatype.RdataType.make(name) for name in ("A", "AAAA", "MX", "PTR", "TXT", "SPF")
}


def _cache_key(name: str | dns.name.Name) -> str:
    """The name as cache key: absolute and, for ASCII, lower case (RFC 4343: names compare
    case-blind in ASCII only). Two spellings of one name (a non-ASCII case) may get two entries;
    that costs a lookup, never a wrong answer.

    Raises:
        dns.exception.DNSException, ValueError, UnicodeError: a name with escapes that cannot be
            a DNS name (only escaped text is parsed here: "a\\" must not look like "a\\.").
    """
    if isinstance(name, dns.name.Name):
        text = name.to_text()
    elif "\\" in name:
        text = dns.name.from_text(name).to_text()
    else:
        text = name
    if text.isascii():
        text = text.lower()
    return text if text.endswith(".") else text + "."


def wire_name(name: str | dns.name.Name) -> bytes:
    """``dns.name.from_text(name).to_wire()``: the name as a question carries it (RFC 1035 §3.1),
    its case kept, without building a ``dns.name.Name`` for the usual name (ASCII, no escapes).

    dnspython's parser packs each character on its own and its immutable ``Name`` costs several
    µs more; a miss needs the name only on the wire (bench/README.md, "A cheap cold path").
    Splitting at the dots gives the same labels, refused as ``Name()`` refuses them (RFC 1035
    §2.3.4: labels of 1 to 63 octets, at most 255 octets in all), with dnspython's errors.

    Raises:
        dns.exception.DNSException, ValueError, UnicodeError: as ``dns.name.from_text``, or a
            relative ``dns.name.Name``.
    """
    if isinstance(name, dns.name.Name):
        return cast(bytes, name.to_wire())
    if not name.isascii() or "\\" in name or name in (".", "@"):
        return cast(bytes, dns.name.from_text(name).to_wire())
    labels = name.encode("ascii").split(b".")
    if labels[-1]:
        labels.append(b"")  # absolute, as from_text makes it
    wire = bytearray()
    for label in labels:
        if len(label) > 63:
            raise dns.name.LabelTooLong
        wire.append(len(label))
        wire += label
    if len(wire) > 255:
        raise dns.name.NameTooLong
    if b"" in labels[:-1]:
        raise dns.name.EmptyLabel
    return bytes(wire)


def _always(value: object) -> bool:
    return True


class DnsBudget:
    """What one message may spend on DNS across SPF, DKIM and DMARC: queries sent and wall time.

    Answers from the cache cost nothing; each query sent to the source costs one. Once the queries
    or the time are spent, every further lookup of the message answers TEMPFAIL without asking, so
    each check ends in its own ``temperror`` (RFC 7208 §4.6.4 allows SPF to stop so, RFC 6376
    §6.1.2 TEMPFAIL, RFC 9989 §5.3.2) instead of holding the thread. A query sent before the time
    ran out may still take up to the source's own timeout (``[dns] timeout``).

    One budget serves one message, whose checks run in one thread; the lock only keeps the
    counts right should a caller share it.

    Args:
        seconds: wall time from now within which queries may be sent.
        queries: queries that may be sent.
        queue_id: the message's queue id, for the log line.
        clock: monotonic seconds (a test may pass its own).
        sent: queries the message already sent before its checks started (prefetched as its
            callbacks told the names); they count against ``queries``.
    """

    def __init__(
        self,
        seconds: float,
        queries: int,
        queue_id: str = "",
        clock: Callable[[], float] = time.monotonic,
        sent: int = 0,
    ) -> None:
        self.seconds = seconds
        self.queries = queries
        self.queue_id = queue_id
        self._clock = clock
        self._deadline = clock() + seconds
        self._sent = sent
        self._check = ""
        self._lock = threading.Lock()
        self.exceeded = ""  # why the budget ran out, once it has ("" until then)

    def start(self, check: str) -> None:
        """Name the check whose lookups come next (for the log line when the budget runs out)."""
        self._check = check

    def charge(self) -> str:
        """Take one query from the budget: "" if it may be sent, else why not (logged once)."""
        with self._lock:
            if self._sent >= self.queries:
                why = f"DNS query budget of this message spent ({self.queries} queries)"
            elif self._clock() >= self._deadline:
                why = f"DNS time budget of this message spent ({self.seconds:g} s)"
            else:
                self._sent += 1
                return ""
            first = not self.exceeded
            self.exceeded = self.exceeded or why
        if first:
            log.warning(
                "queue_id=%s %s during %s after %d queries; its remaining lookups fail temporarily "
                "(raise [dns] message_query_budget or message_time_budget if this is legitimate mail)",
                self.queue_id or "-",
                why,
                self._check or "the checks",
                self._sent,
            )
        return why


class DnsObserver(Protocol):
    """Told about every lookup of a resolver (metrics.py counts them); None: nobody is told."""

    def cache_hit(self) -> None:
        """A lookup was answered from the cache."""

    def budget_refused(self) -> None:
        """A lookup was answered TEMPFAIL unasked: the message's DNS budget is spent."""

    def answered(self, rdtype: dns.rdatatype.RdataType, answer: DnsAnswer, seconds: float) -> None:
        """A query went to the source (a cache miss) and got ``answer`` after ``seconds``."""

    def prefetch_unread(self) -> None:
        """A prefetched query was closed unread: the message ended before a check asked the name,
        or the same name was already on its way."""


class _Usage:
    """What the DNS answers read by one derived computation allow: when it expires, if at all."""

    __slots__ = ("expires", "tempfail")  # one per derived computation

    def __init__(self) -> None:
        self.expires = math.inf
        self.tempfail = False

    def add(self, expires: float, tempfail: bool) -> None:
        self.expires = min(self.expires, expires)
        self.tempfail = self.tempfail or tempfail


class _Tracking(threading.local):
    """Per thread: the derived computation (:meth:`Resolver.derived`) whose answers are tracked.

    A class default, not ``getattr(local, "usage", None)``: every lookup reads it, and a missing
    attribute of a ``threading.local`` costs a formatted AttributeError each time.
    """

    usage: _Usage | None = None


class _Counts:
    def __init__(self) -> None:
        self.sent = 0


# What a waiter gets should the lookup it waited for end in an exception (answers are immutable).
_WAITED_FOR_FAILED = tempfail("the lookup this one waited for failed")


class _InFlight:
    """One lookup on its way: its answer and expiry once :meth:`finish` was called.

    A prefetched lookup starts as a query sent that nobody reads yet (``sent``); the first asker
    claims it (takes ``sent``) and reads it while later askers :meth:`wait`. Nobody waits on an
    unclaimed one, so cancelling it (closing its socket) strands no one.
    """

    __slots__ = ("_unfinished", "answer", "expires", "sent", "started")  # one per query sent

    def __init__(self, started: float, sent: SentQuery | None = None) -> None:
        # Held until the answer is in; waiters pass through it once it is released. A plain lock,
        # not an Event (a Condition and a lock): most lookups have no waiter, and each miss makes one.
        self._unfinished = threading.Lock()
        self._unfinished.acquire()
        self.answer = _WAITED_FOR_FAILED
        self.expires = 0.0
        self.started = started  # the resolver's clock when the query was sent: TTLs count from there
        self.sent = sent

    def claim(self) -> SentQuery | None:
        """The query sent and not yet claimed (the caller reads it), else None; under the lock."""
        sent, self.sent = self.sent, None
        return sent

    def wait(self) -> None:
        """Return once the lookup is finished."""
        with self._unfinished:
            pass

    def finish(self) -> None:
        """Wake the waiters (the answer and expiry are set); once per lookup."""
        self._unfinished.release()


class _Slots:
    """A count of things held against a limit, shared by threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.taken >= self.limit:
                return False
            self.taken += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.taken -= 1


# Prefetched queries whose sockets wait unread, per process, all messages together: each holds a
# descriptor, and a worker may also hold one per MTA connection ([milter] max_connections). A
# quarter of the usual soft limit of 1024 descriptors; past it nothing more is prefetched (the
# checks then ask as they run).
MAX_WAITING_PREFETCHES = 256
# Derived values are keyed by what senders send (a local-part, an i= tag, a signature's failure
# reason naming its b= value): a key whose text is longer than this, far more than any real one,
# is computed each time and not kept, so a hostile message cannot pin up to a header's size per
# entry (a Postfix header may be 100 KB; the cache holds [dns] cache_size entries).
MAX_KEPT_KEY_LENGTH = 4096
waiting_prefetches = _Slots(MAX_WAITING_PREFETCHES)


class Prefetch:
    """The lookups prefetched for one message: at most ``limit`` queries sent, closed by
    :meth:`cancel` (or leaving the ``with`` block) unless a check claimed them.

    Made by :meth:`Resolver.prefetch`.

    Attributes:
        sent: queries sent so far.
    """

    def __init__(self, resolver: Resolver, limit: int) -> None:
        self._resolver = resolver
        self._limit = limit
        self._started: list[tuple[tuple[str, int], _InFlight]] = []
        self.sent = 0

    def start(self, questions: Iterable[tuple[str, dns.rdatatype.RdataType]]) -> None:
        """Send a query for each question not already answered in the cache or on its way,
        until the message's ``limit``, the process's :data:`MAX_WAITING_PREFETCHES` or the
        message's DNS budget is reached; returns at once."""
        for name, rdtype in questions:
            if self.sent >= self._limit:
                return
            started = self._resolver._start(name, rdtype)
            if started is None:
                continue
            if started is _STOP:
                return
            self._started.append(started)
            self.sent += 1

    def cancel(self) -> None:
        """Close the queries no check claimed (their answers are dropped, never waited for)."""
        for key, entry in self._started:
            # A check's claim empties ``sent`` for good (the usual case): only the unclaimed need the lock.
            if entry.sent is not None:
                self._resolver._drop(key, entry)
        self._started.clear()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


# What Resolver._start returns when nothing more may be prefetched (no room, no budget).
_STOP = (("", 0), _InFlight(0.0))


class Resolver:
    """The resolver all checks share: one source behind a TTL-honouring LRU cache.

    Positive and negative answers (NXDOMAIN, NODATA) are cached for their TTL (capped at
    :data:`MAX_CACHE_TTL`); TEMPFAIL is never cached, so a retry asks again.

    Args:
        source: where answers come from.
        cache_size: entries kept; the least recently used goes first. 0 disables the cache.
        clock: monotonic seconds (a test may pass its own).
        observer: told about each cache hit, refused lookup and query sent (metrics).
    """

    def __init__(
        self,
        source: DnsSource,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        observer: DnsObserver | None = None,
    ) -> None:
        self.source = source
        # Only a source that waits on the network gains from prefetching; ZoneFileSource answers
        # from memory at once, so prefetching from it would only move its work earlier.
        self._sender = source if isinstance(source, NameserverSource) else None
        self._observer = observer
        self._cache_size = cache_size
        self._clock = clock
        # Keyed by the name's text (see _cache_key) and type, not by dns.name.Name: a hit then costs
        # no parsing, and hashing and comparing Name objects cost more than the rest of a hit.
        self._cache: OrderedDict[tuple[str, int], tuple[float, DnsAnswer]] = OrderedDict()
        self._derived: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()
        self._tracking = _Tracking()
        self._counts = _Counts()  # shared with the views for_message() makes
        self._budget: DnsBudget | None = None
        # Lookups on their way, by cache key: a second asker waits for the first's answer instead of
        # sending the same query, and a check asking a prefetched name reads the query sent for it.
        self._inflight: dict[tuple[str, int], _InFlight] = {}

    @property
    def queries(self) -> int:
        """Queries sent to the source (not answered from the cache), by this resolver and its views."""
        return self._counts.sent

    def for_message(self, budget: DnsBudget) -> Resolver:
        """A view of this resolver for one message: the same cache and source, within ``budget``.

        The view costs a shallow copy; it shares the cache, the lock and the counts with this one.
        """
        view = object.__new__(type(self))  # copy.copy's work without its __reduce_ex__ round trip
        view.__dict__.update(self.__dict__)
        view._budget = budget
        return view

    def query(self, name: str | dns.name.Name, rdtype: str | dns.rdatatype.RdataType) -> DnsAnswer:
        """Look up ``name``/``rdtype``; never raises for a DNS outcome or a malformed name."""
        try:
            # An RdataType as it is: RdataType.make costs a lookup chain even for one.
            qtype = rdtype if isinstance(rdtype, dns.rdatatype.RdataType) else _RDTYPES.get(rdtype)
            if qtype is None:
                qtype = dns.rdatatype.RdataType.make(rdtype)
        except (dns.exception.DNSException, ValueError) as e:
            return DnsAnswer(DnsStatus.NXDOMAIN, reason=f"invalid type: {e}")
        try:
            key = (_cache_key(name), int(qtype))
        except (dns.exception.DNSException, ValueError, UnicodeError) as e:
            return DnsAnswer(DnsStatus.NXDOMAIN, reason=f"invalid name: {e}")
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key)
                self._used(hit[0], hit[1])
                if self._observer is not None:
                    self._observer.cache_hit()
                return hit[1]
            # A name cached or on its way is a valid one: only a new question is checked below.
            pending = self._inflight.get(key)
            sent = pending.claim() if pending is not None else None
        owner = False
        if pending is None:
            try:
                wire = wire_name(name)
            except (dns.exception.DNSException, ValueError, UnicodeError) as e:
                # A name that cannot be a DNS name cannot exist (e.g. an empty label from a From header).
                return DnsAnswer(DnsStatus.NXDOMAIN, reason=f"invalid name: {e}")
            # Charged before the lookup is shared: a message whose budget is spent gets its own
            # TEMPFAIL, never another message's, and waiting for a lookup on its way costs nothing.
            refused = self._budget.charge() if self._budget is not None else ""
            if refused:
                answer = tempfail(refused)
                self._used(now, answer)
                if self._observer is not None:
                    self._observer.budget_refused()
                return answer
            with self._lock:
                pending = self._inflight.get(key)
                if pending is None:
                    owner = True
                    pending = self._inflight[key] = _InFlight(now)
                    self._counts.sent += 1
                else:  # started meanwhile, perhaps prefetched: never wait on an unclaimed query
                    sent = pending.claim()
        if sent is not None:
            # A prefetched query: this asker reads it (it was charged to the budget when sent).
            waiting_prefetches.give_back()
            return self._finish(key, pending, qtype, sent)
        if not owner:
            pending.wait()
            self._used(pending.expires, pending.answer)
            return pending.answer
        return self._finish(key, pending, qtype, wire)  # the owner checked the name above

    def _finish(
        self,
        key: tuple[str, int],
        pending: _InFlight,
        qtype: dns.rdatatype.RdataType,
        question: SentQuery | bytes,
    ) -> DnsAnswer:
        """Ask the source (or read the query sent for it), cache the answer, wake the waiters.

        Args:
            question: the prefetched query to read, or the name in wire form (:func:`wire_name`).
        """
        cached = False
        try:
            answer = self._ask(qtype, question)
            pending.expires = pending.started + min(answer.ttl, MAX_CACHE_TTL)
            pending.answer = answer
            self._used(pending.expires, answer)
            cached = answer.status is not DnsStatus.TEMPFAIL and self._cache_size > 0
        finally:
            with self._lock:  # once: the lookup leaves those on their way as its answer enters the cache
                del self._inflight[key]
                if cached:
                    self._cache[key] = (pending.expires, pending.answer)
                    self._cache.move_to_end(key)
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            pending.finish()
        return pending.answer

    def prefetch(self, limit: int) -> Prefetch:
        """A message's prefetch: ask its names as soon as they are known, without waiting.

        Each query goes out on its own socket at once and its answer waits there; the check that
        later asks the name reads it (:meth:`query`), so the message waits about one round trip
        for all its names instead of one per name, and each name is still asked once. No thread
        is involved. Nothing is sent with the cache off, nor for a source without network I/O.

        Args:
            limit: queries this message may prefetch (``[dns] prefetch_queries``).

        Returns:
            The message's prefetch; cancel it when the message is over (it is a context manager).
        """
        return Prefetch(self, limit if self.sends_ahead else 0)

    @property
    def sends_ahead(self) -> bool:
        """Queries can be prefetched: the source sends them over the network (a zone file answers
        at once) and the cache keeps what they bring."""
        return self._sender is not None and self._cache_size > 0

    def _start(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[tuple[str, int], _InFlight] | None:
        """Send one prefetched query and register it on its way; None when there is nothing to
        send (cached, on its way, not a DNS name), :data:`_STOP` when no more may be sent."""
        try:
            key = (_cache_key(name), int(rdtype))
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return None  # its check answers it without DNS
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if (hit is not None and hit[0] > now) or key in self._inflight:
                return None
        try:
            wire = wire_name(name)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return None
        if self._sender is None or not waiting_prefetches.take():
            return _STOP
        if self._budget is not None and self._budget.charge():
            waiting_prefetches.give_back()
            return _STOP
        sent = self._sender.send(wire, rdtype)
        if sent is None:
            waiting_prefetches.give_back()
            return None
        entry = _InFlight(now, sent)
        with self._lock:
            raced = key in self._inflight
            if not raced:
                self._inflight[key] = entry
                self._counts.sent += 1
        if raced:  # another thread started it meanwhile
            self._drop(key, entry)
            return None
        return key, entry

    def _drop(self, key: tuple[str, int], entry: _InFlight) -> None:
        """Close a prefetched query unless a check claimed it meanwhile (its reader then finishes it)."""
        with self._lock:
            sent = entry.claim()
            if sent is not None and self._inflight.get(key) is entry:
                del self._inflight[key]
        if sent is not None:
            waiting_prefetches.give_back()
            sent.close()
            if self._observer is not None:
                self._observer.prefetch_unread()

    def _ask(self, qtype: dns.rdatatype.RdataType, question: SentQuery | bytes) -> DnsAnswer:
        """The source's answer: read from the prefetched query, or asked for the name (wire form)."""
        if isinstance(question, SentQuery):  # only the sender sends queries ahead
            started = question.started
            answer = cast(NameserverSource, self._sender).receive(question)
        else:
            started = time.perf_counter()
            if self._sender is not None:
                answer = self._sender.ask(question, qtype)
            else:  # other sources take a dnspython name
                answer = self.source.lookup(dns.name.from_wire(question, 0)[0], qtype)
        if self._observer is not None:
            self._observer.answered(qtype, answer, time.perf_counter() - started)
        return answer

    def derived(self, key: Hashable, compute: Callable[[], T], keep: Callable[[T], bool] = _always) -> T:
        """A value computed only from DNS answers, kept as long as every answer it used.

        A check whose outcome depends on nothing but its arguments and DNS (an SPF result for one
        client, sender and HELO; a DMARC tree walk) is computed once and then reused until the
        first of the answers it read expires (so never longer than the DNS cache would keep them),
        instead of re-running the same parsing and evaluation over the same cached answers.
        A computation that saw a TEMPFAIL is not kept, so a retry asks again.

        Args:
            key: what identifies the computation and all its inputs other than DNS answers; it
                must name the computation too (e.g. ``("spf", ip, sender, helo)``).
            compute: computes the value, asking this resolver for every DNS answer it needs.
            keep: whether a computed value may be kept (e.g. not a result of a time-out).
                A key longer than :data:`MAX_KEPT_KEY_LENGTH` as text is never kept.

        Returns:
            The value, fresh or kept.
        """
        now = self._clock()
        with self._lock:
            hit = self._derived.get(key)
            if hit is not None and hit[0] > now:
                self._derived.move_to_end(key)
                self._used(hit[0], None)
                return hit[1]  # type: ignore[return-value]  # stored by this method for this key
        outer = self._tracking.usage
        usage = self._tracking.usage = _Usage()
        try:
            value = compute()
        finally:
            self._tracking.usage = outer
        if outer is not None:  # a derived value used inside another lasts no longer than its parts
            outer.add(usage.expires, usage.tempfail)
        if (
            not usage.tempfail
            and usage.expires > now
            and self._cache_size > 0
            and keep(value)
            and len(repr(key)) <= MAX_KEPT_KEY_LENGTH  # measured on a miss only
        ):
            with self._lock:
                self._derived[key] = (usage.expires, value)
                self._derived.move_to_end(key)
                while len(self._derived) > self._cache_size:
                    self._derived.popitem(last=False)
        return value

    def _used(self, expires: float, answer: DnsAnswer | None) -> None:
        usage = self._tracking.usage
        if usage is not None:
            usage.add(expires, answer is not None and answer.status is DnsStatus.TEMPFAIL)

    def txt(self, name: str | dns.name.Name) -> DnsAnswer:
        return self.query(name, dns.rdatatype.TXT)


@dataclass(frozen=True)
class DnsSettings:
    """Section ``[dns]``.

    Attributes:
        nameservers: addresses to ask (``IP``, ``IP:PORT``, ``[IPv6]:PORT``: :func:`parse_nameserver`);
            empty = the system's resolvers (/etc/resolv.conf).
        port: their port, unless an entry gives its own.
        timeout: seconds for one lookup, retries included.
        cache_size: answers kept in the cache (0 turns it off).
        zone_files: answer only from these RFC 1035 zone files (offline mode; everything else is
            NXDOMAIN). When set, nameservers are not asked.
        message_time_budget: seconds within which one message's checks may send queries
            (:class:`DnsBudget`); far below Postfix's milter_content_timeout (300 s).
        message_query_budget: queries one message's checks may send. The default covers the worst
            legitimate case: SPF for MAIL FROM and HELO (RFC 7208 §4.6.4: 1 + 10 terms, each MX or
            PTR up to 10 address lookups: 111 each), DKIM keys (``max_signatures``, at most 50) and
            DMARC (5 Author Domains x (8-query walk + 3 existence queries) + 11 identifier walks
            x 8): about 420.
        prefetch_queries: at most this many of the names the checks declare (SPF records, DKIM
            keys, the DMARC records) are sent per message as soon as the transaction tells them
            (MAIL FROM, the From and DKIM-Signature fields; all at end of message for a message
            read whole), their answers read by the checks (:meth:`Resolver.prefetch`); they count
            against ``message_query_budget``. 0: each check asks its names when it runs.
    """

    nameservers: tuple[str, ...] = ()
    port: int = bounded(53, 1, 65535)
    timeout: float = bounded(5.0, 0.1, 60)
    cache_size: int = bounded(10000, 0, 10_000_000)
    zone_files: tuple[str, ...] = ()
    # Below Postfix's milter_content_timeout (300 s) with room for the last query's timeout.
    message_time_budget: float = bounded(30.0, 1, 240)
    message_query_budget: int = bounded(500, 10, 10_000)
    prefetch_queries: int = bounded(8, 0, 64)

    def __post_init__(self) -> None:
        validate(self)


def build_resolver(settings: DnsSettings, observer: DnsObserver | None = None) -> Resolver:
    """The resolver a config describes; ``observer`` is told about every lookup (metrics).

    Raises:
        ZoneFileError: a zone file is unreadable or invalid.
    """
    source: DnsSource
    if settings.zone_files:
        source = ZoneFileSource(settings.zone_files)
    else:
        source = NameserverSource(settings.nameservers, settings.port, settings.timeout)
    return Resolver(source, cache_size=settings.cache_size, observer=observer)

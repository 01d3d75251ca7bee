"""The one DNS resolver every check asks: dnspython, a TTL-honouring LRU cache, pluggable sources.

A lookup never raises for a DNS outcome. It returns a :class:`DnsAnswer` whose status says what
happened: records, NXDOMAIN, NODATA (the name exists, the type does not) or TEMPFAIL (timeout,
SERVFAIL, refused...). Each check maps TEMPFAIL to its own ``temperror`` (RFC 7208 §2.6.6,
RFC 6376 §6.1.2, RFC 9989 §4.10) and NXDOMAIN/NODATA to "no record".

Sources:
- :class:`NameserverSource` asks real nameservers (the system's, or the ones configured).
- :class:`ZoneFileSource` answers from RFC 1035 zone files, for offline checks and tests; names
  outside every zone are NXDOMAIN.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.zone

# RFC 2308 §5 lets a resolver cap negative caching; these bound what a hostile zone can make us keep.
MAX_CACHE_TTL = 86400
DEFAULT_NEGATIVE_TTL = 300
# CNAME chains followed inside zone files (real resolvers follow them on their own).
MAX_CNAME_CHAIN = 8
# A directive starts a line (RFC 1035 §5.1); the word in a comment or a TXT string is not one.
_ORIGIN_DIRECTIVE = re.compile(r"^\$ORIGIN\s", re.IGNORECASE | re.MULTILINE)


class DnsStatus(StrEnum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class DnsAnswer:
    """The outcome of one query.

    Attributes:
        status: what happened.
        records: the answer's rdata (dnspython objects) when status is OK.
        ttl: seconds this answer may be cached (0 for TEMPFAIL: never cached).
        reason: for TEMPFAIL, what went wrong (``timeout``, ``SERVFAIL``...), for logs.
    """

    status: DnsStatus
    records: tuple[dns.rdata.Rdata, ...] = ()
    ttl: int = 0
    reason: str = ""

    @property
    def texts(self) -> tuple[str, ...]:
        """TXT records, each with its character-strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2).

        Non-ASCII bytes are replaced: every TXT record we read (SPF, DKIM keys, DMARC) is ASCII.
        """
        out = []
        for rdata in self.records:
            strings = getattr(rdata, "strings", None)
            if strings is not None:
                out.append(b"".join(strings).decode("utf-8", "replace"))
        return tuple(out)

    @property
    def exists(self) -> bool:
        """The name exists (it has records of this type, or of another one)."""
        return self.status in (DnsStatus.OK, DnsStatus.NODATA)


def tempfail(reason: str) -> DnsAnswer:
    return DnsAnswer(DnsStatus.TEMPFAIL, reason=reason)


class DnsSource(Protocol):
    """Where answers come from. Implementations never raise for a DNS outcome."""

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer: ...


def _negative_ttl(message: dns.message.Message | None, default: int = DEFAULT_NEGATIVE_TTL) -> int:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM) seconds."""
    if message is None:
        return default
    for rrset in message.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            soa = rrset[0]
            return int(min(rrset.ttl, soa.minimum))
    return default


class NameserverSource:
    """Asks real nameservers with dnspython's stub resolver.

    Args:
        nameservers: IP addresses to ask; empty means the system's (/etc/resolv.conf).
        port: the port they listen on (53 unless a test or a local cache says otherwise).
        timeout: seconds for one lookup, retries included.
    """

    def __init__(self, nameservers: Sequence[str] = (), port: int = 53, timeout: float = 5.0) -> None:
        self._resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            self._resolver.nameservers = list(nameservers)
        self._resolver.port = port
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)
        self._resolver.cache = None
        self.description = f"{','.join(str(n) for n in self._resolver.nameservers)} port {port}"

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        try:
            answer = self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as e:
            responses = e.kwargs.get("responses") or {}
            last = next(reversed(responses.values()), None) if responses else None
            return DnsAnswer(DnsStatus.NXDOMAIN, ttl=_negative_ttl(last))
        except dns.resolver.LifetimeTimeout:
            return tempfail(f"timeout asking {self.description}")
        except dns.resolver.NoNameservers as e:
            return tempfail(f"no nameserver answered ({e.msg if hasattr(e, 'msg') else e})")
        except dns.exception.DNSException as e:
            return tempfail(f"{type(e).__name__}: {e}")
        if answer.rrset is None:
            return DnsAnswer(DnsStatus.NODATA, ttl=_negative_ttl(answer.response))
        return DnsAnswer(DnsStatus.OK, tuple(answer.rrset), ttl=answer.rrset.ttl)


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
                return DnsAnswer(DnsStatus.OK, tuple(rdataset), ttl=rdataset.ttl)
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None or not len(cname):
                return DnsAnswer(DnsStatus.NODATA, ttl=self._negative_ttl(zone))
            name = cname[0].target
        return tempfail(f"CNAME chain longer than {MAX_CNAME_CHAIN} at {name}")


class Resolver:
    """The resolver all checks share: one source behind a TTL-honouring LRU cache.

    Positive and negative answers (NXDOMAIN, NODATA) are cached for their TTL (capped at
    :data:`MAX_CACHE_TTL`); TEMPFAIL is never cached, so a retry asks again.

    Args:
        source: where answers come from.
        cache_size: entries kept; the least recently used goes first. 0 disables the cache.
        clock: monotonic seconds (a test may pass its own).
    """

    def __init__(
        self,
        source: DnsSource,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[tuple[dns.name.Name, int], tuple[float, DnsAnswer]] = OrderedDict()
        self._lock = threading.Lock()
        self.queries = 0

    def query(self, name: str | dns.name.Name, rdtype: str | dns.rdatatype.RdataType) -> DnsAnswer:
        """Look up ``name``/``rdtype``; never raises for a DNS outcome or a malformed name."""
        try:
            qname = name if isinstance(name, dns.name.Name) else dns.name.from_text(name)
            qtype = dns.rdatatype.RdataType.make(rdtype)
        except (dns.exception.DNSException, ValueError, UnicodeError) as e:
            # A name that cannot be a DNS name cannot exist (e.g. an empty label from a From header).
            return DnsAnswer(DnsStatus.NXDOMAIN, reason=f"invalid name: {e}")
        key = (qname, int(qtype))
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
        self.queries += 1
        answer = self.source.lookup(qname, qtype)
        if answer.status is not DnsStatus.TEMPFAIL and self._cache_size > 0:
            ttl = min(answer.ttl, MAX_CACHE_TTL)
            with self._lock:
                self._cache[key] = (now + ttl, answer)
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return answer

    def txt(self, name: str | dns.name.Name) -> DnsAnswer:
        return self.query(name, dns.rdatatype.TXT)


@dataclass(frozen=True)
class DnsSettings:
    """Section ``[dns]``.

    Attributes:
        nameservers: addresses to ask; empty = the system's resolvers (/etc/resolv.conf).
        port: their port.
        timeout: seconds for one lookup, retries included.
        cache_size: answers kept in the cache (0 turns it off).
        zone_files: answer only from these RFC 1035 zone files (offline mode; everything else is
            NXDOMAIN). When set, nameservers are not asked.
    """

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0
    cache_size: int = 10000
    zone_files: tuple[str, ...] = ()


def build_resolver(settings: DnsSettings) -> Resolver:
    """The resolver a config describes.

    Raises:
        ZoneFileError: a zone file is unreadable or invalid.
    """
    source: DnsSource
    if settings.zone_files:
        source = ZoneFileSource(settings.zone_files)
    else:
        source = NameserverSource(settings.nameservers, settings.port, settings.timeout)
    return Resolver(source, cache_size=settings.cache_size)

"""SPF (RFC 7208) for the MAIL FROM and HELO identities: pyspf, with every lookup through our Resolver.

pyspf normally asks DNS through the module global ``spf.DNSLookup``. Replacing that global would
make every thread share one resolver, so instead each evaluation builds a :class:`_ResolverQuery`
(a ``spf.query`` subclass) whose ``dns()`` method asks the :class:`Resolver` it was given. pyspf
keeps its own processing limits (RFC 7208 §4.6.4: 10 DNS-querying terms, 2 void lookups, 10 MX or
PTR names); our ``dns()`` keeps the void-lookup count and adds the overall time limit.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import dns.rdatatype
import spf

from authmilter.checks import Check, Decided, Outcomes, Question
from authmilter.domains import MAX_LABEL_LENGTH, DomainError, path_address, to_a_labels
from authmilter.memo import remembered_when_small
from authmilter.model import AuthResult, MethodResult, SpfResult, SpfScope
from authmilter.resolver import DnsStatus, Resolver
from authmilter.settings import bounded, validate
from authmilter.transaction import Connection, Transaction

log = logging.getLogger(__name__)

# §4.3 multi-label, RFC 1035 §2.3.4 labels of 1..63 octets. DNS labels may hold any octet, but no
# mail domain holds controls or spaces (RFC 5321 §4.1.2): printable ASCII ("!" to "~") but ".".
_LABEL = rf"[!-\-/-~]{{1,{MAX_LABEL_LENGTH}}}"
_MULTI_LABEL_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
# A name pyspf would ask at all: labels of 1 to 63 characters, whatever they hold (one regex pass
# instead of a split and a test per label on every lookup).
_NON_DOT_LABEL = rf"[^.]{{1,{MAX_LABEL_LENGTH}}}"
_DNS_NAME = re.compile(rf"{_NON_DOT_LABEL}(?:\.{_NON_DOT_LABEL})*")
# Client addresses recur (a handful of clients send most mail); parsing one costs more than the
# rest of a check whose result the resolver has kept.
ADDRESS_CACHE_SIZE = 1024
# A client address as pyspf keeps it: its query's attributes (name, value) from ``set_ip``.
ClientAddress = tuple[tuple[str, Any], ...]

# pyspf's result words, including the pre-RFC 4408 names it still knows, mapped to RFC 7208 §2.6.
_RESULT_WORDS: dict[str, AuthResult] = {
    "pass": AuthResult.PASS,
    "fail": AuthResult.FAIL,
    "softfail": AuthResult.SOFTFAIL,
    "neutral": AuthResult.NEUTRAL,
    "none": AuthResult.NONE,
    "temperror": AuthResult.TEMPERROR,
    "permerror": AuthResult.PERMERROR,
    "error": AuthResult.TEMPERROR,
    "unknown": AuthResult.PERMERROR,
    # Only pyspf's "harsh" record-checking mode (strict=2, which we never use) says "ambiguous": it
    # flags a record that cannot be read one way only, the definition of permerror (§2.6.7).
    "ambiguous": AuthResult.PERMERROR,
}


@dataclass(frozen=True)
class SpfSettings:
    """How SPF is checked.

    Attributes:
        enabled: run SPF at all; when off every check returns none.
        check_helo: also check the HELO identity (RFC 7208 §2.3 RECOMMENDS it).
        timeout: overall seconds for one evaluation; RFC 7208 §4.6.4 suggests at least 20 s.
    """

    enabled: bool = True
    check_helo: bool = True
    timeout: float = bounded(20.0, 1, 120)

    def __post_init__(self) -> None:
        validate(self)


def check_mail_from(
    client_ip: str, helo: str, mail_from: str, resolver: Resolver, settings: SpfSettings
) -> SpfResult:
    """Evaluate SPF for the MAIL FROM identity (RFC 7208 §2.4).

    Args:
        client_ip: the SMTP client's address (IPv4, IPv6 or IPv4-mapped IPv6).
        helo: the HELO/EHLO argument; the identity's domain when the sender is null.
        mail_from: the reverse-path, with or without angle brackets; "" or "<>" is the null sender,
            checked as ``postmaster@<helo>``.
        resolver: where every DNS question goes.
        settings: SPF settings.

    Returns:
        The result with scope MFROM. Never raises: malformed input gives none (RFC 7208 §4.3),
        a broken record permerror, a DNS failure or time-out temperror.
    """
    local, domain = _split_reverse_path(mail_from)
    if local is None:  # null reverse-path: RFC 7208 §2.4 checks postmaster@<HELO>
        local, domain = "postmaster", helo
    return _evaluate(client_ip, helo, local, domain, SpfScope.MFROM, resolver, settings)


def check_helo(client_ip: str, helo: str, resolver: Resolver, settings: SpfSettings) -> SpfResult:
    """Evaluate SPF for the HELO identity (RFC 7208 §2.3), as ``postmaster@<helo>``.

    Args:
        client_ip: the SMTP client's address.
        helo: the HELO/EHLO argument; an address literal or a name that is not a multi-label
            domain gives none.
        resolver: where every DNS question goes.
        settings: SPF settings; with ``check_helo`` off the result is none.

    Returns:
        The result with scope HELO. Never raises.
    """
    if settings.enabled and not settings.check_helo:
        return _none(helo, "postmaster", SpfScope.HELO, "HELO check disabled")
    return _evaluate(client_ip, helo, "postmaster", helo, SpfScope.HELO, resolver, settings)


def _split_reverse_path(mail_from: str) -> tuple[str | None, str]:
    """(local-part, domain) of a reverse-path; (None, "") for the null sender.

    A missing local-part becomes "postmaster" (RFC 7208 §4.3); a path without "@" is kept whole
    as the domain, as pyspf does, so that it is judged by the same domain rules.
    """
    path = path_address(mail_from)
    if not path:
        return None, ""
    # The domain follows the last "@": a quoted local-part may itself hold one.
    local, _, domain = path.rpartition("@")
    return local or "postmaster", domain


def _evaluate(
    client_ip: str,
    helo: str,
    local: str,
    domain: str,
    scope: SpfScope,
    resolver: Resolver,
    settings: SpfSettings,
) -> SpfResult:
    if not settings.enabled:
        return _none(domain, local, scope, "SPF checking disabled")
    address = _client_address(client_ip)
    if address is None:
        # Not the sender's fault and nothing to authorize: no result rather than an error.
        return _none(domain, local, scope, f"client address {client_ip!r} is not an IP address")
    ascii_domain = _checkable_domain(domain)
    if ascii_domain is None:
        # RFC 7208 §4.3: malformed or not multi-label => "none"; §2.3 for HELO address literals.
        return _none(domain, local, scope, f"{domain!r} is not a checkable domain name")
    # The result depends on these and on DNS answers only (pyspf reads no clock and no other
    # state), so the resolver may hand back the one computed while those answers are still cached.
    key = ("spf", scope.value, client_ip, local, ascii_domain, helo, settings.timeout)  # no enum repr
    return resolver.derived(
        key,
        lambda: _check(client_ip, address, helo, local, ascii_domain, scope, resolver, settings),
        keep=lambda result: result.result is not AuthResult.TEMPERROR,  # e.g. out of time
    )


@lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _client_address(text: str) -> ClientAddress | None:
    """pyspf's attributes for a client address (``spf.query.set_ip``), or None if it is none.

    Parsing an address costs as much as evaluating a short record, and every message asks for
    its client's twice (HELO and MAIL FROM): set once per address, by pyspf's own code. The
    values are strings, numbers and an ``ipaddress`` object, all immutable, so shared safely.
    """
    try:
        ipaddress.ip_address(text)  # set_ip would also take the words "list" and "list6"
    except ValueError:
        return None
    attributes = SimpleNamespace(ipaddr=None)  # set_ip reads what __init__ set before it
    spf.query.set_ip(attributes, text)
    return tuple(vars(attributes).items())


# The longest address text (RFC 4291 §2.2, with an IPv4 tail); anything longer (a zone index, junk
# from a record) is parsed each time and not kept.
_LONGEST_ADDRESS = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")


@remembered_when_small(ADDRESS_CACHE_SIZE, _LONGEST_ADDRESS, lambda address, length: len(address))
def _network(address: str, length: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``address`` widened to its /``length`` network, as pyspf's cidrmatch computes it."""
    return ipaddress.ip_network(address).supernet(new_prefix=length)


def _check(
    client_ip: str,
    address: ClientAddress,
    helo: str,
    local: str,
    ascii_domain: str,
    scope: SpfScope,
    resolver: Resolver,
    settings: SpfSettings,
) -> SpfResult:
    identity = f"{local}@{ascii_domain}"
    deadline = time.monotonic() + settings.timeout
    try:
        query = _ResolverQuery(address, identity, local, ascii_domain, helo, resolver, deadline)
        word, _code, explanation = query.check()
    except Exception as e:
        # pyspf reports record and DNS problems as results; an exception here is pyspf tripping over
        # input it cannot read (e.g. a %{L} macro over an undecodable local-part). Retrying would
        # trip again, so this is §2.6.7's "could not be correctly interpreted", not a temporary
        # failure. Senders can cause it at will: one line, the traceback only when debugging.
        log.warning(
            "pyspf raised while checking %r from %s: %s: %s",
            identity,
            client_ip,
            type(e).__name__,
            e,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        word, explanation = "permerror", f"SPF evaluation failed: {type(e).__name__}: {e}"
    result = _RESULT_WORDS.get(word)
    if result is None:
        log.warning("pyspf returned unknown result %r for %s; treated as permerror", word, identity)
        result, explanation = AuthResult.PERMERROR, f"unexpected SPF result {word!r}"
    if result is AuthResult.NONE and not explanation:
        explanation = f"no SPF record for {ascii_domain}"
    return SpfResult(result, ascii_domain, scope, identity, str(explanation))


def _none(domain: str, local: str, scope: SpfScope, why: str) -> SpfResult:
    return SpfResult(AuthResult.NONE, domain, scope, f"{local}@{domain}", why)


@lru_cache(maxsize=ADDRESS_CACHE_SIZE)  # sender domains recur as client addresses do
def _checkable_domain(domain: str) -> str | None:
    """The domain in A-labels, or None when RFC 7208 §4.3 says the result is "none".

    §4.3: a malformed name (label longer than 63, empty label not at the end) or one that is not
    multi-label gives none; internationalized names are checked as A-labels. An address literal
    (``[192.0.2.1]``, RFC 5321 §4.1.3) is not a domain name at all (§2.3).
    """
    if domain.startswith("["):
        return None
    try:
        ascii_name = to_a_labels(domain)  # the one IDNA policy (domains.py); ASCII keeps its case
    except DomainError:
        return None
    return ascii_name if _MULTI_LABEL_NAME.fullmatch(ascii_name) else None


class _ResolverQuery(spf.query):  # type: ignore[misc]
    """A pyspf query whose DNS questions all go to one Resolver: no module global, thread-safe."""

    def __init__(
        self,
        address: ClientAddress,
        sender: str,
        local: str,
        domain: str,
        helo: str,
        resolver: Resolver,
        deadline: float,
    ) -> None:
        # strict=True is pyspf's RFC 7208 mode: limits and syntax errors are permerror (§4.6.4).
        # Without i= pyspf parses no address: the client's attributes come ready-made.
        super().__init__(i=None, s=sender, h=helo, strict=True)
        for name, value in address:
            setattr(self, name, value)
        # pyspf splits the sender at the first "@"; a quoted local-part may hold one, so set the
        # parts we split at the last one (RFC 7208 §4.3).
        self.l, self.o, self.d = local, domain, domain
        self._resolver = resolver
        self._deadline = deadline

    def dns(self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list[Any]:
        """pyspf's one lookup primitive, answered by our Resolver.

        The Resolver (or the nameserver behind it) follows CNAMEs, so ``cnames`` goes unused.
        """
        text = str(name)
        if text.endswith("."):
            text = text[:-1]
        if not _DNS_NAME.fullmatch(text):
            return []  # as pyspf: a name that cannot exist has no records, without asking
        if time.monotonic() > self._deadline:
            # RFC 7208 §4.6.4: past the time limit the check MAY stop with temperror.
            raise spf.TempError(f"SPF evaluation exceeded its time limit before {qtype} {text}")
        answer = self._resolver.query(text, qtype)
        if answer.status is DnsStatus.TEMPFAIL:
            # RFC 7208 §2.6.6 / §4.4: a DNS failure is temperror.
            raise spf.TempError(f"DNS {qtype} lookup for {text} failed: {answer.reason or 'error'}")
        # The records come in the shape pyspf's own lookups return (``spf.DNSLookup``).
        values = list(answer.records)
        if not values and not ignore_void:
            # RFC 7208 §4.6.4: more than 2 lookups answering NXDOMAIN or no records => permerror.
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return values

    def cidrmatch(self, ipaddrs: list[Any], n: int) -> bool:
        """Whether the client is in one of ``ipaddrs`` widened to /``n`` (pyspf's own test).

        pyspf parses every address each time; the same few (an ip4: term, a provider's A record)
        recur message after message, so each (address, length) is parsed once. As in pyspf, all
        are parsed before any is matched: an invalid one is a permerror even after a match.
        """
        try:
            networks = [_network(ip, n) for ip in ipaddrs]
        except ValueError as e:
            raise spf.PermError(str(e)) from None
        return any(self.ipaddr in network for network in networks)

    def validated_ptrs(self) -> list[str]:
        """Validated names for the client address (RFC 7208 §5.5, also used by the %{p} macro).

        Unlike pyspf's version, DNS errors follow §5.5: an error on the PTR lookup means no names
        (the mechanism does not match), an error on one name's address lookup skips that name.
        Only the first 10 names are tried (§4.6.4).
        """
        try:
            names: list[str] = self.dns_ptr(self.i)[: spf.MAX_PTR]
        except spf.TempError:
            return []
        validated = []
        for name in names:
            try:
                addresses = self.dns_a(name, self.A)
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                validated.append(name)
        return validated


# ---------------------------------------------------------------------------------------------
# The checks as the pipeline runs them (checks.py)


class MailFromCheck(Check[SpfSettings, SpfResult]):
    """SPF for the MAIL FROM identity (RFC 7208 §2.4)."""

    name = "spf"
    label = "SPF (MAIL FROM)"

    def enabled(self, settings: SpfSettings) -> bool:
        return settings.enabled

    def envelope_questions(
        self, connection: Connection, mail_from: str, settings: SpfSettings
    ) -> list[Question]:
        # RFC 7208 §4.4: the record is the TXT set at the identity's domain.
        local, domain = _split_reverse_path(mail_from)
        return _record_question(domain if local is not None else connection.helo)

    def evaluate(
        self, transaction: Transaction, earlier: Outcomes, resolver: Resolver, settings: SpfSettings
    ) -> SpfResult:
        client = transaction.connection
        return check_mail_from(client.client_ip, client.helo, transaction.mail_from, resolver, settings)

    def failed(self, transaction: Transaction, settings: SpfSettings, reason: str) -> SpfResult:
        local, domain = _split_reverse_path(transaction.mail_from)
        if local is None:
            local, domain = "postmaster", transaction.connection.helo
        return SpfResult(AuthResult.TEMPERROR, domain, SpfScope.MFROM, f"{local}@{domain}", reason)

    def method_results(self, outcome: SpfResult, decided: Decided) -> tuple[MethodResult, ...]:
        return _mail_from_results(outcome)


class HeloCheck(Check[SpfSettings, SpfResult]):
    """SPF for the HELO identity (RFC 7208 §2.3), when ``check_helo`` is on."""

    name = "helo"
    label = "SPF (HELO)"

    def enabled(self, settings: SpfSettings) -> bool:
        return settings.enabled and settings.check_helo

    def envelope_questions(
        self, connection: Connection, mail_from: str, settings: SpfSettings
    ) -> list[Question]:
        return _record_question(connection.helo)

    def evaluate(
        self, transaction: Transaction, earlier: Outcomes, resolver: Resolver, settings: SpfSettings
    ) -> SpfResult:
        connection = transaction.connection
        return check_helo(connection.client_ip, connection.helo, resolver, settings)

    def failed(self, transaction: Transaction, settings: SpfSettings, reason: str) -> SpfResult:
        helo = transaction.connection.helo
        return SpfResult(AuthResult.TEMPERROR, helo, SpfScope.HELO, f"postmaster@{helo}", reason)

    def method_results(self, outcome: SpfResult, decided: Decided) -> tuple[MethodResult, ...]:
        return _helo_results(outcome)


def _record_question(domain: str) -> list[Question]:
    name = _checkable_domain(domain)
    return [] if name is None else [(name, dns.rdatatype.TXT)]


# The same results recur message after message (results are frozen values).
@lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _mail_from_results(spf: SpfResult) -> tuple[MethodResult, ...]:
    # RFC 8601 §2.7.2: smtp.mailfrom carries the MAIL FROM identity checked.
    return (MethodResult("spf", spf.result, (("smtp", "mailfrom", spf.identity or spf.domain),)),)


@lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _helo_results(helo: SpfResult) -> tuple[MethodResult, ...]:
    return (MethodResult("spf", helo.result, (("smtp", "helo", helo.domain),)),)

"""DMARC evaluation per RFC 9989 (DMARCbis; obsoletes RFC 7489 and RFC 9091) -> :class:`DmarcVerdict`.

Plain functions over plain data: the From domains, the SPF and DKIM results, and the shared
:class:`Resolver` (the only way we ask DNS). Nothing here raises for bad input or a DNS outcome.

Choices made where RFC 9989 leaves room, or where this code reads it a particular way:

- Record syntax (§4.7, §4.8). A TXT record is a DMARC record only if it starts with ``v=DMARC1``
  (value case-sensitive); otherwise :func:`parse_dmarc_record` returns None. After that, "syntax
  errors in the remainder of the record MUST be discarded in favor of default values (if any) or
  ignored outright" (§4.7): a malformed or unknown tag is dropped, a bad value takes the default, a
  repeated tag keeps its first value. So ``v=DMARC1; p=none; reject`` is a valid ``p=none`` record;
  authheaders reports permerror for it (see tests/test_dmarc_authheaders.py).
- Missing or invalid ``p``, or an invalid ``sp``/``np`` (§4.10.1): with at least one valid ``rua``
  URI the record is read as ``p=none`` (valid ``sp``/``np`` kept, invalid ones dropped); without
  one, :attr:`DmarcRecord.policy` is None and the record is not applied (result ``none``).
- Several DMARC records at one name (§4.10 steps 2 and 6): all are discarded, as if none were there;
  the walk goes on to the parent.
- Legacy ``pct`` (Appendix A.6, Appendix C.5). RFC 9989 removes ``pct`` and defines ``t`` as the
  counterpart of ``pct=0`` (``t=y``) and ``pct=100`` (``t=n``). We keep ``pct`` for reports and map
  it only when ``t`` is absent: ``pct=0`` -> testing (``t=y``); any other value -> ``t=n`` (the policy
  applies in full; no sampling). An explicit ``t`` always wins.
- Test mode (§4.7, ``t``): on a DMARC fail, ``t=y`` applies the policy one level below: reject ->
  quarantine, quarantine -> none; it never changes ``none``.
- Non-existent domains (§3.2, Appendix A.4, RFC 8020): asked only when ``np`` could change the
  answer (record found above the Author Domain, ``np`` present and different from the fallback).
  The Author Domain is non-existent when A, AAAA and MX all answer NXDOMAIN; the first answer that
  shows the name exists (records or NODATA) stops the checks.
- DNS errors (§4.10.1, §5.3.6): a TEMPFAIL during policy discovery gives ``temperror`` with
  disposition none. A TEMPFAIL while walking for an identifier's Organizational Domain only matters
  when nothing else aligned; then the result is ``temperror`` too.
- Identifiers that could not be checked (§5.3.2: "If neither passes and one or both of them fail
  due to a temporary error, the Mail Receiver evaluating the message cannot conclude that the DMARC
  mechanism had a permanent failure; they, therefore, cannot apply the advertised DMARC policy").
  We read "them" as the aligned identifiers, the only ones whose pass could make DMARC pass. So,
  in this order: any aligned pass gives ``pass`` (a temporary error elsewhere cannot change it);
  otherwise, if a DKIM signature whose ``d=`` aligns with the Author Domain ended in ``temperror``
  (key lookup TEMPFAIL, time limit), or SPF of a MAIL FROM domain that aligns ended in
  ``temperror``, the result is ``temperror`` (``[policy] dmarc_temperror``, 451 4.4.3 by default),
  so a DNS blip is retried instead of bounced (not when the policy asks nothing of a failing
  message, p=none: actions.py accepts it then); otherwise ``fail``. A signature that was checked and
  failed (bad body hash, bad signature, no key record: permanent answers) gives no such exception,
  nor does a temperror of an unaligned identifier, nor the HELO identity (DMARC uses only MAIL
  FROM, §4.4.2). Alignment of an unverified identifier is judged as for a passing one (relaxed or
  strict; a walk that itself fails makes the result ``temperror`` as above).
- Several From domains (§5.3.1, §11.5): each is evaluated and the strictest verdict applies (see
  :func:`_severity`). More than :data:`MAX_AUTHOR_DOMAINS` give ``permerror`` before any query
  (:func:`too_many_author_domains`), whatever the first few would have given.
- ``org_domain="psl"`` (RFC 7489 §3.2, §6.6.3): the Organizational Domain comes from the Public Suffix
  List; the policy is looked up at the From domain, then at its Organizational Domain. ``psd`` is
  ignored there; ``sp``/``np`` are chosen as in tree-walk mode. A domain that is itself a public
  suffix is its own Organizational Domain, as RFC 9989 §4.10.2 does when the walk finds nothing
  ("the initial target domain is the Organizational Domain").
- Domains are lower-cased, lose one trailing dot, and U-labels become A-labels (§5.3.1, IDNA2003
  codec of the standard library); a name that cannot be a DNS name gives ``permerror``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import dns.rdatatype

from authmilter.checks import Check, Decided, Outcomes, Question
from authmilter.domains import is_within, normalize
from authmilter.memo import remembered_when_small
from authmilter.message import MAX_CACHED_FROM_LENGTH, FromAuthors, HeaderField, parse_from_value
from authmilter.model import (
    NOT_ENFORCED_NOTE,
    Action,
    ArcResult,
    AuthResult,
    Disposition,
    DkimResult,
    DmarcRecord,
    DmarcVerdict,
    MethodResult,
    SpfResult,
    SpfScope,
)
from authmilter.resolver import DnsStatus, Resolver
from authmilter.settings import bounded, one_of, validate
from authmilter.suffix_list import public_suffix_list
from authmilter.transaction import Transaction

# RFC 9989 §4.10: "Author Domains with more than eight labels do not result in more than eight DNS
# queries".
RFC9989_MAX_WALK_QUERIES = 8
# RFC 9989 §11.5: evaluating every domain of a multi-mailbox From invites a denial of service;
# "Limiting the number of Author Domains processed will avoid this risk."
MAX_AUTHOR_DOMAINS = 5
# A message can carry many signatures; each alignment walk is bounded, this bounds how many run.
MAX_SIGNATURES_CHECKED = 10
# Rendered method results kept (the same verdicts recur message after message).
RESULT_CACHE_SIZE = 4096

_POLICIES = {d.value: d for d in Disposition}
# §4.8: tag names are 1*ALPHA.
_TAG_NAME = re.compile(r"[A-Za-z]+")
# §4.8 dmarc-uri is an RFC 3986 URI: a scheme, a colon, then something.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")
# RFC 7489's "!size" suffix; RFC 9989 Appendix C.4 removed it, so it is cut off.
_SIZE_SUFFIX = re.compile(r"![0-9]+[kmgt]?$", re.IGNORECASE)
_FO_OPTIONS = frozenset("01ds")
_EXISTENCE_TYPES = ("A", "AAAA", "MX")


@dataclass(frozen=True)
class DmarcSettings:
    """How DMARC is evaluated.

    Attributes:
        enabled: evaluate DMARC at all (the pipeline reads this; the functions here do not).
        org_domain: ``"treewalk"`` (RFC 9989 §4.10) or ``"psl"`` (RFC 7489 §3.2, publicsuffixlist).
        psl_file: a ``public_suffix_list.dat`` to pin; None uses publicsuffixlist's bundled list.
        max_tree_walk: queries one tree walk may make, 1 to 8 (RFC 9989 §4.10 stops at 8).
    """

    enabled: bool = True
    org_domain: str = one_of("treewalk", frozenset({"treewalk", "psl"}))
    psl_file: str | None = None
    max_tree_walk: int = bounded(RFC9989_MAX_WALK_QUERIES, 1, RFC9989_MAX_WALK_QUERIES)

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------------------------------------
# Record parsing (RFC 9989 §4.7, §4.8)


# Many domains publish the same record text ("v=DMARC1; p=none", a provider's): the record is
# frozen, so one parse serves them all. No real record comes near the length limit; a longer TXT
# text is parsed each time, so what is kept stays bounded whatever a zone publishes.
RECORD_MEMO_SIZE = 1024
RECORD_MEMO_LENGTH = 1024


@remembered_when_small(RECORD_MEMO_SIZE, RECORD_MEMO_LENGTH, len)
def parse_dmarc_record(text: str) -> DmarcRecord | None:
    """Parse one TXT record (its strings already joined, RFC 9989 §4.5).

    Args:
        text: the record text.

    Returns:
        None when the text is not a DMARC record (it does not start with ``v=DMARC1``); otherwise
        the record, with syntax errors after ``v`` dropped as RFC 9989 §4.7 requires. ``policy`` is
        None when the record has no usable ``p`` (see the module docstring); such a record is still
        found by discovery but is not applied.
    """
    tags = _split_tags(text)
    if not tags or tags[0][0] != "v" or tags[0][1] != "DMARC1":
        return None
    values: dict[str, str] = {}
    for name, value in tags[1:]:
        values.setdefault(name, value)  # a repeated tag is a syntax error: the first one stays
    return _build_record(values, text)


def _split_tags(text: str) -> list[tuple[str, str]]:
    """Tag-value pairs (name lower-cased), dropping any piece that is not ``1*ALPHA = value``."""
    pairs = []
    for piece in text.split(";"):
        name, sep, value = piece.partition("=")
        name, value = name.strip(" \t"), value.strip(" \t")
        if sep and _TAG_NAME.fullmatch(name) and value:
            pairs.append((name.lower(), value))
        elif not pairs:
            return []  # §4.7: "v" MUST be present and MUST appear first
    return pairs


def _build_record(values: dict[str, str], raw: str) -> DmarcRecord:
    rua = _uri_list(values.get("rua"))
    policy = _policy(values.get("p"))
    subdomain_policy = _policy(values.get("sp"))
    nonexistent_policy = _policy(values.get("np"))
    invalid_sp = "sp" in values and subdomain_policy is None
    invalid_np = "np" in values and nonexistent_policy is None
    if policy is None or invalid_sp or invalid_np:
        # §4.10.1: a valid rua makes it "a record containing p=none"; without one it is not applied.
        policy = Disposition.NONE if rua else None
    pct = _pct(values.get("pct"))
    return DmarcRecord(
        policy=policy,
        subdomain_policy=subdomain_policy,
        nonexistent_policy=nonexistent_policy,
        adkim_strict=_lower(values.get("adkim")) == "s",
        aspf_strict=_lower(values.get("aspf")) == "s",
        testing=_testing(values.get("t"), pct),
        psd=_lower(values.get("psd")) if _lower(values.get("psd")) in ("y", "n", "u") else "u",
        rua=rua,
        ruf=_uri_list(values.get("ruf")),
        failure_options=_failure_options(values.get("fo")),
        pct=pct,
        raw=raw,
    )


def _lower(value: str | None) -> str:
    return value.lower() if value is not None else ""


def _policy(value: str | None) -> Disposition | None:
    return _POLICIES.get(_lower(value))


def _pct(value: str | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 3:
        return None
    number = int(value)
    return number if number <= 100 else None


def _testing(t_value: str | None, pct: int | None) -> bool:
    t_flag = _lower(t_value)
    if t_flag in ("y", "n"):
        return t_flag == "y"
    # Appendix A.6: t=y stands for the old pct=0, t=n for pct=100 (see the module docstring).
    return pct == 0


def _uri_list(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    uris = (_SIZE_SUFFIX.sub("", uri.strip(" \t")) for uri in value.split(","))
    return tuple(uri for uri in uris if _URI.fullmatch(uri))


def _failure_options(value: str | None) -> str:
    options = _lower(value).replace(" ", "").split(":")
    if value is None or not all(len(o) == 1 and o in _FO_OPTIONS for o in options):
        return "0"  # §4.7 default
    return ":".join(options)


# ---------------------------------------------------------------------------------------------
# DNS: one name's DMARC record, the tree walk (§4.10), the Organizational Domain (§4.10.2)


@dataclass(frozen=True)
class _Found:
    domain: str
    record: DmarcRecord


@dataclass(frozen=True)
class _Walk:
    """What a tree walk found (longest name first), or why it could not finish."""

    found: tuple[_Found, ...] = ()
    tempfail: str = ""

    def record_at(self, domain: str) -> DmarcRecord | None:
        return next((f.record for f in self.found if f.domain == domain), None)


class _TempFail(Exception):
    """A lookup could not complete; carries the reason. Never leaves this module."""


def _lookup_record(domain: str, resolver: Resolver) -> DmarcRecord | None:
    """The single DMARC record at ``_dmarc.<domain>``, or None (none, or several: §4.10 step 2)."""
    answer = resolver.txt(f"_dmarc.{domain}")
    if answer.status is DnsStatus.TEMPFAIL:
        raise _TempFail(f"DNS lookup of _dmarc.{domain} failed: {answer.reason or 'temporary error'}")
    if answer.status is not DnsStatus.OK:
        return None
    records = [r for r in (parse_dmarc_record(t) for t in answer.texts) if r is not None]
    return records[0] if len(records) == 1 else None


def _walk_targets(domain: str, max_queries: int) -> list[str]:
    """The names a tree walk queries, §4.10 steps 1-7: the name itself, then at most
    ``max_queries - 1`` labels (7 for the RFC's 8), then one label fewer each time."""
    labels = domain.split(".")
    next_length = min(len(labels) - 1, max_queries - 1)
    return [domain] + [".".join(labels[-n:]) for n in range(next_length, 0, -1)]


def _tree_walk(domain: str, resolver: Resolver, max_queries: int) -> _Walk:
    # A walk reads nothing but DNS: kept while the answers it read are cached (a walk that ended
    # in a DNS failure is not kept).
    return resolver.derived(("dmarc-walk", domain, max_queries), lambda: _walk(domain, resolver, max_queries))


def _walk(domain: str, resolver: Resolver, max_queries: int) -> _Walk:
    found: list[_Found] = []
    for target in _walk_targets(domain, max_queries):
        try:
            record = _lookup_record(target, resolver)
        except _TempFail as e:
            return _Walk(tuple(found), tempfail=str(e))
        if record is not None:
            found.append(_Found(target, record))
            if record.psd in ("y", "n"):  # §4.10 steps 2 and 6: stop
                break
    return _Walk(tuple(found))


def _org_from_walk(start: str, walk: _Walk) -> str:
    """§4.10.2: select the Organizational Domain from the records a walk from ``start`` found."""
    for found in walk.found:  # longest name first
        if found.record.psd == "n":
            return found.domain
        if found.record.psd == "y" and found.domain != start:
            return ".".join(start.split(".")[-(found.domain.count(".") + 2) :])
    if walk.found:
        return walk.found[-1].domain  # the record at the name with the fewest labels
    return start  # "If this process does not determine the Organizational Domain..."


def load_public_suffix_list(settings: DmarcSettings) -> None:
    """Read the Public Suffix List now when ``org_domain = "psl"``, not on the first message.

    A worker calls this at start-up, so a pinned list that became unreadable since the config was
    checked stops the worker with the reason instead of failing messages.

    Raises:
        OSError: the pinned ``psl_file`` cannot be read.
        UnicodeDecodeError: it is not UTF-8 text.
    """
    if settings.org_domain == "psl":
        public_suffix_list(settings.psl_file)


def _psl_org(domain: str, settings: DmarcSettings) -> str:
    registrable = public_suffix_list(settings.psl_file).privatesuffix(domain)
    return registrable.lower() if isinstance(registrable, str) else domain


class _OrgDomains:
    """Organizational Domains for one evaluation, each walk or PSL lookup done once."""

    def __init__(self, resolver: Resolver, settings: DmarcSettings) -> None:
        self._resolver = resolver
        self._settings = settings
        self._known: dict[str, str] = {}

    def remember(self, domain: str, org: str) -> None:
        self._known[domain] = org

    def of(self, domain: str) -> str:
        """Raises _TempFail when a walk could not finish."""
        if domain not in self._known:
            if self._settings.org_domain == "psl":
                self._known[domain] = _psl_org(domain, self._settings)
            else:
                walk = _tree_walk(domain, self._resolver, self._settings.max_tree_walk)
                if walk.tempfail:
                    raise _TempFail(walk.tempfail)
                self._known[domain] = _org_from_walk(domain, walk)
        return self._known[domain]


def organizational_domain(domain: str, resolver: Resolver, settings: DmarcSettings) -> str:
    """The Organizational Domain of ``domain``.

    Args:
        domain: any domain name (U-labels, upper case and a trailing dot are accepted).
        resolver: asked for ``_dmarc`` records in tree-walk mode (RFC 9989 §4.10.2).
        settings: ``org_domain`` picks the tree walk or the Public Suffix List (RFC 7489 §3.2).

    Returns:
        The Organizational Domain in lower-case A-label form. A name the walk or the list cannot
        place (a public suffix itself, or a walk that ended in a DNS error) is its own
        Organizational Domain; "" when ``domain`` cannot be a DNS name.
    """
    name = normalize(domain)
    if name is None:
        return ""
    try:
        return _OrgDomains(resolver, settings).of(name)
    except _TempFail:
        return name


# ---------------------------------------------------------------------------------------------
# Policy discovery (§4.10.1; RFC 7489 §6.6.3 in psl mode)


class _Policy(NamedTuple):
    record: DmarcRecord
    policy_domain: str
    org_domain: str


def _discover(author: str, resolver: Resolver, settings: DmarcSettings, orgs: _OrgDomains) -> _Policy | None:
    """The record that applies to ``author`` and where it was found; raises _TempFail."""
    if settings.org_domain == "psl":
        return _discover_psl(author, resolver, orgs)
    walk = _tree_walk(author, resolver, settings.max_tree_walk)
    if walk.tempfail:
        raise _TempFail(walk.tempfail)
    org = _org_from_walk(author, walk)
    orgs.remember(author, org)
    # §4.10.1: the Author Domain's record, else the Organizational Domain's, else the PSD's.
    for domain in (author, org):
        record = walk.record_at(domain)
        if record is not None:
            return _Policy(record, domain, org)
    psd = next((f for f in walk.found if f.record.psd == "y"), None)
    return _Policy(psd.record, psd.domain, org) if psd is not None else None


def _discover_psl(author: str, resolver: Resolver, orgs: _OrgDomains) -> _Policy | None:
    org = orgs.of(author)
    for domain in dict.fromkeys((author, org)):  # RFC 7489 §6.6.3 steps 1-3
        record = _lookup_record(domain, resolver)
        if record is not None:
            return _Policy(record, domain, org)
    return None


def _author_exists(author: str, resolver: Resolver) -> bool:
    """Appendix A.4 / RFC 8020: the name exists unless A, AAAA and MX all say NXDOMAIN."""
    for rdtype in _EXISTENCE_TYPES:
        answer = resolver.query(author, rdtype)
        if answer.status is DnsStatus.TEMPFAIL:
            raise _TempFail(f"DNS lookup of {author}/{rdtype} failed: {answer.reason or 'temporary error'}")
        if answer.status is not DnsStatus.NXDOMAIN:
            return True
    return False


def _existing_subdomain_policy(record: DmarcRecord, policy: Disposition) -> tuple[Disposition, str]:
    # §4.7 sp: "If both the sp tag is absent, and the np tag is either absent or not applicable,
    # the policy specified by the p tag MUST be applied for subdomains."
    return (record.subdomain_policy, "sp") if record.subdomain_policy else (policy, "p")


def _applicable_policy(
    author: str, found: _Policy, policy: Disposition, resolver: Resolver
) -> tuple[Disposition, str]:
    """§4.10.1: p for the Author Domain's own record; sp (existing) or np (non-existent) for a
    record found above it, each falling back as §4.7 says. Raises _TempFail."""
    if found.policy_domain == author:
        return policy, "p"
    existing = _existing_subdomain_policy(found.record, policy)
    np = found.record.nonexistent_policy
    if np is None or np == existing[0] or _author_exists(author, resolver):
        return existing
    return np, "np"


# ---------------------------------------------------------------------------------------------
# Alignment (§4.4, §4.10.2)


def _aligned(identifier: str, author: str, strict: bool, author_org: str, orgs: _OrgDomains) -> bool:
    """Raises _TempFail when the identifier's Organizational Domain could not be found."""
    if identifier == author:
        return True
    if strict or not is_within(identifier, author_org):
        # An Organizational Domain is the name itself or a parent, so an identifier outside the
        # Author's Organizational Domain cannot share it: no walk needed.
        return False
    return orgs.of(identifier) == author_org


def identifier_aligned(
    identifier: str, author: str, strict: bool, resolver: Resolver, settings: DmarcSettings
) -> bool:
    """Whether an authenticated identifier aligns with an Author Domain (RFC 9989 §3.2.2, §4.4).

    For a result another host recorded (ARC's trusted-sealer check, arc_check.py): the same rule
    as for our own SPF and DKIM results.

    Args:
        identifier: the authenticated domain (a DKIM d=, an SPF MAIL FROM domain).
        author: the RFC5322.From domain.
        strict: strict alignment (the record's ``adkim=s`` / ``aspf=s``).
        resolver: for the Organizational Domains.
        settings: ``org_domain`` (tree walk or PSL).

    Returns:
        True when aligned; False otherwise, also when a DNS failure leaves it unknown.
    """
    name, author_name = normalize(identifier), normalize(author)
    if not name or not author_name:
        return False
    orgs = _OrgDomains(resolver, settings)
    try:
        return _aligned(name, author_name, strict, orgs.of(author_name), orgs)
    except _TempFail:
        return False


class _Alignment(NamedTuple):
    spf: bool
    dkim: bool
    unknown: str  # why an aligned identifier or an alignment check is unresolved ("" when none is)
    reason: str  # why nothing aligned ("" when something did)


_NOT_CHECKED = _Alignment(spf=False, dkim=False, unknown="", reason="")


def _spf_identifier(spf: SpfResult | None) -> str | None:
    # §3.2 (SPF Domain), §4.4.2: only a passing MAIL FROM check gives an identifier.
    if spf is None or spf.result is not AuthResult.PASS or spf.scope is not SpfScope.MFROM:
        return None
    return normalize(spf.domain)


def _check_alignment(
    author: str,
    found: _Policy,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    orgs: _OrgDomains,
) -> _Alignment:
    record, unknown = found.record, ""

    def check(identifier: str | None, strict: bool) -> bool:
        nonlocal unknown
        if identifier is None:
            return False
        try:
            return _aligned(identifier, author, strict, found.org_domain, orgs)
        except _TempFail as e:
            unknown = unknown or str(e)
            return False

    spf_domain = _spf_identifier(spf)
    signatures = dkim[:MAX_SIGNATURES_CHECKED]
    dkim_domains = [normalize(s.domain) if s.result is AuthResult.PASS else None for s in signatures]
    spf_ok = check(spf_domain, record.aspf_strict)
    dkim_ok = any(check(domain, record.adkim_strict) for domain in dkim_domains)
    if spf_ok or dkim_ok:
        return _Alignment(spf_ok, dkim_ok, unknown, reason="")
    # §5.3.2: with no aligned pass, an ALIGNED identifier whose check ended in a temporary error
    # leaves the outcome open (see the module docstring); an unaligned one could not have passed.
    for identifier, strict, why in _unverified_identifiers(spf, signatures, record):
        if not unknown and check(identifier, strict):
            unknown = why
    reason = _misalignment(author, record, spf, spf_domain, signatures, dkim_domains)
    return _Alignment(spf_ok, dkim_ok, unknown, reason)


def _unverified_identifiers(
    spf: SpfResult | None, signatures: Sequence[DkimResult], record: DmarcRecord
) -> list[tuple[str | None, bool, str]]:
    """(domain, strict alignment, why) of each identifier whose check ended in temperror."""
    found: list[tuple[str | None, bool, str]] = []
    if spf is not None and spf.result is AuthResult.TEMPERROR and spf.scope is SpfScope.MFROM:
        why = f"SPF of the aligned MAIL FROM domain {spf.domain} could not be checked: {spf.explanation}"
        found.append((normalize(spf.domain), record.aspf_strict, why))
    for signature in signatures:
        if signature.result is AuthResult.TEMPERROR:
            why = (
                f"aligned DKIM signature d={signature.domain} s={signature.selector} could not be "
                f"checked: {signature.reason}"
            )
            found.append((normalize(signature.domain), record.adkim_strict, why))
    return found


def _misalignment(
    author: str,
    record: DmarcRecord,
    spf: SpfResult | None,
    spf_domain: str | None,
    signatures: Sequence[DkimResult],
    dkim_domains: Sequence[str | None],
) -> str:
    """Why nothing aligned, naming every identifier (only a failure needs the words)."""
    if spf is None:
        notes = ["no spf result"]
    elif spf_domain is None:
        notes = [f"spf={spf.result} for {spf.domain or 'no domain'}"]
    else:
        notes = [f"spf=pass for {spf_domain} not aligned with {author}"]
    notes += [_dkim_note(s, d, author) for s, d in zip(signatures, dkim_domains, strict=True)]
    if not signatures:
        notes.append("no dkim signature")
    mode = f"aspf={'s' if record.aspf_strict else 'r'}, adkim={'s' if record.adkim_strict else 'r'}"
    return f"no aligned SPF or DKIM ({mode}): " + ", ".join(notes)


def _dkim_note(signature: DkimResult, domain: str | None, author: str) -> str:
    if signature.result is not AuthResult.PASS:
        return f"dkim={signature.result} for d={signature.domain or '?'}"
    return f"dkim d={domain or signature.domain or '?'} not aligned with {author}"


# ---------------------------------------------------------------------------------------------
# Evaluation


def from_header_error(reason: str, from_domains: tuple[str, ...] = ()) -> DmarcVerdict:
    """The verdict for a message whose From gives no usable Author Domain (RFC 9989 §5.3.1).

    evaluate_dmarc() returns it too, for a From domain that is not a domain name and for a From
    with more Author Domains than it evaluates.

    Args:
        reason: what is wrong (no From, several From fields, an address without a domain...).
        from_domains: the From domains, when there are any.

    Returns:
        A ``permerror`` verdict with disposition none and no ``from_domain``.
    """
    return DmarcVerdict(result=AuthResult.PERMERROR, reason=reason, from_domains=from_domains)


def evaluate_dmarc(
    from_domains: Sequence[str],
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    resolver: Resolver,
    settings: DmarcSettings,
) -> DmarcVerdict:
    """Evaluate DMARC for a message (RFC 9989 §5.3).

    Args:
        from_domains: the RFC5322.From domains (several for a multi-mailbox From).
        spf: the MAIL FROM SPF result, if SPF ran.
        dkim: one result per DKIM-Signature.
        resolver: the shared resolver.
        settings: the DMARC settings.

    Returns:
        The verdict of the strictest Author Domain, with ``from_domains`` listing all of them.
    """
    domains = _author_domains(from_domains)
    if not domains:
        return from_header_error("no RFC5322.From domain")
    too_many = too_many_author_domains(domains)
    if too_many is not None:
        return too_many
    # The verdict depends on these inputs and on DNS answers only: the resolver hands back the one
    # computed while every answer it read (records, walks, existence checks) is still cached, as
    # the same sender's next message needs it. A signature's header.b is new in every message and
    # never read here, so the key leaves it out. It holds plain values, not the result objects: the
    # resolver measures a new key as text, and dataclass and enum reprs cost more than the key.
    signatures = tuple(
        (s.result.value, s.domain, s.selector, s.algorithm, s.reason, s.identity, s.testing) for s in dkim
    )
    walk = (settings.org_domain, settings.psl_file, settings.max_tree_walk)
    key = ("dmarc", domains, _plain_spf(spf), signatures, walk)

    def strictest() -> DmarcVerdict:
        return max((_evaluate_one(d, domains, spf, dkim, resolver, settings) for d in domains), key=_severity)

    return resolver.derived(key, strictest)


def _plain_spf(spf: SpfResult | None) -> tuple[str, ...] | None:
    """Every field of an SPF result, as plain values for a key."""
    if spf is None:
        return None
    return (spf.result.value, spf.domain, spf.scope.value, spf.identity, spf.explanation)


def _author_domains(from_domains: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(normalize(d) or d for d in from_domains))


def too_many_author_domains(from_domains: Sequence[str]) -> DmarcVerdict | None:
    """The ``permerror`` verdict for more Author Domains than are evaluated, else None.

    §11.5: evaluating every domain of a multi-mailbox From invites a denial of service, and "If not
    all Author Domains are processed, then the DMARC evaluation is incomplete". The cap is checked
    before any DNS query (evaluate_dmarc() does, and the pipeline before any other check), so such
    a From costs no lookup at all.

    Args:
        from_domains: the RFC5322.From domains.
    """
    domains = _author_domains(from_domains)
    if len(domains) <= MAX_AUTHOR_DOMAINS:
        return None
    return from_header_error(
        f"{len(domains)} From domains, more than the {MAX_AUTHOR_DOMAINS} evaluated; evaluation incomplete",
        domains,
    )


# Order for several From domains (§11.5: "apply the most strict policy"): a reject or a quarantine
# first, then a result we could not finish, then the rest. A pass or none only stands for the
# message when every domain got it, so it ranks lowest.
_DISPOSITION_SEVERITY = {Disposition.REJECT: 10, Disposition.QUARANTINE: 9}
_RESULT_SEVERITY = {
    AuthResult.TEMPERROR: 8,
    AuthResult.FAIL: 7,
    AuthResult.PERMERROR: 6,
    AuthResult.NONE: 5,
    AuthResult.PASS: 4,
}


def _severity(verdict: DmarcVerdict) -> int:
    return _DISPOSITION_SEVERITY.get(verdict.disposition) or _RESULT_SEVERITY.get(verdict.result, 0)


class _Outcome(NamedTuple):
    """What the published policy and the alignment checks decide (the rest of a verdict)."""

    result: AuthResult
    reason: str
    policy: Disposition | None = None
    disposition: Disposition = Disposition.NONE


def _evaluate_one(
    author: str,
    from_domains: tuple[str, ...],
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    resolver: Resolver,
    settings: DmarcSettings,
) -> DmarcVerdict:
    if normalize(author) != author:
        return from_header_error(f"From domain {author!r} is not a domain name", from_domains)
    orgs = _OrgDomains(resolver, settings)
    try:
        found = _discover(author, resolver, settings, orgs)
    except _TempFail as e:
        return DmarcVerdict(
            AuthResult.TEMPERROR, from_domain=author, reason=str(e), from_domains=from_domains
        )
    if found is None:
        # §4.10.1: no record -> "Mail Receivers MUST NOT apply the DMARC mechanism".
        return DmarcVerdict(
            AuthResult.NONE,
            from_domain=author,
            org_domain=_own_org(author, orgs),
            reason=f"no DMARC record for {author}",
            from_domains=from_domains,
        )
    if found.record.policy is None:
        alignment = _NOT_CHECKED
        outcome = _Outcome(
            AuthResult.NONE,
            f"record at _dmarc.{found.policy_domain} has no valid p= and no rua= "
            "(RFC 9989 §4.10.1): not applied",
        )
    else:
        alignment = _check_alignment(author, found, spf, dkim, orgs)
        outcome = _apply(author, found, found.record.policy, alignment, resolver)
    return DmarcVerdict(
        outcome.result,
        from_domain=author,
        policy_domain=found.policy_domain,
        org_domain=found.org_domain,
        policy=outcome.policy,
        disposition=outcome.disposition,
        spf_aligned=alignment.spf,
        dkim_aligned=alignment.dkim,
        record=found.record,
        reason=outcome.reason,
        from_domains=from_domains,
    )


def _own_org(author: str, orgs: _OrgDomains) -> str:
    try:
        return orgs.of(author)
    except _TempFail:
        return author


def _apply(
    author: str,
    found: _Policy,
    published: Disposition,
    alignment: _Alignment,
    resolver: Resolver,
) -> _Outcome:
    passed = alignment.spf or alignment.dkim
    try:
        policy, tag = _applicable_policy(author, found, published, resolver)
    except _TempFail as e:
        if not passed:
            return _Outcome(AuthResult.TEMPERROR, str(e))
        # A pass does not depend on which policy applies; report the one for an existing domain.
        policy, tag = _existing_subdomain_policy(found.record, published)
    source = f"{tag}={policy} at _dmarc.{found.policy_domain}"
    if passed:
        via = " and ".join(name for name, ok in (("SPF", alignment.spf), ("DKIM", alignment.dkim)) if ok)
        return _Outcome(AuthResult.PASS, f"aligned {via} ({source})", policy)
    if alignment.unknown:
        return _Outcome(AuthResult.TEMPERROR, alignment.unknown, policy)
    disposition = policy.on_failure(found.record.testing)
    testing = f"; t=y, so {disposition}" if found.record.testing and policy is not Disposition.NONE else ""
    return _Outcome(AuthResult.FAIL, f"{alignment.reason} ({source}{testing})", policy, disposition)


# ---------------------------------------------------------------------------------------------
# The check as the pipeline runs it (checks.py)


class DmarcCheck(Check[DmarcSettings, DmarcVerdict]):
    """DMARC over the SPF (MAIL FROM) and DKIM outcomes and the From domains (RFC 9989 §5.3)."""

    name = "dmarc"
    label = "DMARC"
    requires = ("spf", "dkim")
    prefetch_fields = frozenset({"from"})

    def enabled(self, settings: DmarcSettings) -> bool:
        return settings.enabled

    def precheck(self, transaction: Transaction, settings: DmarcSettings) -> DmarcVerdict | None:
        # The cheap structural caps come before any DNS query: a From that gives no Author Domain,
        # several From fields, more than MAX_AUTHOR_DOMAINS domains (§11.5).
        return unusable_from(transaction.authors)

    def field_questions(self, field: HeaderField, settings: DmarcSettings) -> list[Question]:
        # RFC 9989 §4.10: the walk asks the Author Domain's own _dmarc name and then every shorter
        # name of _walk_targets (it stops early only on a psd= tag), so all of them are asked at
        # once: a sub-domain sender's policy then costs one round trip, not one per label. A From
        # the precheck refuses (its structural caps, §11.5) is asked nothing.
        return list(_policy_questions(parse_from_value(field.value), settings.max_tree_walk))

    def evaluate(
        self, transaction: Transaction, earlier: Outcomes, resolver: Resolver, settings: DmarcSettings
    ) -> DmarcVerdict:
        authors = transaction.authors
        if authors.error:
            return from_header_error(authors.error)
        spf = earlier.get("spf")
        dkim = earlier.get("dkim", ())
        # evaluate_dmarc applies the cap on Author Domains of precheck() itself.
        return evaluate_dmarc(
            authors.domains,
            spf if isinstance(spf, SpfResult) else None,
            dkim if isinstance(dkim, tuple) else (),
            resolver,
            settings,
        )

    def failed(self, transaction: Transaction, settings: DmarcSettings, reason: str) -> DmarcVerdict:
        return DmarcVerdict(AuthResult.TEMPERROR, reason=reason, from_domains=transaction.authors.domains)

    def method_results(self, outcome: DmarcVerdict, decided: Decided) -> tuple[MethodResult, ...]:
        # A trusted ARC sealer that lifted the failure is named (pipeline's trusted-forwarder step).
        arc = decided.outcomes.get("arc")
        sealer = arc.override if isinstance(arc, ArcResult) else ""
        applied = unenforced_disposition(outcome, decided.action)
        # Keyed by what the resinfo shows: hashing a whole verdict (its record, its reason) costs
        # more than building the resinfo.
        shown = (outcome.result, outcome.from_domain, outcome.policy, outcome.disposition)
        return _method_results(*shown, applied, sealer)


# The From value of a sender recurs message after message, and parse_from gives the same
# FromAuthors for it: what DMARC derives from it alone is computed once (both results immutable: a
# frozen verdict, a tuple), for the short Froms message.py keeps parsed too. A hostile From of up to
# MAX_FROM_LENGTH is computed each time, so the memos stay as small as message.py's.
def _from_length(authors: FromAuthors, *settings: object) -> int:
    return sum(map(len, authors.addresses)) + len(authors.error)


@remembered_when_small(RESULT_CACHE_SIZE, MAX_CACHED_FROM_LENGTH, _from_length)
def _policy_questions(authors: FromAuthors, max_tree_walk: int) -> tuple[Question, ...]:
    if unusable_from(authors) is not None:
        return ()
    return tuple(
        (f"_dmarc.{target}", dns.rdatatype.TXT)
        for domain in _author_domains(authors.domains)
        for target in _walk_targets(domain, max_tree_walk)
    )


@remembered_when_small(RESULT_CACHE_SIZE, MAX_CACHED_FROM_LENGTH, _from_length)
def unusable_from(authors: FromAuthors) -> DmarcVerdict | None:
    """The permerror verdict for a From that gives no Author Domain DMARC can evaluate, else None."""
    if authors.error:
        return from_header_error(authors.error)
    return too_many_author_domains(authors.domains)


@lru_cache(maxsize=RESULT_CACHE_SIZE)
def _method_results(
    result: AuthResult,
    from_domain: str,
    policy: Disposition | None,
    disposition: Disposition,
    applied: Disposition | None,
    trusted_sealer: str,
) -> tuple[MethodResult, ...]:
    # dis= says what was done: when local policy did not apply the disposition DMARC asked for
    # ([policy] enforce = false, never_reject_*), a reader must not take the message as rejected.
    comment = f"p={policy.value} dis={disposition.value}" if policy else ""
    if policy and applied is not None and applied is not disposition:
        why = f"overridden by trusted ARC sealer {trusted_sealer}" if trusted_sealer else NOT_ENFORCED_NOTE
        comment = f"p={policy.value} dis={applied.value}, {disposition.value} {why}"
    return (MethodResult("dmarc", result, (("header", "from", from_domain),), comment),)


# What an action does to a message, as a DMARC disposition (RFC 9989 §4.7's terms). A tempfailed
# message is not delivered yet: nothing was applied.
_ACTION_DISPOSITION = {
    Action.ACCEPT: Disposition.NONE,
    Action.QUARANTINE: Disposition.QUARANTINE,
    Action.REJECT: Disposition.REJECT,
    Action.TEMPFAIL: Disposition.NONE,
}


def unenforced_disposition(dmarc: DmarcVerdict | None, action: Action) -> Disposition | None:
    """What was done instead of the disposition DMARC asked for, when local policy overrode it.

    Args:
        dmarc: the DMARC verdict.
        action: the action decided (``[policy] enforce = false`` and the never-reject lists
            accept where DMARC asks for reject or quarantine).

    Returns:
        The disposition applied when it differs from the one asked for; None when DMARC asked
        for nothing or got what it asked.
    """
    if dmarc is None or dmarc.disposition is Disposition.NONE:
        return None
    applied = _ACTION_DISPOSITION[action]
    return None if applied is dmarc.disposition else applied

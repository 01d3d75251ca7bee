"""ARC (RFC 8617): chain validation (§5.2) and the trusted-sealer override of a DMARC failure.

Interface, for the pipeline (each function is pure over headers, body digests and the resolver,
and never raises for anything in the message):

- :class:`ArcCheck`: the registered check (checks.py), run after DKIM and before DMARC, its
  resinfo written after DMARC's.
- :class:`ArcSettings`: section ``[arc]`` (verification, trusted sealers, sealing; arc_seal.py
  reads the sealing part).
- :func:`arc_body_hashes` (at the end of the header block): the body hashes the
  ARC-Message-Signatures need, for the streaming hasher (dkim_body.py) next to DKIM's.
- :func:`verify_arc` (at end of message): ``ArcResult`` (model.py): ``arc=pass|fail|none``, the
  highest instance, ``oldest_pass``, the sealing domains and, on pass, the newest
  ARC-Authentication-Results for the next step. A message without ARC header fields costs one
  lookup per field name (bench/micro.py ``arc_none``).
- :func:`trusted_forwarder` (after DMARC): the trusted sealer that vouches for a message DMARC
  failed, or "": then the pipeline does not apply the DMARC policy and says why (A-R comment,
  history reason ``trusted_forwarder``).
- The A-R clause (:meth:`ArcCheck.method_results`, rendered by authresults.py):
  ``arc=... smtp.remote-ip=... header.oldest-pass=``, RFC 8617 §10.1 registers both properties.

Validation follows RFC 8617 §5.2 step by step (see :func:`verify_arc`). The header hash and the
signature over it are DKIM's (:func:`authmilter.dkim_verify.verify_header_signature`, which hashes
what dkimpy's ``verify_sig_process`` hashes); keys come through our resolver
(:func:`authmilter.dkim_verify.lookup_public_key`), body hashes from the digests computed as the
body streamed in. dkimpy's own ``ARC.verify`` is not used: it reads the
body, asks DNS itself, and picks the ARC-Seal's signed fields by their place in the header block
rather than by instance (§5.1.1).

Decisions:

- DNS failures while fetching a key make that signature invalid, so the chain fails (RFC 8617 has
  no temperror for ARC); a trusted sealer's mail then meets the DMARC policy as it would without
  ARC. The reason says "key unavailable".
- RSA keys shorter than ``[dkim] min_rsa_bits`` and a= other than rsa-sha256 fail (RFC 8617 §4.1.3
  and §4.1.2 use RFC 6376's algorithms; RFC 8301 removes rsa-sha1).
- Trusted sealers are matched by the newest ARC-Seal's d= exactly (no subdomains): trusting a
  domain means trusting its ARC key, and a sibling's key is someone else's.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple

import dkim
import dkim.util
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

from authmilter.authresults import parse_authentication_results
from authmilter.checks import Check, Decided, Outcomes
from authmilter.dkim_body import BodyDigests, BodyHashSpec, digest_body
from authmilter.dkim_verify import (
    DkimSettings,
    KeyProblem,
    PublicKey,
    lookup_public_key,
    parsed_header_fields,
    verify_header_signature,
)
from authmilter.dmarc import DmarcSettings, identifier_aligned
from authmilter.message import MessageHeaders, ParsedMessage, unfold
from authmilter.model import ARC_NONE, ArcResult, AuthResult, DmarcRecord, DmarcVerdict, MethodResult
from authmilter.resolver import Resolver
from authmilter.settings import one_of, validate
from authmilter.transaction import Transaction

log = logging.getLogger(__name__)

SEAL = "ARC-Seal"
MESSAGE_SIGNATURE = "ARC-Message-Signature"
AUTHENTICATION_RESULTS = "ARC-Authentication-Results"
FIELD_NAMES = (AUTHENTICATION_RESULTS, MESSAGE_SIGNATURE, SEAL)
# RFC 8617 §4.2.1: "The maximum number of ARC Sets that can be attached to a message is 50."
MAX_INSTANCES = 50
# The only algorithm ARC signs with (RFC 8617 §4.1.2/§4.1.3 via RFC 6376, RFC 8301 §3.1).
ALGORITHM = b"rsa-sha256"
SEAL_MAIL_CHOICES = ("inbound", "outbound", "all")
MAX_REASON_LENGTH = 120
# RFC 8617 §4.1.1: the AAR is "i=" instance ";" then the A-R payload.
_AAR_INSTANCE = re.compile(rb"\s*i\s*=\s*([0-9]{1,3})\s*;")
_INSTANCE_VALUE = re.compile(rb"[0-9]{1,3}")
_CANONICAL_NAMES = {name.lower().encode(): name for name in FIELD_NAMES}
_LOWER_NAMES = frozenset(name.lower() for name in FIELD_NAMES)


@dataclass(frozen=True)
class ArcSettings:
    """Section ``[arc]``.

    Attributes:
        verify: validate ARC chains on inbound mail and write ``arc=`` into our A-R.
        trusted_sealers: sealing domains (newest ARC-Seal d=) whose chains may override a DMARC
            failure, lower-case without a trailing dot.
        seal: add an ARC Set to the mail ``seal_mail`` names (arc_seal.py).
        seal_mail: ``inbound`` (mail we verified: a forwarder or list server sealing what it
            received), ``outbound`` (mail leaving, e.g. a list's re-sent copy, sealed with our own
            earlier A-R) or ``all``.
        signing_domain, selector, key_file: the sealer's d=, s= and RSA private key.
    """

    verify: bool = True
    trusted_sealers: frozenset[str] = frozenset()
    seal: bool = False
    seal_mail: str = one_of("inbound", frozenset(SEAL_MAIL_CHOICES))
    signing_domain: str = ""
    selector: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        validate(self)

    def seals(self, outbound: bool) -> bool:
        """Whether mail in this direction gets an ARC Set."""
        return self.seal and self.seal_mail in ("all", "outbound" if outbound else "inbound")


class ArcCheckSettings(NamedTuple):
    """What the ARC check reads: ``[arc]`` (``verify``) and ``[dkim]`` (``min_rsa_bits`` for the
    chain's keys)."""

    arc: ArcSettings
    dkim: DkimSettings


class ArcCheck(Check[ArcCheckSettings, ArcResult]):
    """ARC chain validation (RFC 8617 §5.2) over the body digests streamed in with DKIM's.

    It runs before DMARC (the trusted-forwarder step after the decision reads both), and its
    resinfo follows DMARC's in the header (the A-R form authmilter has written since ARC came).
    """

    name = "arc"
    label = "ARC"
    results_after = ("dmarc",)

    def enabled(self, settings: ArcCheckSettings) -> bool:
        return settings.arc.verify

    def evaluate(
        self, transaction: Transaction, earlier: Outcomes, resolver: Resolver, settings: ArcCheckSettings
    ) -> ArcResult:
        return verify_arc(transaction.message, resolver, settings.dkim, transaction.body)

    def failed(self, transaction: Transaction, settings: ArcCheckSettings, reason: str) -> ArcResult:
        # RFC 8617 has no temperror for ARC (§4.4): a chain that could not be validated fails.
        return ArcResult(AuthResult.FAIL, reason=reason[:MAX_REASON_LENGTH])

    def method_results(self, outcome: ArcResult, decided: Decided) -> tuple[MethodResult, ...]:
        return _method_results(outcome, decided.client_ip)


@lru_cache(maxsize=1024)
def _method_results(arc: ArcResult, client_ip: str) -> tuple[MethodResult, ...]:
    # RFC 8617 §10.1 registers smtp.remote-ip and header.oldest-pass for arc; the comment names
    # the sealing domains, oldest first, or why the chain failed.
    if arc.result is AuthResult.NONE:
        return (MethodResult("arc", AuthResult.NONE),)
    sealers = " ".join(arc.sealers)
    comment = f"{arc.reason}, sealers {sealers}" if arc.reason else f"i={arc.instances} sealers {sealers}"
    oldest = "" if arc.oldest_pass is None else str(arc.oldest_pass)
    properties = (("smtp", "remote-ip", client_ip), ("header", "oldest-pass", oldest))
    return (MethodResult("arc", arc.result, properties, comment),)


class _Broken(Exception):
    """The chain fails (§5.2): why, in a few words."""


@dataclass
class _Set:
    """The fields of one instance, as found (several of a kind make the set invalid)."""

    results: list[bytes] = field(default_factory=list)  # raw AAR values
    signatures: list[tuple[tuple[bytes, bytes], dict[bytes, bytes]]] = field(default_factory=list)
    seals: list[tuple[tuple[bytes, bytes], dict[bytes, bytes]]] = field(default_factory=list)


def has_arc_fields(headers: MessageHeaders) -> bool:
    """Any ARC header field at all: the only work a message without ARC costs (one pass)."""
    return any(field.name.lower() in _LOWER_NAMES for field in headers.fields)


def arc_body_hashes(headers: MessageHeaders, settings: ArcSettings) -> frozenset[BodyHashSpec]:
    """The body hashes the message's ARC-Message-Signatures compare (bh=, RFC 8617 §4.1.2).

    Args:
        headers: the header block as known at its end.
        settings: ``verify``.

    Returns:
        One spec per distinct c= and a= among at most MAX_INSTANCES signatures; none that cannot
        be read (they fail before their body hash).
    """
    if not settings.verify:
        return frozenset()
    values = [found.value.encode("latin-1") for found in headers.get_all(MESSAGE_SIGNATURE)[:MAX_INSTANCES]]
    return _body_hashes_of(values)


def _body_hashes_of(values: Iterable[bytes]) -> frozenset[BodyHashSpec]:
    needed: set[BodyHashSpec] = set()
    for value in values:
        try:
            tags = dkim.util.parse_tag_value(value)
            if tags.get(b"a") == ALGORITHM:
                needed.add(_body_hash_spec(tags))
        except (dkim.util.InvalidTagValueList, InvalidCanonicalizationPolicyError, ValueError):
            continue
    return frozenset(needed)


def _body_hash_spec(tags: dict[bytes, bytes]) -> BodyHashSpec:
    # §4.1.2: the AMS is a DKIM-Signature in all but name; relaxed/relaxed as dkimpy reads no c=.
    policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"relaxed/relaxed"))
    length = int(tags[b"l"]) if b"l" in tags else None
    return BodyHashSpec(policy.body_algorithm.name.decode(), length, tags[b"a"].rpartition(b"-")[2].decode())


def verify_arc(
    message: ParsedMessage,
    resolver: Resolver,
    dkim_settings: DkimSettings,
    body: BodyDigests | None = None,
) -> ArcResult:
    """Validate the Authenticated Received Chain (RFC 8617 §5.2).

    Args:
        message: the message (the header block is enough when ``body`` is given).
        resolver: where the keys come from.
        dkim_settings: ``min_rsa_bits``.
        body: the body hashes computed as the body streamed in (:func:`arc_body_hashes`); None:
            computed here from ``message``'s body.

    Returns:
        ``none`` without ARC header fields; ``pass`` with ``oldest_pass`` when every step holds;
        ``fail`` with the reason otherwise. Never raises.
    """
    if not has_arc_fields(message.headers):
        return ARC_NONE  # §5.2 step 1: no ARC Sets
    sets: dict[int, _Set] = {}
    try:
        fields = parsed_header_fields(message.raw)
        sets = _collect(fields)
        if body is None:
            values = [header[1] for found in sets.values() for header, _ in found.signatures]
            body = digest_body(_body_hashes_of(values), message.body)
        return _validate(fields, sets, resolver, dkim_settings, body)
    except _Broken as broken:
        return _failed(sets, str(broken))
    except Exception as e:
        # dkimpy on hostile input can raise nearly anything: the chain cannot be validated.
        log.warning("ARC validation error: %r", e)
        return _failed(sets, f"validation error: {type(e).__name__}")


def _failed(sets: dict[int, _Set], reason: str) -> ArcResult:
    return ArcResult(
        AuthResult.FAIL, max(sets, default=0), sealers=_sealers(sets), reason=reason[:MAX_REASON_LENGTH]
    )


def _sealers(sets: dict[int, _Set]) -> tuple[str, ...]:
    found = []
    for instance in sorted(sets):
        for _, tags in sets[instance].seals[:1]:
            found.append(tags.get(b"d", b"").decode("ascii", "replace").lower().rstrip("."))
    return tuple(found)


def _collect(fields: Sequence[tuple[bytes, bytes]]) -> dict[int, _Set]:
    """Group the ARC fields by instance; raises _Broken for a field whose i= cannot be read."""
    sets: dict[int, _Set] = {}
    count = 0
    for name, value in fields:
        lowered = name.lower()
        if lowered not in _CANONICAL_NAMES:
            continue
        count += 1
        if count > len(FIELD_NAMES) * MAX_INSTANCES:
            raise _Broken(f"more than {MAX_INSTANCES} ARC sets")  # §5.2 step 1
        if lowered == b"arc-authentication-results":
            match = _AAR_INSTANCE.match(value)
            if match is None:
                raise _Broken("ARC-Authentication-Results without a valid i=")
            instance, tags = int(match.group(1)), None
        else:
            try:
                tags = dkim.util.parse_tag_value(value)
            except dkim.util.InvalidTagValueList as e:
                raise _Broken(f"{_CANONICAL_NAMES[lowered]} not parseable: {e!r}") from e
            if not _INSTANCE_VALUE.fullmatch(tags.get(b"i", b"")):
                raise _Broken(f"{_CANONICAL_NAMES[lowered]} without a valid i=")
            instance = int(tags[b"i"])
        if not 1 <= instance <= MAX_INSTANCES:
            raise _Broken(f"instance i={instance} out of range 1-{MAX_INSTANCES}")  # §4.2.1
        found = sets.setdefault(instance, _Set())
        if tags is None:
            found.results.append(value)
        elif lowered == b"arc-message-signature":
            found.signatures.append(((name, value), tags))
        else:
            found.seals.append(((name, value), tags))
    return sets


def _validate(
    fields: list[tuple[bytes, bytes]],
    sets: dict[int, _Set],
    resolver: Resolver,
    settings: DkimSettings,
    body: BodyDigests,
) -> ArcResult:
    newest = max(sets)
    _check_structure(sets, newest)
    verifier = _Verifier(fields, resolver, settings, body)
    # Step 4: the newest ARC-Message-Signature must validate.
    problem = verifier.message_signature(sets[newest])
    if problem:
        raise _Broken(f"ARC-Message-Signature i={newest} {problem}")
    # Step 6: every ARC-Seal, newest first.
    for instance in range(newest, 0, -1):
        problem = verifier.seal(sets, instance)
        if problem:
            raise _Broken(f"ARC-Seal i={instance} {problem}")
    # Step 5 (optional, done once the chain is known to hold): the oldest AMS that still validates.
    oldest_pass = 0
    for instance in range(newest - 1, 0, -1):
        if verifier.message_signature(sets[instance]):
            oldest_pass = instance + 1
            break
    latest = _AAR_INSTANCE.sub(b"", sets[newest].results[0], count=1)
    return ArcResult(
        AuthResult.PASS,
        newest,
        oldest_pass=oldest_pass,
        sealers=_sealers(sets),
        latest_results=unfold(latest.decode("utf-8", "replace")).strip(),
    )


def _check_structure(sets: dict[int, _Set], newest: int) -> None:
    """§5.2 steps 2 and 3; raises _Broken."""
    for instance in range(1, newest + 1):
        found = sets.get(instance)
        if found is None:
            raise _Broken(f"ARC set i={instance} missing")  # 3.2: a continuous sequence 1..N
        if not (len(found.results) == len(found.signatures) == len(found.seals) == 1):
            raise _Broken(f"ARC set i={instance} does not have exactly one of each field")  # 3.1
    for instance in range(newest, 0, -1):
        cv = sets[instance].seals[0][1].get(b"cv", b"").lower()
        if cv == b"fail":
            # Step 2 (the newest) and 3.3 (any other): a chain already marked failed stays failed.
            raise _Broken(f"ARC-Seal i={instance} has cv=fail")
        expected = b"none" if instance == 1 else b"pass"
        if cv != expected:
            written = cv.decode("ascii", "replace")
            raise _Broken(f"ARC-Seal i={instance} has cv={written}, not {expected.decode()}")


def sealed_fields(sets: dict[int, _Set], instance: int) -> list[tuple[bytes, bytes]]:
    """§5.1.1: what an ARC-Seal signs: every ARC Set up to its own, by increasing instance, each
    as AAR, AMS, AS (the sets must be complete: :func:`_check_structure`)."""
    return [
        signed
        for number in range(1, instance + 1)
        for signed in (
            (AUTHENTICATION_RESULTS.encode(), sets[number].results[0]),
            sets[number].signatures[0][0],
            sets[number].seals[0][0],
        )
    ]


def seal_names(ordered: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """The include list for dkimpy's hash_headers over :func:`seal_order`'s fields."""
    return [name.lower() for name, _ in ordered]


def seal_order(ordered: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields as dkimpy's hash_headers must see them to take them in ``ordered``'s order: it
    picks each name's occurrences from the bottom up."""
    return list(ordered[::-1])


def chain_fields(fields: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The ARC Sets of a message a new ARC-Seal signs (§5.1.1), in order, from its header fields.

    Raises:
        ValueError: the chain is not structurally valid (then only the new set is sealed, §5.1.2).
    """
    try:
        sets = _collect(fields)
        if sets:
            _check_structure(sets, max(sets))
    except _Broken as e:
        raise ValueError(str(e)) from None
    return sealed_fields(sets, max(sets, default=0))


def newest_instance(headers: MessageHeaders) -> tuple[int, bytes]:
    """The highest instance among the ARC fields that can be read, and its ARC-Seal's cv= (b""
    when unreadable): what a sealer needs (RFC 8617 §5.1 steps 1 and 2)."""
    newest, cv = 0, b""
    for name in FIELD_NAMES:
        for found in headers.get_all(name)[: MAX_INSTANCES + 1]:
            value = found.value.encode("latin-1", "replace")
            if name == AUTHENTICATION_RESULTS:
                match = _AAR_INSTANCE.match(value)
                number, seal_cv = (int(match.group(1)) if match else 0), None
            else:
                try:
                    tags = dkim.util.parse_tag_value(value)
                except dkim.util.InvalidTagValueList:
                    continue
                text = tags.get(b"i", b"")
                number = int(text) if _INSTANCE_VALUE.fullmatch(text) else 0
                seal_cv = tags.get(b"cv", b"").lower() if name == SEAL else None
            if number > newest:
                newest, cv = number, b""
            if number == newest and seal_cv is not None:
                cv = seal_cv
    return newest, cv


class _Verifier:
    """Checks the signatures of one message: its header fields parsed once, keys via the resolver."""

    def __init__(
        self, fields: list[tuple[bytes, bytes]], resolver: Resolver, settings: DkimSettings, body: BodyDigests
    ) -> None:
        self._fields = fields
        self._resolver = resolver
        self._settings = settings
        self._body = body

    def message_signature(self, found: _Set) -> str:
        """§4.1.2 and RFC 6376 §6.1 for one AMS: "" when valid, else why not."""
        header, tags = found.signatures[0]
        try:
            dkim.validate_signature_fields(tags, [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"], True)
        except dkim.ValidationError as e:
            return f"invalid: {e}"
        names = [name.lower() for name in re.split(rb"\s*:\s*", tags[b"h"].strip())]
        if b"arc-seal" in names:
            return "signs ARC-Seal (RFC 8617 §4.1.2)"
        try:
            spec = _body_hash_spec(tags)
        except (InvalidCanonicalizationPolicyError, ValueError) as e:
            return f"invalid: {e}"
        digest = self._body.digests.get(spec)
        try:
            claimed = base64.b64decode(re.sub(rb"\s+", b"", tags[b"bh"]))
        except binascii.Error:
            return "invalid: bh= is not base64"
        if digest is None or digest != claimed:
            return "body hash did not verify"
        signed = {k: v for k, v in tags.items() if k != b"bh"}  # the body hash is checked above
        signed.setdefault(b"c", b"relaxed/relaxed")
        # dkimpy canonicalizes every field it is given before picking the signed ones: only those
        # named in h= pick the same fields for less work (as dkim_verify.py does).
        wanted = set(names)
        return self._signature(signed, names, header, [f for f in self._fields if f[0].lower() in wanted])

    def seal(self, sets: dict[int, _Set], instance: int) -> str:
        """§4.1.3 for one ARC-Seal: "" when valid, else why not."""
        header, tags = sets[instance].seals[0]
        try:
            dkim.validate_signature_fields(tags, [b"i", b"a", b"b", b"cv", b"d", b"s"], True)
        except dkim.ValidationError as e:
            return f"invalid: {e}"
        if b"h" in tags:
            return "has h= (RFC 8617 §4.1.3)"
        # The seal's own b= is left empty: hash_headers adds it as the signature field.
        ordered = sealed_fields(sets, instance)[:-1]
        seal_tags = {**tags, b"c": b"relaxed/relaxed"}  # §4.1.3: relaxed header canonicalization
        return self._signature(seal_tags, seal_names(ordered), header, seal_order(ordered))

    def _signature(
        self,
        tags: dict[bytes, bytes],
        names: list[bytes],
        header: tuple[bytes, bytes],
        fields: Sequence[tuple[bytes, bytes]],
    ) -> str:
        key = lookup_public_key(tags[b"d"], tags[b"s"], tags[b"a"], self._resolver, self._settings)
        if isinstance(key, KeyProblem):
            return key.reason
        return "" if self._verifies(tags, names, header, fields, key) else "signature did not verify"

    def _verifies(
        self,
        tags: dict[bytes, bytes],
        names: list[bytes],
        header: tuple[bytes, bytes],
        fields: Sequence[tuple[bytes, bytes]],
        key: PublicKey,
    ) -> bool:
        try:
            return verify_header_signature(tags, names, header, fields, key)
        except dkim.DKIMException:  # a key too short for the digest
            return False


def trusted_forwarder(
    arc: ArcResult,
    dmarc: DmarcVerdict | None,
    settings: ArcSettings,
    resolver: Resolver,
    dmarc_settings: DmarcSettings,
) -> str:
    """The trusted sealer that vouches for a message DMARC failed, or "".

    All must hold: DMARC failed; the chain validated (``arc=pass``); the newest ARC-Seal's d= is in
    ``trusted_sealers``; and that sealer's ARC-Authentication-Results recorded, for every From
    domain, an aligned pass (RFC 9989 alignment, the record's adkim/aspf): ``dkim=pass`` with an
    aligned ``header.d``, ``spf=pass`` with an aligned ``smtp.mailfrom``, or ``dmarc=pass`` for
    that ``header.from``. A broken or untrusted chain never overrides.

    Args:
        arc: the chain validation.
        dmarc: the DMARC verdict.
        settings: ``trusted_sealers``.
        resolver: for Organizational Domains (alignment).
        dmarc_settings: ``org_domain``.

    Returns:
        The sealing domain, or "".
    """
    if dmarc is None or dmarc.result is not AuthResult.FAIL or arc.result is not AuthResult.PASS:
        return ""
    sealer = arc.sealers[-1] if arc.sealers else ""
    if sealer not in settings.trusted_sealers:
        return ""
    results = _recorded_passes(arc.latest_results)
    record = dmarc.record
    for author in dmarc.from_domains or (dmarc.from_domain,):
        if not any(
            _vouches(method, identifier, author, record, resolver, dmarc_settings)
            for method, identifier in results
        ):
            return ""
    return sealer


def _recorded_passes(payload: str) -> list[tuple[str, str]]:
    """(method, identifier) for each passing dkim, spf and dmarc result in an A-R payload."""
    parsed = parse_authentication_results(payload)
    if parsed is None:
        return []
    found = []
    for result in parsed.results:
        if str(result.result).lower() != "pass":
            continue
        method = str(result.method).lower()
        properties = {(str(p.type).lower(), str(p.name).lower()): str(p.value) for p in result.properties}
        identifier = {
            "dkim": properties.get(("header", "d")),
            "spf": properties.get(("smtp", "mailfrom"), "").rpartition("@")[2] or None,
            "dmarc": properties.get(("header", "from")),
        }.get(method)
        if identifier:
            found.append((method, identifier))
    return found


def _vouches(
    method: str,
    identifier: str,
    author: str,
    record: DmarcRecord | None,
    resolver: Resolver,
    settings: DmarcSettings,
) -> bool:
    if method == "dmarc":
        return identifier.lower().rstrip(".") == author
    strict = bool(record is not None and (record.adkim_strict if method == "dkim" else record.aspf_strict))
    return identifier_aligned(identifier, author, strict, resolver, settings)


def with_override(arc: ArcResult, sealer: str) -> ArcResult:
    """The chain result noting the sealer whose chain overrode the DMARC policy."""
    return replace(arc, override=sealer)


def normalise_sealers(domains: Iterable[str]) -> frozenset[str]:
    """Trusted sealer domains as compared: lower-case, no trailing dot."""
    return frozenset(domain.strip().lower().rstrip(".") for domain in domains if domain.strip())

"""DKIM verification (RFC 6376 §6, RFC 8301, RFC 8463): one :class:`DkimResult` per DKIM-Signature.

dkimpy is the reference for every step, and still parses keys; this module drives the steps itself,
because dkimpy's ``DKIM.verify()`` answers only True/False (or an exception), reads ``time.time()``
inside and turns every key problem into False. So, per signature, in RFC 6376 §6.1 order:

1. §6.1.1, validate the signature header: dkimpy's tag-list rules (``_tag_list``: the same results
   as its ``parse_tag_value``, faster; parsed once per field value, which the header callback and
   the end of the header read too) and ``validate_signature_fields``
   (with ``t=``/``x=`` taken out and checked here against ``now``, so tests and replays can freeze
   time without touching ``time.time``), plus the rules dkimpy skips: From must be signed, no
   rsa-sha1 (RFC 8301 §3.1).
2. §6.1.2, get the public key: through our :class:`~authmilter.resolver.Resolver` (not dkimpy's
   ``dnsfunc``, which cannot tell NXDOMAIN from TEMPFAIL), then the key-record rules dkimpy skips
   (``h=``, ``k=`` against ``a=``, ``s=``, revocation, ``t=s``, RFC 8301 §3.2 key size).
3. §6.1.3, compute the verification: the body hash is compared here, from the
   :class:`~authmilter.dkim_body.BodyDigests` computed as the body streamed in (the body itself is
   never kept, see dkim_body.py); then the header hash and the signature
   (:func:`verify_header_signature`): what dkimpy's ``verify_sig_process`` does after the body
   hash, the same octets hashed and the same RSA and Ed25519 checks, without building a
   ``dkim.DKIM`` per message or canonicalizing fields that are not signed (tests compare both).

Result words follow RFC 8601 §2.7.1. Nothing raises: an unexpected dkimpy exception is that
signature's permerror, logged.
"""

from __future__ import annotations

import base64
import binascii
import logging
import operator
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import dkim
import dkim.crypto
import dns.rdatatype
import nacl.exceptions
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import DuplicateTag, InvalidTagSpec, InvalidTagValueList

from authmilter.checks import Check, Decided, Outcomes, Question
from authmilter.dkim_body import HASH_ALGORITHMS, BodyDigests, BodyHashSpec, digest_body
from authmilter.dkim_rsa import B_TAG, compress_whitespace, rsa_verify, unfold_header_value
from authmilter.memo import octets, remembered_when_small
from authmilter.message import HeaderField
from authmilter.model import AuthResult, DkimResult, MethodResult
from authmilter.resolver import DnsStatus, Resolver
from authmilter.settings import bounded, validate
from authmilter.transaction import Transaction

logger = logging.getLogger(__name__)

# RFC 6376 §3.5 gives no tolerance for t=/x=. An x= is the signer's own limit on replays, so only
# our clock's error is forgiven: five minutes, OpenDKIM's default ClockDrift. A future t= carries no
# security weight (the RFC only says MAY ignore) and is mostly a signer clock or time zone set wrong,
# so it gets dkimpy's ten hours ("leeway for mailers with inaccurate clocks").
EXPIRY_CLOCK_SKEW = 300
FUTURE_TIMESTAMP_SKEW = 36000
# Reasons end up in Authentication-Results comments and logs; dkimpy's can quote whole b= values.
MAX_REASON_LENGTH = 120

# RFC 6376 §3.5: tags every signature MUST carry.
_REQUIRED_TAGS = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
# RFC 6376 §3.6.1 k= values we can verify, by the a= prefix that uses them (RFC 8463 §3 for ed25519).
_KEY_TYPES = (b"rsa", b"ed25519")


@dataclass(frozen=True)
class DkimSettings:
    """How DKIM signatures are verified.

    Attributes:
        enabled: verify at all (off: no results, the pipeline writes nothing or ``none``).
        max_signatures: signatures verified per message, in header order; the rest are reported as
            ``policy`` (RFC 6376 §6.1 lets a verifier limit the work; RFC 8601 §2.7.1 ``policy``).
        min_rsa_bits: RSA keys shorter than this fail (RFC 8301 §3.2: under 1024 MUST NOT pass).
        timeout: seconds the whole message's verification may spend; signatures not started in
            time are ``temperror``.
    """

    enabled: bool = True
    max_signatures: int = bounded(5, 1, 50)
    # RFC 8301 §3.2: verifiers MUST NOT accept RSA keys under 1024 bits.
    min_rsa_bits: int = bounded(1024, 1024, 16384)
    timeout: float = bounded(5.0, 0.1, 60)

    def __post_init__(self) -> None:
        validate(self)


class _Stop(Exception):
    """Ends one signature's evaluation with a final result word and reason."""

    def __init__(self, result: AuthResult, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass(frozen=True)
class PublicKey:
    """A usable public key: dkimpy's key object and what the key record says about it.

    Attributes:
        pk: dkimpy's key: a dict of integers for RSA, a PyNaCl ``VerifyKey`` for Ed25519.
        bits: the RSA modulus size (256 for Ed25519).
        ktag: the k= type, ``rsa`` or ``ed25519``.
        testing: the key record has t=y.
    """

    pk: Any
    bits: int
    ktag: bytes
    testing: bool


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_LENGTH else reason[: MAX_REASON_LENGTH - 3] + "..."


def _lenient_tags(value: bytes) -> dict[bytes, bytes]:
    """Tags of a signature that does not parse strictly, for naming it in a result.

    A tag given twice is blanked: naming either value would attribute the signature on a guess.
    """
    tags: dict[bytes, bytes] = {}
    for spec in value.split(b";"):
        name, sep, tag_value = spec.partition(b"=")
        if sep:
            name = name.strip()
            tags[name] = b"" if name in tags else tag_value.strip()
    return tags


def _result(
    result: AuthResult, tags: Mapping[bytes, bytes], reason: str = "", testing: bool = False
) -> DkimResult:
    return DkimResult(
        result=result,
        domain=_text(tags.get(b"d", b"")).lower(),
        selector=_text(tags.get(b"s", b"")),
        algorithm=_text(tags.get(b"a", b"")),
        reason=_short(reason),
        # RFC 6008: header.b is a prefix of b= (FWS removed) long enough to tell signatures apart.
        # bytes.split() cuts at the same ASCII whitespace as the regex \s, in a tenth of the time.
        header_b=_text(b"".join(tags.get(b"b", b"").split())[:8]),
        identity=_text(tags.get(b"i", b"")),
        testing=testing,
    )


def _tag_list(value: bytes) -> dict[bytes, bytes]:
    """RFC 6376 §3.2 tag list: ``dkim.util.parse_tag_value``'s result and exceptions, faster.

    dkimpy tests each tag name with a module-level ``re.match``, whose pattern cache lookup costs
    more than the test: all its pattern asks is an ASCII letter first, which is what
    ``bytes.isalpha()`` answers for one byte.
    """
    tags: dict[bytes, bytes] = {}
    specs = value.strip().split(b";")
    if not specs[-1]:  # trailing semicolons are valid
        specs.pop()
    for spec in specs:
        name, equals, tag_value = spec.partition(b"=")
        name = name.strip()
        if not equals or not name[:1].isalpha():
            raise InvalidTagSpec(spec)
        if name in tags:
            raise DuplicateTag(name)
        tags[name] = tag_value.strip()
    return tags


# Each DKIM-Signature is read three times: at its header callback (DkimCheck.field_questions, for the
# key to ask ahead), at the end of the header (body_hashes_needed) and when verified. The tag list
# is parsed once and shared read-only; a value longer than any real one is parsed each time.
SIGNATURE_MEMO_SIZE = 256
SIGNATURE_MEMO_LENGTH = 4096


def _signature_tags(value: bytes) -> Mapping[bytes, bytes]:
    """:func:`_tag_list` of a DKIM-Signature value, parsed once; raises what it raises."""
    # _tag_list strips the value first, so a value read with or without its final CRLF (the
    # header callback's, the message's) gives the same tags, or the same exception.
    return _read_signature_tags(value.strip())


@remembered_when_small(SIGNATURE_MEMO_SIZE, SIGNATURE_MEMO_LENGTH, octets)
def _read_signature_tags(value: bytes) -> Mapping[bytes, bytes]:
    return MappingProxyType(_tag_list(value))  # shared by every caller: read-only


def _parse_signature(value: bytes) -> Mapping[bytes, bytes]:
    """RFC 6376 §3.2 tag list of one DKIM-Signature; raises _Stop(permerror) when unreadable."""
    try:
        tags = _signature_tags(value)
    except InvalidTagValueList as e:
        raise _Stop(AuthResult.PERMERROR, f"signature not parseable: {e!r}") from e
    return tags


def _check_signature(tags: Mapping[bytes, bytes], now: float) -> tuple[bytes, ...]:
    """RFC 6376 §6.1.1 and RFC 8301 §3.1; returns the signed field names, raises _Stop."""
    missing = [tag.decode() for tag in _REQUIRED_TAGS if tag not in tags]
    if missing:
        raise _Stop(AuthResult.PERMERROR, f"signature missing required tag {', '.join(missing)}=")
    if b"i" in tags and b"@" not in tags[b"i"]:
        raise _Stop(AuthResult.PERMERROR, "i= is not an identity (no @)")  # RFC 6376 §3.5 i=
    problem = _field_problem(tags)
    if problem:
        raise _Stop(AuthResult.PERMERROR, problem)
    if tags[b"a"] == b"rsa-sha1":
        # RFC 8301 §3.1: verifiers MUST NOT consider rsa-sha1 signatures valid.
        raise _Stop(AuthResult.FAIL, "rsa-sha1 not accepted (RFC 8301)")
    signed = _signed_header_names(tags)
    if b"from" not in signed:
        # RFC 6376 §5.4 (From MUST be signed) and §6.1.1: PERMFAIL (From field not signed).
        raise _Stop(AuthResult.PERMERROR, "From field not signed")
    _check_times(tags, now)
    return signed


# dkimpy's patterns in validate_signature_fields, compiled once.
_BASE64_VALUE = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")
_DOMAIN_SPECIAL = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_LENGTH = re.compile(rb"\d{,76}$")


def _field_problem(tags: Mapping[bytes, bytes]) -> str:
    """What ``dkim.validate_signature_fields`` says of a signature's v=, a=, b=, bh=, cv=, d=, i=,
    l=, q= (RFC 6376 §3.5), in its order and words; "" when it says nothing.

    Its checks without the module-level regex calls it makes on every message; t= and x= are ours
    (:func:`_check_times`: they read the clock). The required tags are present (checked before).
    """
    if tags[b"a"] not in dkim.HASH_ALGORITHMS:
        return f"unknown signature algorithm: {tags[b'a']!s}"
    b_value, body_hash = tags[b"b"], tags[b"bh"]
    if _BASE64_VALUE.match(b_value) is None or len(b"".join(b_value.split())) % 4:
        return f"b= value is not valid base64 ({b_value!s})"
    # dkimpy tests bh= against the b= pattern again (passed above): only the length is left.
    if len(b"".join(body_hash.split())) % 4:
        return f"bh= value is not valid base64 ({body_hash!s})"
    if b"cv" in tags and tags[b"cv"] not in (dkim.CV_Pass, dkim.CV_Fail, dkim.CV_None):
        return f"cv= value is not valid ({tags[b'cv']!s})"
    domain = tags[b"d"]
    if domain.isascii() and _DOMAIN_SPECIAL.search(domain):  # dkimpy skips non-ASCII domains
        return f"d= value is not valid ({domain!s})"
    identity = tags.get(b"i")
    # As dkimpy, the octet before d= in i= is read without a length check: an IndexError here is
    # one there too (and this signature's permerror in _verify_one).
    if identity is not None and (
        not identity.lower().endswith(domain.lower()) or identity[-len(domain) - 1] not in b"@."
    ):
        return f"i= domain is not a subdomain of d= (i={identity!s} d={domain!s})"
    if b"l" in tags and _LENGTH.match(tags[b"l"]) is None:
        return f"l= value is not a decimal integer ({tags[b'l']!s})"
    if b"q" in tags and tags[b"q"] != b"dns/txt":
        return f"q= value is not dns/txt ({tags[b'q']!s})"
    if tags[b"v"] != b"1":
        return f"v= value is not 1 ({tags[b'v']!s})"
    return ""


# The split dkimpy uses for h= (verify_headerprep), and our t=/x= syntax; compiled once.
_H_SEPARATOR = re.compile(rb"\s*:\s*")
_TIMESTAMP = re.compile(rb"\d{1,12}")


def _signed_header_names(tags: Mapping[bytes, bytes]) -> tuple[bytes, ...]:
    # A signer's h= is the same from one message to the next: its reading is kept, a tuple.
    return _split_signed_header_names(tags[b"h"])


@remembered_when_small(SIGNATURE_MEMO_SIZE, SIGNATURE_MEMO_LENGTH, octets)
def _split_signed_header_names(signed: bytes) -> tuple[bytes, ...]:
    # The split dkimpy itself uses for h= (verify_headerprep), so both agree on what is signed.
    return tuple(name.lower() for name in _H_SEPARATOR.split(signed.strip()))


def _timestamp(tags: Mapping[bytes, bytes], tag: bytes) -> int | None:
    value = tags.get(tag)
    if value is None:
        return None
    if not _TIMESTAMP.fullmatch(value):
        raise _Stop(AuthResult.PERMERROR, f"{tag.decode()}= is not a timestamp")
    return int(value)


def _check_times(tags: Mapping[bytes, bytes], now: float) -> None:
    signed_at = _timestamp(tags, b"t")
    expires_at = _timestamp(tags, b"x")
    if signed_at is not None and expires_at is not None and expires_at <= signed_at:
        # RFC 6376 §3.5 x=: "MUST be greater than the value of the t= tag if both are present".
        raise _Stop(AuthResult.PERMERROR, "x= not after t=")
    if signed_at is not None and signed_at > now + FUTURE_TIMESTAMP_SKEW:
        # RFC 6376 §3.5 t=: verifiers MAY ignore signatures with a timestamp in the future; an
        # ignored signature is PERMFAIL (§6.1), and it is not a verification failure: permerror.
        raise _Stop(AuthResult.PERMERROR, "signature timestamp in the future")
    if expires_at is not None and expires_at < now - EXPIRY_CLOCK_SKEW:
        # RFC 6376 §3.5 x=: past it "the signature MUST be considered invalid" (§6.1.1 PERMFAIL).
        raise _Stop(AuthResult.FAIL, "signature expired")


@dataclass(frozen=True)
class KeyProblem:
    """Why no usable key was found (RFC 6376 §6.1.2): the result word it gives, and why."""

    result: AuthResult
    reason: str


def lookup_public_key(
    domain: bytes, selector: bytes, algorithm: bytes, resolver: Resolver, settings: DkimSettings
) -> PublicKey | KeyProblem:
    """The key at ``selector._domainkey.domain`` for a DKIM-style signature (ARC's too, RFC 8617 §4.1).

    Args:
        domain, selector, algorithm: the signature's d=, s= and a=.
        resolver: where the key record comes from (answers cached as for DKIM signatures).
        settings: ``min_rsa_bits``.

    Returns:
        The usable key, or the problem (``temperror`` for a DNS failure, ``fail`` for a revoked
        or short key, ``permerror`` otherwise).
    """
    try:
        return _fetch_key({b"d": domain, b"s": selector, b"a": algorithm}, resolver, settings)
    except _Stop as stop:
        return KeyProblem(stop.result, stop.reason)


def parsed_header_fields(message: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields as dkimpy's ``rfc822_parse`` reads them (name, raw value with CRLFs).

    Raises:
        dkim.MessageFormatError: a header block dkimpy refuses.
    """
    return [(name, value) for name, value in _parsed(message)[0]]


def _fetch_key(tags: Mapping[bytes, bytes], resolver: Resolver, settings: DkimSettings) -> PublicKey:
    """RFC 6376 §6.1.2: look up ``s._domainkey.d`` and pick a usable key record; raises _Stop.

    The outcome depends only on the key records and the tags read below, so it is kept as long as
    the records are cached: parsing the key (ASN.1, base64) costs more than the RSA verification.
    The key record's name is made from s= and d= only when it is looked up.
    """
    key = ("dkim-key", tags[b"s"], tags[b"d"], tags[b"a"], tags.get(b"i"), settings.min_rsa_bits)
    outcome = resolver.derived(key, lambda: _key_or_stop(tags, resolver, settings), keep=_not_temporary)
    if isinstance(outcome, _Stop):
        raise _Stop(outcome.result, outcome.reason)  # a fresh one: raising grows a traceback
    return outcome


def _not_temporary(found: PublicKey | _Stop) -> bool:
    return not (isinstance(found, _Stop) and found.result is AuthResult.TEMPERROR)


def _key_or_stop(
    tags: Mapping[bytes, bytes], resolver: Resolver, settings: DkimSettings
) -> PublicKey | _Stop:
    name = f"{_text(tags[b's'])}._domainkey.{_text(tags[b'd'])}."
    try:
        return _lookup_key(name, tags, resolver, settings)
    except _Stop as stop:
        return _Stop(stop.result, stop.reason)  # kept without the traceback and its frames


def _lookup_key(
    name: str, tags: Mapping[bytes, bytes], resolver: Resolver, settings: DkimSettings
) -> PublicKey:
    answer = resolver.txt(name)
    if answer.status is DnsStatus.TEMPFAIL:
        # §6.1.2 step 2: TEMPFAIL (key unavailable).
        raise _Stop(AuthResult.TEMPERROR, f"key unavailable: {answer.reason or 'DNS error'}")
    texts = answer.texts  # joined and decoded at each reading
    if not texts:
        # §6.1.2 step 3: PERMFAIL (no key for signature); NXDOMAIN and NODATA alike.
        raise _Stop(AuthResult.PERMERROR, "no key record")
    # §6.1.2 step 4: with several records a verifier may cycle through them; the first usable wins,
    # otherwise the first record's problem is the answer.
    first_problem: _Stop | None = None
    for record in texts:
        try:
            return _load_key(name, record, tags, settings)
        except _Stop as problem:
            first_problem = first_problem or problem
    assert first_problem is not None
    raise first_problem


def _load_key(name: str, record: str, tags: Mapping[bytes, bytes], settings: DkimSettings) -> PublicKey:
    """RFC 6376 §3.6.1 and §6.1.2 steps 5-8 for one key record; raises _Stop."""
    try:
        key_tags = _tag_list(record.encode("utf-8"))
    except InvalidTagValueList as e:
        raise _Stop(AuthResult.PERMERROR, f"key syntax error: {e!r}") from e
    _check_key_tags(key_tags, tags)
    openssl_read = _openssl_rsa_key(key_tags[b"p"]) if key_tags.get(b"k", b"rsa") == b"rsa" else None
    if openssl_read is not None:
        pk, bits, ktag = *openssl_read, b"rsa"
    else:
        # s= is checked above; dkimpy's own s= test knows no lists (s=email:tlsrpt) and, on one,
        # leaves the key unset instead of failing, so it never sees the tag.
        without_services = b"; ".join(k + b"=" + v for k, v in key_tags.items() if k != b"s")
        try:
            pk, bits, ktag, _tlsrpt = dkim.evaluate_pk(name, without_services)
        except (dkim.DKIMException, binascii.Error, ValueError, TypeError) as e:
            # §6.1.2 step 5: PERMFAIL (key syntax error), e.g. bad base64 or not an RSA key.
            raise _Stop(AuthResult.PERMERROR, f"key syntax error: {e}") from e
    if ktag == b"rsa" and bits < settings.min_rsa_bits:
        # RFC 8301 §3.2: signatures with RSA keys under 1024 bits MUST NOT be considered valid.
        raise _Stop(AuthResult.FAIL, f"key too small: {bits} bits")
    # §3.6.1 t=y: the domain is testing DKIM; the result stands, the flag is only reported.
    return PublicKey(pk=pk, bits=bits, ktag=ktag, testing=b"y" in _colon_list(key_tags.get(b"t")))


# Parsing a p= (base64, DER through OpenSSL, the check that writes it back) costs more than the rest
# of a key record's checks. The same key is published under many names (each selector and domain
# a signer uses, a provider's key CNAMEd or copied into its customers' zones), so each p= value is
# read once; the result is shared read-only. A value longer than any key in use (an RSA-8192 p= is
# about 1,420 octets) is read each time.
KEY_MEMO_SIZE = 256
KEY_MEMO_LENGTH = 1500


@remembered_when_small(KEY_MEMO_SIZE, KEY_MEMO_LENGTH, octets)
def _openssl_rsa_key(p_value: bytes) -> tuple[Mapping[str, int], int] | None:
    """dkimpy's reading of an RSA p= (``evaluate_pk``: its key dict and bit size), through OpenSSL.

    dkimpy reads the DER (RFC 6376 §3.6.1: SubjectPublicKeyInfo, or a bare PKCS#1 RSAPublicKey)
    with its own ASN.1 parser in Python, several times slower. Only DER that ``cryptography``
    writes back byte for byte is taken here: the strict encoding of an RSA key, which both read
    as the same two integers. Anything else, lenient BER or not an RSA key, gives None and is
    left to dkimpy, so what is accepted or refused, and why, does not change.
    """
    try:
        der = base64.b64decode(p_value)
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):  # binascii.Error is a ValueError
        return None
    if not isinstance(key, rsa.RSAPublicKey):
        return None
    encodings = (serialization.PublicFormat.SubjectPublicKeyInfo, serialization.PublicFormat.PKCS1)
    if all(der != key.public_bytes(serialization.Encoding.DER, encoding) for encoding in encodings):
        return None
    numbers = key.public_numbers()
    key_integers = MappingProxyType({"modulus": numbers.n, "publicExponent": numbers.e})
    return key_integers, numbers.n.bit_length()


def _check_key_tags(key_tags: Mapping[bytes, bytes], tags: Mapping[bytes, bytes]) -> None:
    if key_tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise _Stop(AuthResult.PERMERROR, "key syntax error: v= is not DKIM1")  # §6.1.2 step 5
    key_type, _, hash_name = tags[b"a"].partition(b"-")
    accepted_hashes = _colon_list(key_tags.get(b"h"))
    if accepted_hashes and hash_name not in accepted_hashes:
        raise _Stop(AuthResult.PERMERROR, "inappropriate hash algorithm")  # §6.1.2 step 6
    if b"p" not in key_tags:
        raise _Stop(AuthResult.PERMERROR, "key syntax error: no p=")
    if not key_tags[b"p"].split():  # only whitespace (split() takes the bytes regex \s)
        # §6.1.2 step 7: an empty p= is a revoked key, which the verifier "MUST treat as a failed
        # signature check": the signature is a fail, not an error in the message.
        raise _Stop(AuthResult.FAIL, "key revoked")
    key_kind = key_tags.get(b"k", b"rsa")
    if key_kind not in _KEY_TYPES:
        raise _Stop(AuthResult.PERMERROR, f"key syntax error: unknown k={_text(key_kind)}")
    if key_kind != key_type:
        raise _Stop(AuthResult.PERMERROR, "inappropriate key algorithm")  # §6.1.2 step 8
    services = _colon_list(key_tags.get(b"s"))
    if services and not services & {b"*", b"email"}:
        # §3.6.1 s=: a key for other services only must not verify mail.
        raise _Stop(AuthResult.PERMERROR, "key not for email")
    if b"s" in _colon_list(key_tags.get(b"t")) and b"i" in tags:
        # §3.6.1 t=s: the i= domain MUST equal d= exactly (no subdomains).
        identity_domain = tags[b"i"].rpartition(b"@")[2]
        if identity_domain.lower() != tags[b"d"].lower():
            raise _Stop(AuthResult.PERMERROR, "domain mismatch: key has t=s and i= is a subdomain")


def _colon_list(value: bytes | None) -> set[bytes]:
    if value is None:
        return set()
    return {item.strip().lower() for item in value.split(b":") if item.strip()}


def _body_hash_spec(tags: Mapping[bytes, bytes]) -> BodyHashSpec:
    """The body hash a signature's c=, l= and a= ask for; raises what dkimpy raises for bad ones."""
    # Asked at the end of the header and again when verifying, with the same few values from one
    # signer to the next.
    return _spec_of(tags.get(b"c", b"simple/simple"), tags.get(b"l"), tags[b"a"])


# Valid c= (15 octets at most), l= (76 digits, RFC 6376 §3.5) and a= values fit; a few signers' worth.
BODY_HASH_MEMO_LENGTH = 128


@remembered_when_small(64, BODY_HASH_MEMO_LENGTH, octets)  # BodyHashSpec is frozen: shared safely
def _spec_of(c_value: bytes, length: bytes | None, algorithm: bytes) -> BodyHashSpec:
    policy = CanonicalizationPolicy.from_c_value(c_value)
    octets = None if length is None else int(length)
    # a= is rsa-sha1, rsa-sha256 or ed25519-sha256 (validate_signature_fields): the hash follows "-".
    return BodyHashSpec(policy.body_algorithm.name.decode(), octets, algorithm.rpartition(b"-")[2].decode())


def body_hashes_needed(signatures: Iterable[bytes], settings: DkimSettings) -> frozenset[BodyHashSpec]:
    """The body hashes that verifying these DKIM-Signature fields will compare (RFC 6376 §3.7).

    Args:
        signatures: the DKIM-Signature field values, top first, as known at the end of the header.
        settings: ``enabled`` and ``max_signatures`` (later ones are not checked).

    Returns:
        One spec per distinct c= body canonicalization, l= and hash among the signatures that will
        be checked; a signature that cannot be read needs none (it fails before its body hash).
    """
    if not settings.enabled:
        return frozenset()
    needed: set[BodyHashSpec] = set()
    for index, value in enumerate(signatures):
        if index >= settings.max_signatures:
            break
        try:
            tags = _signature_tags(value)
            if tags.get(b"a") in dkim.HASH_ALGORITHMS:
                needed.add(_body_hash_spec(tags))
        except (InvalidTagValueList, InvalidCanonicalizationPolicyError, ValueError):
            continue
    return frozenset(needed)


def _check_body_hash(tags: Mapping[bytes, bytes], body: BodyDigests) -> BodyHashSpec:
    """RFC 6376 §6.1.3 step 3: the body hash must be bh=; returns what was hashed, raises _Stop."""
    try:
        spec = _body_hash_spec(tags)
    except InvalidCanonicalizationPolicyError as e:
        raise _Stop(AuthResult.PERMERROR, f"invalid c= value: {e.args[0]}") from e
    digest = body.digests.get(spec)
    if digest is None:  # body_hashes_needed asked for every signature that gets here
        raise _Stop(AuthResult.TEMPERROR, "internal error: body hash not computed")
    # dkimpy's decoding of bh= (verify_sig_process: whitespace, the bytes regex \s, removed first),
    # so both agree on what a bh= says.
    if digest != base64.b64decode(b"".join(tags[b"bh"].split())):
        raise _Stop(AuthResult.FAIL, "body hash did not verify")
    return spec


def _compute(
    fields: Sequence[Sequence[bytes]],
    header: tuple[bytes, bytes],
    tags: Mapping[bytes, bytes],
    signed: Sequence[bytes],
    key: PublicKey,
    body: BodyDigests,
) -> str:
    """RFC 6376 §6.1.3; returns the reason to note on a pass, raises _Stop otherwise."""
    spec = _check_body_hash(tags, body)
    try:
        valid = verify_header_signature(tags, signed, header, fields, key)
    except dkim.KeyFormatError as e:
        raise _Stop(AuthResult.PERMERROR, f"inappropriate key: {e}") from e
    if not valid:
        raise _Stop(AuthResult.FAIL, "signature did not verify")
    return _body_length_note(spec, body)


def verify_header_signature(
    tags: Mapping[bytes, bytes],
    signed: Sequence[bytes],
    header: tuple[bytes, bytes],
    fields: Sequence[Sequence[bytes]],
    key: PublicKey,
) -> bool:
    """RFC 6376 §6.1.3 steps 4-5: the header hash (§3.7) and the signature over it.

    What dkimpy's ``verify_sig_process`` does after the body hash, for a signature whose tags were
    validated (a= known, c= valid): the same bytes hashed (tests compare them with its
    ``hash_headers``), the same RSA verification (:func:`authmilter.dkim_rsa.rsa_verify`), the
    same Ed25519 one (PyNaCl); without a ``dkim.DKIM`` object, and canonicalizing only the fields
    that are signed rather than every field of the message.

    Args:
        tags: the signature's tags (a=, b=, c= are read).
        signed: the field names of h=, lowercase, in order.
        header: the signature field itself (name, raw value).
        fields: the message's header fields (name, raw value), top first.
        key: the signer's public key.

    Returns:
        True when the signature verifies.

    Raises:
        dkim.KeyFormatError: the RSA key is too short for the digest (as dkimpy).
    """
    relaxed = tags.get(b"c", b"simple/simple").split(b"/")[0] == b"relaxed"
    hasher = HASH_ALGORITHMS[tags[b"a"].rpartition(b"-")[2].decode()]()  # a= was validated
    hasher.update(signed_header_data(fields, signed, header, relaxed))
    # b64decode drops the whitespace (and other non-alphabet octets) itself; split() is the
    # bytes regex \s dkimpy removes first, kept so that both read the same octets.
    signature = base64.b64decode(b"".join(tags[b"b"].split()))
    if key.ktag == b"ed25519":
        try:
            key.pk.verify(hasher.digest(), signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True
    try:
        return rsa_verify(hasher, signature, key.pk)
    except (TypeError, dkim.crypto.DigestTooLargeError) as e:
        raise dkim.KeyFormatError(f"digest too large for modulus: {e}") from e


def signed_header_data(
    fields: Sequence[Sequence[bytes]], signed: Sequence[bytes], header: tuple[bytes, bytes], relaxed: bool
) -> bytes:
    """The octets RFC 6376 §3.7 hashes for the header: what dkimpy's ``hash_headers`` feeds its hash.

    Args:
        fields: the message's header fields (name, raw value), top first.
        signed: the field names of h=, lowercase, in order.
        header: the signature field (name, raw value).
        relaxed: relaxed header canonicalization (§3.4.2), else simple (§3.4.1).

    Returns:
        The canonical signed fields, then the signature field with b= emptied and no final CRLF.
    """
    # §5.4.2: for a name signed n times, the n last fields of that name, bottom up. dkimpy signs
    # a signed From once more than h= says (its bug#644046): a second From makes it fail.
    names = [*signed, b"from"] if b"from" in signed else signed
    remaining: dict[bytes, list[Sequence[bytes]]] = {name: [] for name in names}
    for field in fields:
        same_name = remaining.get(field[0].lower())
        if same_name is not None:
            same_name.append(field)
    picked = [remaining[name].pop() for name in names if remaining[name]]
    canonical = _relaxed_field if relaxed else _simple_field
    parts = [canonical(name, value) for name, value in picked]
    # The signature field is hashed without its final CRLF, whichever the canonicalization.
    parts.append(canonical(header[0], B_TAG.sub(_B_TAG_KEPT, header[1])).rstrip())
    return b"".join(parts)


# What B_TAG.sub keeps of a match: group 1, as the template rb"\1" would, without the template's
# per-match expansion in Python (re's expand_template) that costs twice the substitution.
_B_TAG_KEPT = operator.itemgetter(1)


def _simple_field(name: bytes, value: bytes) -> bytes:
    return name + b":" + value  # RFC 6376 §3.4.1: as it is


def _relaxed_field(name: bytes, value: bytes) -> bytes:
    # RFC 6376 §3.4.2, as dkimpy's Relaxed.canonicalize_headers (strip() takes all ASCII whitespace).
    return name.lower().rstrip() + b":" + compress_whitespace(unfold_header_value(value)).strip() + b"\r\n"


def _body_length_note(spec: BodyHashSpec, body: BodyDigests) -> str:
    """RFC 6376 §8.2: with l= only part of the body is signed; say so, it matters to a reader."""
    if spec.length is None:
        return ""
    signed_length = spec.length
    body_length = body.lengths[spec.canonicalization]
    if signed_length > body_length:
        # §3.5 l=: the value "MUST NOT be larger than the actual number of octets" of the body.
        raise _Stop(AuthResult.FAIL, f"l={signed_length} is longer than the body ({body_length})")
    if signed_length == body_length:
        return f"l={signed_length}, whole body signed"
    return f"l={signed_length}, {body_length - signed_length} body octets unsigned"


def _verify_one(
    fields: Sequence[Sequence[bytes]],
    header: tuple[bytes, bytes],
    body: BodyDigests,
    resolver: Resolver,
    settings: DkimSettings,
    now: float,
) -> DkimResult:
    tags: Mapping[bytes, bytes] | None = None
    testing = False
    try:
        tags = _parse_signature(header[1])
        signed = _check_signature(tags, now)
        key = _fetch_key(tags, resolver, settings)
        testing = key.testing
        note = _compute(fields, header, tags, signed, key, body)
    except _Stop as stop:
        # Only a signature that does not parse strictly needs its lenient reading, to be named.
        return _result(stop.result, _lenient_tags(header[1]) if tags is None else tags, stop.reason, testing)
    except Exception as e:
        # dkimpy on hostile input can raise nearly anything; it is this signature's problem only.
        tags = _lenient_tags(header[1]) if tags is None else tags
        logger.warning("DKIM signature d=%r s=%r: unexpected %r", tags.get(b"d"), tags.get(b"s"), e)
        return _result(AuthResult.PERMERROR, tags, f"verification error: {type(e).__name__}", testing)
    return _result(AuthResult.PASS, tags, note, testing)


_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _signature_headers_of_unparseable(message: bytes) -> list[bytes]:
    """DKIM-Signature values of a header section dkimpy refuses, read line by line."""
    values: list[bytes] = []
    in_signature = False
    # Only the header section: the body may be tens of megabytes.
    end = _HEADER_END.search(message)
    for line in re.split(rb"\r?\n", message[: end.start()] if end else message):
        if line[:1] in (b" ", b"\t"):
            if in_signature:
                values[-1] += line + b"\r\n"
            continue
        name, colon, value = line.partition(b":")
        in_signature = bool(colon) and name.strip().lower() == b"dkim-signature"
        if in_signature:
            values.append(value + b"\r\n")
    return values


# One header field as dkimpy's rfc822_parse reads it, when every line ends in CRLF: at the start of
# a line, the name up to the first colon, then the rest of the line and each continuation line
# (RFC 5322 §2.2.3), CRLF kept. Anchored and possessive so hostile input costs linear time.
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]++):([^\n]*\r\n(?:[ \t][^\n]*\r\n)*)", re.MULTILINE)


def _split_crlf(message: bytes) -> tuple[list[list[bytes]], bytes] | None:
    """What ``dkim.rfc822_parse`` returns, for a message with CRLF line ends only; else None.

    rfc822_parse splits the whole message into lines with a regex, matches each header line with
    another and joins the body lines again; this gets the same from three C-level passes.
    """
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return None
    head_length = end + 2
    fields = _FIELD.findall(message, 0, head_length)
    # The fields are found left to right without overlap, so they cover the header block only when
    # every line in it is a field or a continuation ending in CRLF: then rfc822_parse splits it
    # the same way, with no "From " line to skip and nothing to refuse.
    if sum(len(name) + 1 + len(value) for name, value in fields) != head_length:
        return None
    body_start = end + 4
    # rfc822_parse splits the body on CRLF or bare LF and joins it with CRLF: without a bare LF
    # that gives back the bytes as they are.
    if message.count(b"\n", body_start) != message.count(b"\r\n", body_start):
        return None
    return [[name, value] for name, value in fields], message[body_start:]


def _parsed(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """The header fields and body as dkimpy's ``rfc822_parse`` reads them; raises what it raises."""
    split = _split_crlf(message)
    if split is not None:
        return split
    return dkim.rfc822_parse(message) if message else ([], b"")


def verify_dkim(
    message: bytes,
    resolver: Resolver,
    settings: DkimSettings,
    now: float | None = None,
    body: BodyDigests | None = None,
) -> tuple[DkimResult, ...]:
    """Verify every DKIM-Signature of a message (RFC 6376 §6), in header order.

    Args:
        message: the whole message as received, headers, blank line, body; CRLF or bare LF. With
            ``body`` given, the header block and blank line are enough (a body is ignored).
        resolver: where key records come from (RFC 6376 §3.6.2).
        settings: limits and the minimum RSA key size.
        now: the verification time in Unix seconds for ``t=``/``x=`` (default: the clock).
        body: the body hashes computed as the body streamed in, for :func:`body_hashes_needed`
            of the message's signatures; None: computed here from the body in ``message``.

    Returns:
        One result per DKIM-Signature header field, top first; empty without any (the caller
        writes ``dkim=none``, RFC 8601 §2.7.1) or when verification is disabled.
    """
    if not settings.enabled:
        return ()
    verify_time = time.time() if now is None else now
    deadline = time.monotonic() + settings.timeout
    try:
        fields, raw_body = _parsed(message)
    except Exception as e:
        reason = f"message header not parseable: {e}"
        return tuple(
            _result(AuthResult.PERMERROR, _lenient_tags(value), reason)
            for value in _signature_headers_of_unparseable(message)
        )
    signatures = [(name, value) for name, value in fields if name.lower() == b"dkim-signature"]
    if body is None:
        needed = body_hashes_needed((value for _, value in signatures), settings)
        body = digest_body(needed, raw_body)
    results = []
    for index, header in enumerate(signatures):
        if index >= settings.max_signatures:
            reason = f"not checked: more than {settings.max_signatures} signatures"
            results.append(_result(AuthResult.POLICY, _lenient_tags(header[1]), reason))
        elif time.monotonic() > deadline:
            reason = f"not checked: DKIM time limit of {settings.timeout:g}s reached"
            results.append(_result(AuthResult.TEMPERROR, _lenient_tags(header[1]), reason))
        else:
            results.append(_verify_one(fields, header, body, resolver, settings, verify_time))
    for result in results:
        logger.debug("dkim=%s d=%s s=%s (%s)", result.result, result.domain, result.selector, result.reason)
    return tuple(results)


# ---------------------------------------------------------------------------------------------
# The check as the pipeline runs it (checks.py)


class DkimCheck(Check[DkimSettings, tuple[DkimResult, ...]]):
    """DKIM verification of every signature (RFC 6376 §6)."""

    name = "dkim"
    label = "DKIM"
    prefetch_fields = frozenset({"dkim-signature"})

    def enabled(self, settings: DkimSettings) -> bool:
        return settings.enabled

    def field_questions(self, field: HeaderField, settings: DkimSettings) -> list[Question]:
        # RFC 6376 §3.6.2.1: each signature's key is the TXT set at s=._domainkey.d=; signatures
        # past max_signatures are not verified, so their keys are not asked.
        if field.index > settings.max_signatures:
            return []
        value = field.value.encode("latin-1")
        try:
            # Where the strict reading succeeds it names the same s= and d= as the lenient one,
            # and verification will want it again.
            tags = _signature_tags(value)
        except InvalidTagValueList:
            tags = _lenient_tags(value)
        selector, domain = _text(tags.get(b"s", b"")), _text(tags.get(b"d", b""))
        return [(f"{selector}._domainkey.{domain}", dns.rdatatype.TXT)] if selector and domain else []

    def evaluate(
        self, transaction: Transaction, earlier: Outcomes, resolver: Resolver, settings: DkimSettings
    ) -> tuple[DkimResult, ...]:
        return verify_dkim(transaction.message.raw, resolver, settings, body=transaction.body)

    def failed(self, transaction: Transaction, settings: DkimSettings, reason: str) -> tuple[DkimResult, ...]:
        return (DkimResult(AuthResult.TEMPERROR, "", "", "", reason=reason),)

    def method_results(self, outcome: tuple[DkimResult, ...], decided: Decided) -> tuple[MethodResult, ...]:
        if not outcome:
            return _NOT_SIGNED  # RFC 8601 §2.7.1: none, the message was not signed
        return tuple(_method_result(signature) for signature in outcome)


_NOT_SIGNED = (MethodResult("dkim", AuthResult.NONE),)


def _method_result(signature: DkimResult) -> MethodResult:
    # RFC 8601 §2.7.1 (header.d, header.i), header.s/header.a as registered by RFC 8601 §6, and
    # RFC 6008 header.b last: authres only reads a quoted value when a ";" or the end follows.
    notes = (signature.reason, "test mode" if signature.testing else "")
    properties = (
        ("header", "d", signature.domain),
        ("header", "i", signature.identity),
        ("header", "s", signature.selector),
        ("header", "a", signature.algorithm),
        ("header", "b", signature.header_b),
    )
    return MethodResult("dkim", signature.result, properties, ", ".join(note for note in notes if note))

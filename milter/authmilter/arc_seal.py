"""ARC sealing (RFC 8617 §5.1): our hop's ARC Set, after our checks.

Interface: :func:`seal_message` takes the header block, the chain validation status, the
Authentication-Results payload to record, the key and the time, and returns the three field values
(ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) or why nothing was sealed. It is pure:
the key comes loaded (keys.py), the body as its digest (dkim_body.py, :data:`SEAL_BODY_HASH`,
computed as the body streamed in). :func:`own_results` and :func:`recorded_status` give the payload
and status for mail sealed on its way out (``seal_mail = "outbound"``): the A-R we wrote when the
message came in, and the ``arc=`` it records.

Format: the tags of each field in alphabetical order, ``; `` between them, values lower-case but
for b= and bh= (the ValiMail suite's normalised form, so its signing cases are reproduced byte
for byte), folded between tags only, where relaxed canonicalization (the only one ARC uses for
headers, §4.1.3) makes folding invisible to every signature.

Sealing follows §5.1:

1. a chain whose newest ARC-Seal already says cv=fail is not sealed again (step 1);
2. the instance is the newest one plus one; past 50 (§4.2.1) nothing is sealed;
3. the AAR is ``i=N;`` and the A-R payload, the AMS a DKIM-style signature over the header fields
   dkim_sign.py signs by default and the body, the ARC-Seal signs every ARC Set by increasing
   instance (§5.1.1) with cv= as validated: for a failed chain, cv=fail and only our own set is
   signed, "as if this newest ARC Set was the only set present" (§5.1.2).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.crypto
from dkim.canonicalization import CanonicalizationPolicy

from authmilter.arc_check import (
    ALGORITHM,
    AUTHENTICATION_RESULTS,
    MAX_INSTANCES,
    MESSAGE_SIGNATURE,
    SEAL,
    chain_fields,
    newest_instance,
    seal_names,
    seal_order,
)
from authmilter.authresults import HEADER_NAME as AUTHENTICATION_RESULTS_HEADER
from authmilter.authresults import parse_authentication_results
from authmilter.dkim_body import BodyDigests, BodyHashSpec, digest_body
from authmilter.dkim_sign import SigningSettings, rsa_private_key, signed_header_names
from authmilter.dkim_verify import parsed_header_fields
from authmilter.keys import PrivateKey
from authmilter.message import MessageHeaders, ParsedMessage, unfold
from authmilter.model import AuthResult

log = logging.getLogger(__name__)

# The AMS body hash: relaxed body canonicalization over the whole body, SHA-256 (§4.1.2).
SEAL_BODY_HASH = BodyHashSpec("relaxed", None, "sha256")
_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
# The fields of our ARC Set in SealOutcome.fields order, top first.
ARC_SET_FIELDS = (SEAL, MESSAGE_SIGNATURE, AUTHENTICATION_RESULTS)
# Chain validation status words (§4.1.3 cv=).
_CV = {AuthResult.NONE: b"none", AuthResult.PASS: b"pass", AuthResult.FAIL: b"fail"}


@dataclass(frozen=True)
class SealOutcome:
    """What sealing one message gave.

    Attributes:
        fields: ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results values (without
            the names, folded LF + SP), to be put on top in that order; () when not sealed.
        reason: for the log: ``sealed i=2 cv=pass d=... s=...``, or why nothing was sealed.
    """

    fields: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Sealer:
    """Who seals: d=, s= and the RSA key (``[arc] signing_domain``, ``selector``, ``key_file``)."""

    domain: str
    selector: str
    key: PrivateKey


def seal_message(
    message: ParsedMessage,
    status: AuthResult,
    results: str,
    sealer: Sealer,
    now: float,
    body: BodyDigests | None = None,
    signed_headers: tuple[bytes, ...] | None = None,
) -> SealOutcome:
    """Our ARC Set for a message (RFC 8617 §5.1).

    Args:
        message: the message as it will leave (the header block is enough with ``body``).
        status: the chain validation status to record (cv=): none, pass or fail.
        results: the Authentication-Results payload (``authserv-id; resinfo; ...``) for the AAR.
        sealer: d=, s= and key.
        now: the time (t=), Unix seconds.
        body: the body digests with :data:`SEAL_BODY_HASH`; None: computed from ``message``.
        signed_headers: the AMS h= names; None: dkim_sign.py's defaults, as present.

    Returns:
        The fields, or the reason nothing was sealed (never raises for the message's content).
    """
    if status not in _CV:
        return SealOutcome((), f"not sealed: no chain validation status ({status.value})")
    newest, newest_cv = newest_instance(message.headers)
    if status is AuthResult.FAIL and newest_cv == b"fail":
        return SealOutcome((), "not sealed: the chain is already marked cv=fail (RFC 8617 §5.1)")
    instance = newest + 1
    if instance > MAX_INSTANCES:
        return SealOutcome((), f"not sealed: the chain has {newest} ARC sets (at most {MAX_INSTANCES})")
    if status is AuthResult.NONE and newest:
        return SealOutcome((), "not sealed: the message has ARC fields but no chain status")
    try:
        fields = parsed_header_fields(message.raw)
    except dkim.MessageFormatError as e:
        return SealOutcome((), f"not sealed: header block not parseable: {e}")
    cv = _CV[status]
    previous: list[tuple[bytes, bytes]] = []
    if status is AuthResult.PASS:
        try:
            previous = chain_fields(fields)
        except ValueError as e:
            return SealOutcome((), f"not sealed: the chain said to pass is broken: {e}")
    include = signed_headers or signed_header_names([name for name, _ in fields], SigningSettings())
    if b"from" not in include:
        return SealOutcome((), "not sealed: no From field (RFC 6376 §5.4 via RFC 8617 §4.1.2)")
    if body is None:
        body = digest_body([SEAL_BODY_HASH], message.body)
    made = _seal(fields, previous, instance, cv, results, include, sealer, int(now), body)
    reason = f"sealed i={instance} cv={cv.decode()} d={sealer.domain} s={sealer.selector}"
    return SealOutcome(made, reason)


def _seal(
    fields: list[tuple[bytes, bytes]],
    previous: list[tuple[bytes, bytes]],
    instance: int,
    cv: bytes,
    results: str,
    include: tuple[bytes, ...],
    sealer: Sealer,
    timestamp: int,
    body: BodyDigests,
) -> tuple[str, str, str]:
    signer: Any = dkim.DKIM(b"", linesep=b"\r\n")
    signer.signature_algorithm = ALGORITHM
    signer.hasher = dkim.crypto.HASH_ALGORITHMS[ALGORITHM]
    key = rsa_private_key(sealer.key.dkim_private)
    common = [
        (b"a", ALGORITHM),
        (b"d", sealer.domain.encode("ascii")),
        (b"i", str(instance).encode()),
        (b"s", sealer.selector.encode("ascii")),
        (b"t", str(timestamp).encode()),
    ]
    results_value = b" i=%d; " % instance + " ".join(unfold(results).split()).encode("utf-8")
    results_field = (AUTHENTICATION_RESULTS.encode(), results_value + b"\r\n")
    # The AMS signs the message's fields; the new AAR is above them, as it will be delivered.
    signer.headers = [results_field, *fields]
    ams_tags = [
        *common,
        (b"b", b""),
        (b"bh", base64.b64encode(body.digests[SEAL_BODY_HASH])),
        (b"c", b"relaxed/relaxed"),
        (b"h", b":".join(include)),
    ]
    ams_value = signer.gen_header(ams_tags, include, _RELAXED, MESSAGE_SIGNATURE.encode(), key, True)
    ams_field = (MESSAGE_SIGNATURE.encode(), b" " + ams_value)
    ordered = [*previous, results_field, ams_field]
    signer.headers = seal_order(ordered)
    seal_tags = [*common, (b"b", b""), (b"cv", cv)]
    seal_value = signer.gen_header(seal_tags, seal_names(ordered), _RELAXED, SEAL.encode(), key, True)
    return (_folded(seal_value), _folded(ams_value), _folded(results_value))


def _folded(value: bytes) -> str:
    """One tag or resinfo per line, folded with LF (the milter API's line end, authresults.py) and
    a space: dkimpy's ARC verifier finds an AMS by the text " i=N;", so no TAB before a tag."""
    return value.decode("utf-8").strip().replace("; ", ";\n ")


def own_results(headers: MessageHeaders, authserv_id: str) -> str:
    """Our Authentication-Results in the message as one payload, for an outbound seal's AAR.

    Every A-R field with our authserv-id, in message order, its results joined with ``;`` (the
    consolidation the ValiMail suite assumes); "" when there is none.
    """
    wanted = authserv_id.lower()
    results: list[str] = []
    for found in headers.get_all(AUTHENTICATION_RESULTS_HEADER):
        parsed = parse_authentication_results(found.value)
        if parsed is None or str(parsed.authserv_id or "").lower().rstrip(".") != wanted:
            continue
        _, _, rest = unfold(found.value).partition(";")
        results += [part.strip() for part in rest.split(";") if part.strip() and part.strip() != "none"]
    return f"{authserv_id}; " + "; ".join(results) if results else ""


def recorded_status(results: str) -> AuthResult | None:
    """The ``arc=`` result an A-R payload records (none when it has none); None when it records
    several or one that is not none, pass or fail: then nothing is sealed."""
    parsed = parse_authentication_results(results)
    if parsed is None:
        return None
    found = [str(r.result).lower() for r in parsed.results if str(r.method).lower() == "arc"]
    if not found:
        return AuthResult.NONE
    if len(found) > 1 or found[0] not in ("none", "pass", "fail"):
        return None
    return AuthResult(found[0])

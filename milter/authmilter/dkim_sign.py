"""DKIM signing from a plan (RFC 6376 §5, RFC 8301, RFC 8463): who signs, then the signatures.

Two steps, both pure (no file or network I/O; keys come from a provider the caller passes in):

1. :func:`plan_signatures` looks the sender address up in the SigningTable (OpenDKIM's rules,
   tables.py) and makes every matching rule concrete: d=, s=, i= and the KeyTable key. An empty
   plan carries the reason, as OpenDKIM's ``LogWhy`` would log it.
2. :func:`sign_message` makes one DKIM-Signature per signer. dkimpy canonicalizes, hashes and
   signs (RSA through OpenSSL once ``dkim_rsa.install()`` ran); the tag list is ours, because
   dkimpy's ``DKIM.sign()`` reads ``time.time()`` for t=, cannot write x=, and always adds i=.
   The message is parsed once and the body hashed once for all signatures (dual RSA + Ed25519
   signing, RFC 8463 §4, costs one body hash): :func:`signing_body_hash` says which, and the milter
   computes it as the body streams in (dkim_body.py), so only the header block is needed here.

Which header fields are signed (RFC 6376 §5.4): every occurrence of each configured name, and for
the "oversigned" names one more entry than there are fields, so that a field added later (a second
From or Subject shown to the reader instead of the signed one) breaks the signature (RFC 6376
§5.4.2, §8.15). Names absent from the message are not listed, so that a relay adding a missing
field (a Message-ID, a List-* field) does not break the signature.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.crypto
import nacl.encoding
import nacl.signing
from dkim.canonicalization import CanonicalizationPolicy

from authmilter.dkim_body import BodyDigests, BodyHashSpec, digest_body
from authmilter.keys import PERMISSION_POLICIES, PrivateKey
from authmilter.message import HeaderField, MessageHeaders, parse_from
from authmilter.settings import bounded, one_of, validate
from authmilter.tables import KeyEntry, Signer, SigningTable

HEADER_NAME = "DKIM-Signature"

# RFC 6376 §5.4.1: "SHOULD be included in the signature, if they are present": From (REQUIRED),
# Reply-To, Subject, Date, To, Cc, Resent-Date, Resent-From, Resent-To, Resent-Cc, In-Reply-To,
# References, List-Id, List-Help, List-Unsubscribe, List-Subscribe, List-Post, List-Owner,
# List-Archive. Added, as dkimpy and OpenDKIM do: the other fields that carry meaning for the reader
# (Sender, Message-ID, Resent-Sender, Resent-Message-ID) or for how the body is shown (the MIME
# fields, RFC 2045); and List-Unsubscribe-Post, which RFC 8058 §4 requires to be signed.
DEFAULT_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc",
    "resent-date", "resent-from", "resent-to", "resent-cc", "resent-sender", "resent-message-id",
    "in-reply-to", "references", "sender", "message-id",
    "mime-version", "content-type", "content-transfer-encoding", "content-id", "content-description",
    "list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post", "list-owner",
    "list-archive", "list-unsubscribe-post",
)  # fmt: skip

# RFC 6376 §8.15: an attacker adds a second instance of a signed field, above the signed one, and
# readers show it. Oversigned by default: every field RFC 5322 §3.6 allows at most once (From,
# Sender, Reply-To, To, Cc, Message-ID, In-Reply-To, References, Subject, Date) and the MIME fields
# RFC 2045 allows once (MIME-Version, Content-Type, Content-Transfer-Encoding), which decide how the
# body is displayed. A second instance of these is never legitimate, so the extra entry can only
# break a forgery. List-* fields are not oversigned: mailing lists add their own.
DEFAULT_OVERSIGN_HEADERS = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date",
    "message-id", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding",
)  # fmt: skip

# RFC 6376 §5.4: "SHOULD NOT be included": fields that change in transit (Return-Path, Received,
# Comments, Keywords), Bcc, other signatures, and the authentication results receivers add or
# remove (RFC 8601 §5, RFC 8617); signing them would break on delivery.
UNSIGNABLE_HEADERS = frozenset(
    {
        "return-path", "received", "comments", "keywords", "bcc", "resent-bcc",
        "dkim-signature", "authentication-results",
        "arc-seal", "arc-message-signature", "arc-authentication-results",
    }
)  # fmt: skip

CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed")
SIGNING_DOMAIN_SOURCES = ("from", "sender", "envelope")
# RFC 5322 §3.6.8 field-name.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")

KeyProvider = Callable[[KeyEntry], PrivateKey]
"""Gives the loaded private key of a KeyTable entry (a worker's ``keys.KeyCache``)."""


@dataclass(frozen=True)
class SigningSettings:
    """Section ``[signing]``: OpenDKIM's tables and how signatures are made.

    Attributes:
        key_table: the KeyTable file; "" = no signing.
        signing_table: the SigningTable file, ``refile:PATH`` for ``*`` patterns.
        multiple_signatures: every matching SigningTable entry signs (RSA and Ed25519 in one pass),
            not only the first (OpenDKIM's MultipleSignatures).
        key_permissions: a key file other users may read: "refuse", "warn" or "ignore".
        signing_domain: where the address looked up comes from: "from" (the From field),
            "sender" (the Sender field when present, else From) or "envelope" (MAIL FROM).
        canonicalization: c=, header/body: relaxed or simple each.
        headers: the field names to sign (lower-case); empty = DEFAULT_HEADERS.
        oversign_headers: names signed once more than they occur, when present.
        expire_after: seconds from t= to x=; 0 = no x=.
        sign_daemon_names: ``{daemon_name}`` macro values whose mail is outbound (signed).
    """

    key_table: str = ""
    signing_table: str = ""
    multiple_signatures: bool = False
    key_permissions: str = one_of("refuse", frozenset(PERMISSION_POLICIES))
    signing_domain: str = one_of("from", frozenset(SIGNING_DOMAIN_SOURCES))
    canonicalization: str = one_of("relaxed/relaxed", frozenset(CANONICALIZATIONS))
    headers: tuple[str, ...] = ()
    oversign_headers: tuple[str, ...] = DEFAULT_OVERSIGN_HEADERS
    expire_after: int = bounded(0, 0, 10 * 366 * 86400)
    sign_daemon_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate(self)

    @property
    def signed_headers(self) -> tuple[str, ...]:
        """The names to sign: the configured list, or the default one."""
        return self.headers or DEFAULT_HEADERS


def check_header_names(names: Iterable[str], require_from: bool) -> tuple[str, ...]:
    """Validate a configured list of header field names.

    Args:
        names: field names as written.
        require_from: the list must name From (RFC 6376 §5.4: From MUST be signed).

    Returns:
        the names lower-cased, duplicates removed, in order.

    Raises:
        ValueError: a name that is not a field name, or one that must not be signed.
    """
    lowered: list[str] = []
    for name in names:
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"'{name}' is not a header field name (RFC 5322 §3.6.8)")
        if name.lower() in UNSIGNABLE_HEADERS:
            raise ValueError(
                f"'{name}' must not be signed: it changes in transit or is added by receivers (RFC 6376 §5.4)"
            )
        lowered.append(name.lower())
    if require_from and lowered and "from" not in lowered:
        raise ValueError("the list must include From (RFC 6376 §5.4: the From field MUST be signed)")
    return tuple(dict.fromkeys(lowered))


class SigningError(ValueError):
    """The message cannot be signed (a bad header block); ``str(e)`` says why."""


@dataclass(frozen=True)
class SigningPlan:
    """Who signs one message.

    Attributes:
        address: the address looked up ("" when none could be found).
        signers: one per signature to make, in SigningTable order (the first goes on top).
        reason: why the message is not signed ("" when it is): the log line's "because".
    """

    address: str
    signers: tuple[Signer, ...]
    reason: str = ""


def signing_address(headers: MessageHeaders, mail_from: str, source: str) -> tuple[str, str]:
    """The sender address to look up in the SigningTable.

    Args:
        headers: the message headers.
        mail_from: the envelope sender ("" for the null sender).
        source: "from", "sender" (the Sender field if present, else From) or "envelope".

    Returns:
        ``(address, "")``, or ``("", why there is none)``. Header addresses are parsed strictly
        (message.parse_from); with several From mailboxes the first is used, as OpenDKIM does.
    """
    if source == "envelope":
        return (mail_from, "") if "@" in mail_from else ("", "null or domainless envelope sender")
    if source == "sender" and headers.get_all("Sender"):
        # parse_from's strict mailbox parser, given the Sender fields under the From name.
        renamed = tuple(HeaderField("From", f.value, f.index) for f in headers.get_all("Sender"))
        authors = parse_from(MessageHeaders(renamed, key_fields_dropped=headers.key_fields_dropped))
        what = "Sender"
    else:
        authors = parse_from(headers)
        what = "From"
    if authors.error:
        return "", f"{what}: {authors.error.replace('From', what)}"
    local = authors.addresses[0].rpartition("@")[0]
    return f"{local}@{authors.domains[0]}", ""


def plan_signatures(table: SigningTable | None, address: str, multiple: bool) -> SigningPlan:
    """The signers for a sender address (SigningTable lookup, then ``%`` and i= made concrete).

    Args:
        table: the SigningTable (with its KeyTable); None when signing is not configured.
        address: ``user@domain`` from :func:`signing_address`.
        multiple: every match signs (MultipleSignatures), not only the first.

    Returns:
        the plan; without signers, the reason names what was tried.
    """
    if table is None:
        return SigningPlan(address, (), "no signing tables configured ([signing] key_table)")
    rules = table.lookup(address, multiple)
    if not rules:
        return SigningPlan(address, (), f"no SigningTable entry for {address} (tried {table.tried(address)})")
    domain = address.rpartition("@")[2]
    signers: dict[tuple[str, str, str | None], Signer] = {}
    missing: list[str] = []
    for rule in rules:
        signer = table.resolve(rule, domain)
        if signer is None:
            missing.append(f"{rule.source} names key '%' but the KeyTable has no key named {domain.lower()}")
        else:
            # Two patterns naming one key would sign twice with the same key: once is enough.
            signers.setdefault((signer.key.name, signer.domain, signer.identity), signer)
    if not signers:
        return SigningPlan(address, (), "; ".join(missing))
    return SigningPlan(address, tuple(signers.values()))


def signing_body_hash(settings: SigningSettings) -> BodyHashSpec:
    """The body hash every signature we make carries (bh=, RFC 6376 §3.7).

    Args:
        settings: the canonicalization (c=).

    Returns:
        The c= body canonicalization over the whole body (we never write l=, §8.2) with SHA-256,
        the hash of every algorithm we sign with (RFC 8301 §3.1, RFC 8463 §3).
    """
    return BodyHashSpec(settings.canonicalization.partition("/")[2], None, "sha256")


def sign_message(
    message: bytes,
    signers: Sequence[Signer],
    keys: KeyProvider,
    settings: SigningSettings,
    now: float,
    body: BodyDigests | None = None,
) -> tuple[str, ...]:
    """One DKIM-Signature per signer (RFC 6376 §5).

    Args:
        message: the message as it will be delivered (CRLF or bare LF; Authentication-Results
            fields are never signed, so deleting forged ones later does not matter). With ``body``
            given, the header block and blank line are enough (a body is ignored).
        signers: from :func:`plan_signatures`.
        keys: gives each signer's private key.
        settings: canonicalization, header lists, expiry.
        now: the signing time (t=), Unix seconds.
        body: the body hashes computed as the body streamed in, with :func:`signing_body_hash`;
            None: computed here from the body in ``message``.

    Returns:
        the DKIM-Signature field values (without the name and colon), in signer order: the first
        belongs on top. Folds are LF + SP (the MTA writes CRLF); relaxed and simple header
        canonicalization both verify after that.

    Raises:
        SigningError: the header block cannot be parsed, or the message has no From field.
        KeyFileError: a key cannot be loaded (from ``keys``).
        KeyError: ``body`` lacks the :func:`signing_body_hash` (a caller's mistake).
    """
    if not signers:
        return ()
    try:
        signer = dkim.DKIM(message, linesep=b"\r\n")
    except dkim.MessageFormatError as e:
        raise SigningError(f"header block not parseable: {e}") from None
    include = signed_header_names([name for name, _ in signer.headers], settings)
    if b"from" not in include:
        raise SigningError("no From field (RFC 6376 §5.4: From MUST be signed)")
    policy = CanonicalizationPolicy.from_c_value(settings.canonicalization.encode())
    spec = signing_body_hash(settings)
    if body is None:
        body = digest_body([spec], signer.body or b"")  # dkimpy's body of an empty message is ""
    body_hash = base64.b64encode(body.digests[spec])
    return tuple(
        _one_signature(signer, plan, keys(plan.key), include, policy, body_hash, settings, now)
        for plan in signers
    )


def signed_header_names(present: Sequence[bytes], settings: SigningSettings) -> tuple[bytes, ...]:
    """h=: each name as often as it occurs, oversigned names once more; absent names left out.

    Args:
        present: the message's field names, in order (any case).
        settings: ``signed_headers`` and ``oversign_headers``.

    Returns:
        The h= names, lower-case (also the ARC-Message-Signature's, arc_seal.py).
    """
    counts: dict[str, int] = {}
    for raw_name in present:
        key = raw_name.decode("ascii", "replace").lower()
        counts[key] = counts.get(key, 0) + 1
    oversign = set(settings.oversign_headers)
    names = dict.fromkeys((*settings.signed_headers, *settings.oversign_headers))
    include: list[bytes] = []
    for name in names:
        occurrences = counts.get(name, 0)
        if occurrences:
            include += [name.encode("ascii")] * (occurrences + (name in oversign))
    return tuple(include)


def _one_signature(
    signer: dkim.DKIM,
    plan: Signer,
    key: PrivateKey,
    include: tuple[bytes, ...],
    policy: CanonicalizationPolicy,
    body_hash: bytes,
    settings: SigningSettings,
    now: float,
) -> str:
    algorithm = key.algorithm.encode()
    timestamp = int(now)
    tags: list[tuple[bytes, bytes]] = [
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", policy.to_c_value()),
        (b"d", plan.domain.encode("ascii")),
        (b"s", plan.selector.encode("ascii")),
    ]
    if plan.identity:
        tags.append((b"i", _dkim_quoted_printable(plan.identity)))
    tags.append((b"t", str(timestamp).encode()))
    if settings.expire_after > 0:
        tags.append((b"x", str(timestamp + settings.expire_after).encode()))
    tags += [
        (b"h", b":".join(include)),
        (b"bh", body_hash),
        # A placeholder as long as a signature, so that b= is folded onto its own lines and
        # the folding of the tags before it does not change when the real value goes in.
        (b"b", b"0" * 60),
    ]
    signer.signature_algorithm = algorithm
    signer.hasher = dkim.crypto.HASH_ALGORITHMS[algorithm]
    value: bytes = signer.gen_header(tags, include, policy, HEADER_NAME.encode(), _private_key(key))
    return value.decode("ascii").removesuffix("\r\n").replace("\r\n", "\n")


def _private_key(key: PrivateKey) -> Any:
    if key.key_type == "rsa":
        return rsa_private_key(key.dkim_private)
    return nacl.signing.SigningKey(key.dkim_private, encoder=nacl.encoding.Base64Encoder)


@functools.lru_cache(maxsize=64)
def rsa_private_key(pem: bytes) -> dict[str, int]:
    """An RSA key as dkimpy's signing takes it (PKCS#1 PEM in), parsed once per key."""
    # dkimpy's own parse (a dict of integers) is what its RSA signing, and dkim_rsa's, take.
    parsed: dict[str, int] = dkim.crypto.parse_pem_private_key(pem)
    return parsed


def _dkim_quoted_printable(text: str) -> bytes:
    """RFC 6376 §2.11 dkim-quoted-printable: ';', '=', spaces and non-ASCII as =XX."""
    return b"".join(
        bytes([byte]) if 0x21 <= byte <= 0x7E and byte not in b";=" else b"=%02X" % byte
        for byte in text.encode("utf-8")
    )

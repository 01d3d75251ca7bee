"""The one Authentication-Results renderer (RFC 8601), and the finder of forged incoming ones.

Rendering goes through ``authres`` (result syntax); a property, whose value is sanitized first,
is written as authres writes it without building its objects (tests compare the two). This
module decides what goes in, makes every echoed value safe, and folds.

Decisions:

- Folding uses LF + TAB, no CR: the milter API wants multi-line header values as LF followed by
  whitespace and adds the CR itself (libmilter ``smfi_addheader``/``smfi_insheader``; Postfix
  cleanup splits milter headers on LF the same way). The authserv-id stays on the first line and
  each resinfo starts a new line; a resinfo longer than the recommended 78 characters
  (RFC 5322 §2.1.1) folds between its properties.
- Echoed values (envelope, header, DNS text) pass :func:`sanitize_property_value`, which keeps
  only characters that can appear in a ``pvalue`` unquoted or in a quoted-string without
  escaping, so nothing can end the property, the resinfo or the header.
- Comments we write hold only printable ASCII without ``()\\;"``, so they cannot close early or
  look like a resinfo separator to naive parsers.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import authres
import authres.core
import authres.dkim_b
import authres.dmarc

from authmilter.domains import DomainError, a_label, normalize
from authmilter.message import MessageHeaders, unfold
from authmilter.model import AuthResult, MethodResult

HEADER_NAME = "Authentication-Results"
# RFC 5321 §4.5.3.1.3: a path is at most 256 octets; nothing we echo is legitimately longer.
MAX_PROPERTY_VALUE_LENGTH = 256
MAX_COMMENT_LENGTH = 128
# Incoming A-R fields are parsed only within these bounds; the others count as unparseable, so
# forged, and are deleted. authres parses by repeated regex substitution, quadratic in the length
# (about 50 ms for a hostile 2 KB value), so this caps the work per message near 1.5 s. Real
# fields are a few hundred bytes and a message crosses a handful of A-R-adding hosts; deleting
# a foreign field costs nothing, since a receiver trusts only its own authserv-id (RFC 8601 §7.1).
MAX_INCOMING_LENGTH = 2048
MAX_INCOMING_FIELDS = 32
# RFC 5322 §2.1.1: lines SHOULD be no more than 78 characters.
FOLD_WIDTH = 78
# Rendered resinfo kept per result: a few hundred bytes each.
CLAUSE_CACHE_SIZE = 1024
_FOLD = "\n\t"

# RFC 2045 §5.1 token characters plus "/" and "=" (base64 in header.b, RFC 6008), which only
# need a quoted-string. Nothing here needs escaping inside quotes, and none of CR, LF, ";", "(",
# ")", '"', "\\", "@" or whitespace survives. The same set is atext (RFC 5322 §3.2.3) for a
# local-part. Each set is written once, without the dot and ending in "-" (a class body); the
# patterns below are built from them, so the fast path and the sanitizer cannot drift apart.
_VALUE_CHARS = r"A-Za-z0-9!#$%&'*+^_`{|}~/=-"
# The domain-name after "@" in a pvalue (RFC 8601 §2.2, syntax of RFC 6376 §3.5).
_DOMAIN_CHARS = r"A-Za-z0-9_-"
_VALUE_UNSAFE = re.compile(rf"[^.{_VALUE_CHARS}]")
_DOMAIN_UNSAFE = re.compile(rf"[^.{_DOMAIN_CHARS}]")
# A value sanitize_property_value gives back as it is: safe characters only, and with an "@" a
# dot-atom local-part (or none) and a dot-atom domain. Most values are (addresses, domains).
_LOCAL_ATOM = rf"[{_VALUE_CHARS}]+"
_DOMAIN_ATOM = rf"[{_DOMAIN_CHARS}]+"
_ALREADY_SAFE = re.compile(
    rf"[.{_VALUE_CHARS}]*|(?:{_LOCAL_ATOM}(?:\.{_LOCAL_ATOM})*)?@{_DOMAIN_ATOM}(?:\.{_DOMAIN_ATOM})*"
)
# What authres writes unquoted (``QuotableValue``): a value with "@", or an RFC 2045 token.
_TOKEN = re.compile(authres.core.RFC2045_TOKEN_PATTERN)
_DOTS = re.compile(r"\.{2,}")
_COMMENT_UNSAFE = re.compile(r"[^\x20-\x7e]|[()\\;\"]")
# RFC 8601 §2.5: the authserv-id SHOULD be a hostname; we allow exactly that (LDH labels).
_HOSTNAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

_FEATURES = authres.FeatureContext(authres.dkim_b, authres.dmarc)


def _idna_or_drop(text: str) -> str:
    """A domain as A-labels, or with its non-ASCII characters dropped when it is no IDN."""
    if text.isascii():
        return text
    try:
        # Empty labels are left for _dot_atom to squeeze out.
        return ".".join(a_label(label) if label else "" for label in text.split("."))
    except DomainError:
        return "".join(char for char in text if char.isascii())


def _dot_atom(text: str, unsafe: re.Pattern[str]) -> str:
    """Only safe characters, no empty dot-separated parts (RFC 5322 §3.2.3 dot-atom-text)."""
    return _DOTS.sub(".", unsafe.sub("", text)).strip(".")


def sanitize_property_value(value: str) -> str:
    """Make a value from the message, envelope or DNS safe to echo as an RFC 8601 ``pvalue``.

    A value with ``@`` is split at the last one: the local-part keeps atext characters, the
    domain becomes A-labels and keeps letters, digits, ``-``, ``_`` and single dots, giving
    ``local@domain`` (or ``@domain``, or just the local-part when no domain is left). A value
    without ``@`` keeps the RFC 2045 token characters plus ``/ =``. Non-ASCII characters that
    are not part of an IDN are dropped, and the result is cut to ``MAX_PROPERTY_VALUE_LENGTH``.

    The result is bare text: the renderer (authres) writes it unquoted when it is a token or
    contains ``@``, and as a quoted-string otherwise, which needs no escaping since ``"`` and
    ``\\`` are gone. Either way it is one pvalue: it cannot end the property, the resinfo or
    the header field.

    Args:
        value: the raw value (possibly hostile).

    Returns:
        The safe value, possibly empty (then the property is left out).
    """
    if len(value) <= MAX_PROPERTY_VALUE_LENGTH and _ALREADY_SAFE.fullmatch(value):
        return value  # what _sanitized would give, in one pass
    return _sanitized(value)


def _sanitized(value: str) -> str:
    bounded = value[: 4 * MAX_PROPERTY_VALUE_LENGTH]
    local, at, domain = bounded.rpartition("@")
    if not at:
        return _VALUE_UNSAFE.sub("", _idna_or_drop(bounded))[:MAX_PROPERTY_VALUE_LENGTH]
    clean_local = _dot_atom(local, _VALUE_UNSAFE)
    clean_domain = _dot_atom(_idna_or_drop(domain), _DOMAIN_UNSAFE)
    if not clean_domain:
        return clean_local[:MAX_PROPERTY_VALUE_LENGTH]
    room = MAX_PROPERTY_VALUE_LENGTH - len(clean_domain) - 1
    if room < 0:
        return "@" + clean_domain[: MAX_PROPERTY_VALUE_LENGTH - 1].rstrip(".")
    return f"{clean_local[:room].rstrip('.')}@{clean_domain}"


@lru_cache(maxsize=16)  # called per message with the one configured id
def sanitize_authserv_id(value: str) -> str:
    """Check and normalise our authserv-id (RFC 8601 §2.5: a hostname is recommended).

    Args:
        value: the configured id, e.g. ``mx.example.com`` (a U-label name is converted).

    Returns:
        The id as lower-case A-labels without a trailing dot.

    Raises:
        ValueError: the value is not a hostname, so it could not be told apart reliably.
    """
    text = normalize(value.strip().rstrip("."))
    if text is None or not _HOSTNAME.fullmatch(text):
        raise ValueError(f"authserv-id is not a hostname: {value!r}")
    return text


def _sanitize_comment(text: str) -> str:
    cleaned = " ".join(_COMMENT_UNSAFE.sub(" ", text).split())
    return cleaned[:MAX_COMMENT_LENGTH].strip()


# Rendering is pure and the same resinfos recur message after message (SPF, HELO and DMARC results,
# a DKIM signature's d=, s= and a=): sanitizing and rendering them costs as much as a DNS cache
# hit, so the pieces are cached. A DKIM header.b is new in every message.


@lru_cache(maxsize=CLAUSE_CACHE_SIZE)
def _head_piece(method: str, result: AuthResult, comment: str) -> str:
    """``method=result (comment)``."""
    head = authres.core.AuthenticationResult(
        method, result=result.value, result_comment=_sanitize_comment(comment) or None
    )
    return str(head)


@lru_cache(maxsize=CLAUSE_CACHE_SIZE)
def _property_piece(ptype: str, name: str, raw: str) -> str:
    """``ptype.property=value``, or "" when nothing of the value is safe to echo."""
    value = sanitize_property_value(raw)
    if not value:
        return ""
    return f"{ptype.lower()}.{name.lower()}={_pvalue(value)}"


def _pvalue(value: str) -> str:
    """A sanitized value as authres writes it (RFC 8601 §2.2 pvalue): bare when it holds "@" or
    is a token, else a quoted-string, which needs no escaping: sanitizing removed '"' and "\\"."""
    return value if "@" in value or _TOKEN.fullmatch(value) else f'"{value}"'


@lru_cache(maxsize=CLAUSE_CACHE_SIZE)
def _clause(result: MethodResult, last: bool) -> str:
    """One resinfo on its own line(s), with its ";" unless it is the last."""
    properties = (_property_piece(*triple) for triple in result.properties)
    pieces = [_head_piece(result.method, result.result, result.comment), *(p for p in properties if p)]
    return _fold_clause(pieces, last)


def _fold_clause(pieces: Sequence[str], last: bool) -> str:
    """One resinfo on its own line, folded between pieces past FOLD_WIDTH."""
    if not last:
        pieces = [*pieces[:-1], pieces[-1] + ";"]
    lines = [pieces[0]]
    for piece in pieces[1:]:
        if 1 + len(lines[-1]) + 1 + len(piece) > FOLD_WIDTH:  # 1 for the TAB that starts it
            lines.append(piece)
        else:
            lines[-1] += " " + piece
    return _FOLD.join(lines)


def render_authentication_results(authserv_id: str, results: Sequence[MethodResult]) -> str:
    """The Authentication-Results value (after the colon) for one message, folded.

    Resinfos come in the order given (the check registry's header order: spf for MAIL FROM, spf
    for HELO, dkim per signature, dmarc, arc). With no result at all the value is ``authserv-id; none``
    (RFC 8601 §2.2).

    Args:
        authserv_id: our authserv-id (checked with :func:`sanitize_authserv_id`).
        results: every check's per-method results, in order.

    Returns:
        The value without the leading space, folded with LF + TAB.

    Raises:
        ValueError: the authserv-id is not a hostname (configuration must catch this first).
    """
    server = sanitize_authserv_id(authserv_id)
    if not results:
        return str(authres.AuthenticationResultsHeader(authserv_id=server).header_value())
    last = len(results) - 1
    return _FOLD.join([server + ";", *(_clause(result, i == last) for i, result in enumerate(results))])


# --- incoming headers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IncomingAuthResults:
    """An Authentication-Results field found in the message.

    Attributes:
        index: its HeaderField.index among Authentication-Results fields (for smfi_chgheader).
        authserv_id: the authserv-id, lower-cased; "" if the field cannot be parsed.
        forged: it carries our authserv-id (or one of the site's others we remove), or cannot be
            parsed (then it might, to a laxer reader: authentication_milter's Sanitize handler
            removes those too). Fields past MAX_INCOMING_LENGTH or MAX_INCOMING_FIELDS are not
            parsed and count as forged.
    """

    index: int
    authserv_id: str
    forged: bool


def _incoming_authserv_id(value: str) -> str:
    """The authserv-id of an incoming A-R value, or "" when it does not parse (RFC 8601 §2.2)."""
    text = unfold(value)
    if len(text) > MAX_INCOMING_LENGTH:
        return ""
    try:
        parsed = _FEATURES.parse_value(text.strip())
    # authres raises its own errors, ValueError, and RecursionError on deep comment nesting;
    # hostile input must never escape from here.
    except Exception:
        return ""
    return str(parsed.authserv_id or "").lower().rstrip(".")


def parse_authentication_results(payload: str) -> Any:
    """An A-R payload (``authserv-id; resinfo...``) parsed by authres, or None when it does not
    parse or is longer than MAX_INCOMING_LENGTH (ARC-Authentication-Results, RFC 8617 §4.1.1)."""
    text = unfold(payload).strip()
    if len(text) > MAX_INCOMING_LENGTH:
        return None
    try:
        return _FEATURES.parse_value(text)
    except Exception:  # hostile input: see _incoming_authserv_id
        return None


def inspect_authentication_results(
    headers: MessageHeaders, authserv_id: str, other_ids: Collection[str] = ()
) -> tuple[IncomingAuthResults, ...]:
    """Judge every incoming Authentication-Results field (RFC 8601 §5).

    Args:
        headers: the message headers.
        authserv_id: our authserv-id.
        other_ids: further authserv-ids whose fields are removed like ours (``[milter]
            remove_authserv_ids``, OpenDKIM's RemoveARFrom), each as :func:`sanitize_authserv_id`
            returns it.

    Returns:
        One entry per field, in message order.
    """
    # Compared lower-cased on both sides: an authserv-id is a host name (RFC 8601 §2.5), and
    # host names compare case-insensitively.
    removed = {sanitize_authserv_id(authserv_id), *other_ids}
    found = []
    for position, field in enumerate(headers.get_all(HEADER_NAME)):
        theirs = _incoming_authserv_id(field.value) if position < MAX_INCOMING_FIELDS else ""
        found.append(IncomingAuthResults(field.index, theirs, forged=not theirs or theirs in removed))
    return tuple(found)


def find_forged_authentication_results(
    headers: MessageHeaders, authserv_id: str, other_ids: Collection[str] = ()
) -> tuple[int, ...]:
    """Indices of the Authentication-Results fields to delete (RFC 8601 §5), last first.

    Deleting from the last keeps the remaining indices valid; deleting forward shifts them and
    removes the wrong field (OpenDKIM bug #148).

    Args:
        headers: the message headers.
        authserv_id: our authserv-id.
        other_ids: further authserv-ids removed like ours (see :func:`inspect_authentication_results`).

    Returns:
        ``HeaderField.index`` values of forged fields, in descending order.
    """
    inspected = inspect_authentication_results(headers, authserv_id, other_ids)
    forged = [entry.index for entry in inspected if entry.forged]
    return tuple(sorted(forged, reverse=True))

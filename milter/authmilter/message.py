"""Message headers with per-name indices, bounded; strict RFC5322.From parsing.

Representation (one for both sources, the milter callbacks and a message file):

- Every text here is the latin-1 decoding of the bytes on the wire, so any byte survives a
  round trip (``text.encode("latin-1")`` gives the bytes back). UTF-8 header text (RFC 6532)
  therefore shows up as mojibake until someone decodes it on purpose (``parse_from`` does).
- ``HeaderField.value`` is everything after the colon up to, not including, the field's final
  CRLF: leading whitespace kept, folding kept as CRLF + WSP. So ``name + ":" + value + CRLF``
  is the field as written.
- ``HeaderField.name`` has whitespace before the colon removed (obsolete ``Subject :``,
  RFC 5322 §4.5): that is what the MTA passes to milters (Postfix milter8.c), so both sources
  agree.

Milter header callbacks lose one byte of information: Postfix and Sendmail eat one space (not a
tab) after the colon unless the milter negotiated SMFIP_HDR_LEADSPC (Postfix milter8.c,
``milter8_header``), and send continuation lines separated by a bare LF. ``headers_from_pairs``
puts the space back and restores CRLF, as OpenDKIM and dkimpy-milter do; that is exact for the
usual ``Name: value`` and only differs for ``Name:value`` (which relaxed canonicalisation,
RFC 6376 §3.4.2, ignores anyway).

A line in the header block that is neither a field (``name:``) nor a continuation ends the
header block and is the first line of the body, as Postfix's cleanup does (its MIME state machine
leaves the header on the first non-header line); ``has_separator`` is then False.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from authmilter.domains import MAX_NAME_LENGTH, DomainError, a_label

# Far above what real mail carries (a few dozen fields; long Received chains stay in the
# hundreds) and low enough that a hostile header block costs bounded memory.
MAX_HEADERS = 1000
# Fields kept past MAX_HEADERS (up to as many again), because losing one is a bypass: a second
# From hidden behind junk fields (RFC 9989 §4.4 needs exactly one), or a forged
# Authentication-Results we would fail to delete (RFC 8601 §5).
KEY_FIELDS = frozenset({"from", "authentication-results"})
# A From field longer than this is hostile: RFC 5322 §2.1.1 limits a line to 998 characters and
# real From fields hold one short mailbox.
MAX_FROM_LENGTH = 8192
# Each From domain costs DMARC lookups (RFC 9989 §4.4 evaluates every author domain).
MAX_FROM_MAILBOXES = 32
# From values up to this length are cached once parsed (1024 of them: at most 512 KB).
MAX_CACHED_FROM_LENGTH = 512

# RFC 5322 §3.6.8: field-name = 1*ftext, ftext = %d33-57 / %d59-126; §4.5.3 (obsolete syntax)
# allows WSP between the name and the colon.
_FIELD_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_LF_TEXT = re.compile(r"(?<!\r)\n")
# RFC 5322 §2.2.3: unfolding removes any CRLF that is immediately followed by WSP.
_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class HeaderField:
    """One header field as received.

    Attributes:
        name: the field name as written, without whitespace before the colon.
        value: everything after the colon (leading whitespace and CRLF folding kept), as the
            latin-1 decoding of the wire bytes.
        index: 1-based occurrence among fields with the same name, compared case-insensitively:
            the index ``smfi_chgheader`` expects.
    """

    name: str
    value: str
    index: int

    def __post_init__(self) -> None:
        # Texts are latin-1 decodings of bytes; anything else cannot be written back faithfully.
        if not (self.name.isascii() and self.value.isascii()):  # ASCII: the common, cheap case
            self.name.encode("latin-1")
            self.value.encode("latin-1")
        if self.index < 1:
            raise ValueError(f"header index must be 1-based, got {self.index}")


@dataclass(frozen=True)
class MessageHeaders:
    """The header block, in order, bounded.

    Attributes:
        fields: the fields kept, in message order.
        truncated: more fields than the limit were present; the rest were dropped, except
            From and Authentication-Results fields (KEY_FIELDS), which are kept up to as many
            again, so ``fields`` may hold up to twice the limit.
        key_fields_dropped: even a From or Authentication-Results field was dropped: the message
            cannot be judged (``parse_from`` refuses it) and a forged A-R may survive, so the
            caller should refuse it.
    """

    fields: tuple[HeaderField, ...]
    truncated: bool = False
    key_fields_dropped: bool = False
    # The fields by lower-case name, found once: the checks, the prefetch and the forged A-R
    # search each ask for fields by name, several times per message. Never handed out.
    _by_name: dict[str, list[HeaderField]] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, list[HeaderField]] = {}
        for found in self.fields:
            by_name.setdefault(found.name.lower(), []).append(found)
        object.__setattr__(self, "_by_name", by_name)

    def get_all(self, name: str) -> tuple[HeaderField, ...]:
        """Fields with this name, case-insensitively (RFC 5322 §1.2.2), in order.

        Args:
            name: the field name, e.g. ``"From"``.

        Returns:
            The matching fields, possibly empty.
        """
        return tuple(self._by_name.get(name.lower(), ()))

    def named(self, names: Collection[str]) -> tuple[HeaderField, ...]:
        """Fields whose name is one of ``names``, in message order.

        Args:
            names: lower-case field names, e.g. ``{"from", "dkim-signature"}``.

        Returns:
            The matching fields, possibly empty.
        """
        if len(names) == 1:  # the usual question, answered from the index
            (name,) = names
            return tuple(self._by_name.get(name, ()))
        return tuple(found for found in self.fields if found.name.lower() in names)


@dataclass(frozen=True)
class ParsedMessage:
    """A message split into header fields and body.

    Attributes:
        headers: the header fields.
        body_offset: where the body starts in ``raw`` (``len(raw)`` when there is no body).
        raw: the message with CRLF line endings (bare LF normalised).
        has_separator: an empty line separated header and body.
    """

    headers: MessageHeaders
    body_offset: int
    raw: bytes
    has_separator: bool

    @property
    def body(self) -> bytes:
        """The body bytes (a copy; use ``memoryview(raw)[body_offset:]`` to avoid it)."""
        return self.raw[self.body_offset :]


class HeaderCollector:
    """Builds bounded ``MessageHeaders`` one field at a time, in message order.

    Fields are numbered per name (case-insensitively). Past ``max_headers`` only KEY_FIELDS are
    kept, up to as many again; every other field is only counted, so memory stays bounded
    whatever the sender writes, and ``result()`` says what was dropped.

    Args:
        max_headers: how many fields to keep (see MessageHeaders for From and A-R fields).
    """

    def __init__(self, max_headers: int = MAX_HEADERS) -> None:
        self._max_headers = max_headers
        self._fields: list[HeaderField] = []
        self._counts: dict[str, int] = {}
        self._seen = 0
        self._key_fields_dropped = False

    def add(
        self, raw_name: str | bytes, raw_value: str | bytes, *, leading_space_included: bool = False
    ) -> HeaderField | None:
        """Add one field as a milter ``header`` callback received it.

        Args:
            raw_name: the field name; whitespace before the colon is dropped.
            raw_value: the value; str as pymilter decodes it (UTF-8 with surrogateescape), bytes
                as they are; continuation lines separated by LF or CRLF.
            leading_space_included: the milter negotiated SMFIP_HDR_LEADSPC, so the value keeps
                its leading whitespace; otherwise the MTA ate one space and it is put back.

        Returns:
            The field as kept, or None when it is not kept (past the limit).
        """
        name = _wire_text(raw_name).rstrip(" \t")
        key = name.lower()
        # Below the limit (the usual case: no call); a field that is not kept needs no decoding.
        if self._seen >= self._max_headers and not self._keeps(key):
            self._drop(key)
            return None
        value = _wire_text(raw_value)
        if "\n" in value:  # folded: most fields are not, and the regex costs more than this test
            # The MTA separates continuation lines with a bare LF (Postfix milter8.c, Sendmail):
            # with no CR at all, every LF is bare, and replace() costs a twentieth of the regex's
            # lookbehind at each character.
            value = value.replace("\n", "\r\n") if "\r" not in value else _BARE_LF_TEXT.sub("\r\n", value)
        return self._append(name, key, value if leading_space_included else " " + value)

    def keeps(self, name: str) -> bool:
        """Whether the next field, with this name, will be kept.

        Args:
            name: the field name.

        Returns:
            True below the limit, and past it for KEY_FIELDS while there is room.
        """
        return self._keeps(name.lower())

    def add_text(self, name: str, value: str) -> None:
        """Add one field already in this module's representation (see the module docstring).

        Args:
            name: the field name, without whitespace before the colon.
            value: everything after the colon, CRLF folding kept; ignored when the field is
                not kept (``keeps(name)`` is False).
        """
        key = name.lower()
        if self._keeps(key):
            self._append(name, key, value)
        else:
            self._drop(key)

    def _keeps(self, key: str) -> bool:
        if self._seen < self._max_headers:
            return True
        return key in KEY_FIELDS and len(self._fields) < 2 * self._max_headers

    def _append(self, name: str, key: str, value: str) -> HeaderField:
        self._seen += 1
        index = self._counts[key] = self._counts.get(key, 0) + 1  # 1-based among fields of that name
        field = HeaderField(name, value, index)
        self._fields.append(field)
        return field

    def _drop(self, key: str) -> None:
        """Count a field that is not kept."""
        self._seen += 1
        # Past the limit only key fields can still be kept, so only their count matters.
        if key in KEY_FIELDS:
            self._counts[key] = self._counts.get(key, 0) + 1
            self._key_fields_dropped = True

    def result(self) -> MessageHeaders:
        """The headers so far.

        Returns:
            The kept fields, with ``truncated`` and ``key_fields_dropped`` as counted.
        """
        truncated = self._seen > self._max_headers
        return MessageHeaders(tuple(self._fields), truncated, self._key_fields_dropped)


def normalise_line_endings(raw: bytes) -> bytes:
    """Bare LF line ends as CRLF (RFC 5322 §2.3: CR and LF only together), as dkimpy reads them.

    Args:
        raw: message bytes.

    Returns:
        ``raw`` itself when every LF follows a CR (the milter and SMTP case: no copy), else a copy
        with a CR before each bare LF.
    """
    if raw.count(b"\n") == raw.count(b"\r\n"):
        return raw
    return _BARE_LF.sub(b"\r\n", raw)


def parse_message(raw: bytes, max_headers: int = MAX_HEADERS) -> ParsedMessage:
    """Split a message (RFC 5322 §2.1) into bounded header fields and a body.

    Bare LF line endings become CRLF in one pass. Time is linear in the size of the header
    block; the body is neither scanned nor copied beyond that normalisation. Never raises for
    malformed input: with no empty line the whole message is header (body empty), and a line
    that is not a field ends the header block (see the module docstring).

    Args:
        raw: the message bytes.
        max_headers: how many fields to keep (see MessageHeaders for From and A-R fields).

    Returns:
        The parsed message.
    """
    data = normalise_line_endings(raw)
    collector = HeaderCollector(max_headers)
    size = len(data)
    pos = 0
    body_offset = size
    has_separator = False
    name = ""
    value_start = value_end = -1
    while pos < size:
        eol = data.find(b"\r\n", pos)
        line_end = size if eol < 0 else eol
        next_pos = size if eol < 0 else eol + 2
        if line_end == pos:  # the empty line that ends the header block
            body_offset, has_separator = next_pos, True
            break
        if data[pos] in b" \t" and value_start >= 0:  # continuation, RFC 5322 §2.2.3
            value_end = line_end
        else:
            match = _FIELD_START.match(data, pos, line_end)
            if match is None:  # not a header: the body starts here (Postfix)
                body_offset = pos
                break
            if value_start >= 0:
                _add_field(collector, name, data, value_start, value_end)
            name = match.group(1).decode("latin-1")
            value_start, value_end = match.end(), line_end
        pos = next_pos
    if value_start >= 0:
        _add_field(collector, name, data, value_start, value_end)
    return ParsedMessage(collector.result(), body_offset, data, has_separator)


def _add_field(collector: HeaderCollector, name: str, data: bytes, start: int, end: int) -> None:
    # A field that is not kept needs no decoding.
    value = data[start:end].decode("latin-1") if collector.keeps(name) else ""
    collector.add_text(name, value)


def _wire_text(text: str | bytes) -> str:
    """The latin-1 text of the wire bytes behind a milter argument.

    pymilter hands header values over as UTF-8 decoded with ``surrogateescape`` (or as bytes with
    ``@Milter.decode("bytes")``); both give the original bytes back.
    """
    if isinstance(text, bytes):
        return text.decode("latin-1")
    if text.isascii():  # the same text either way (header names always)
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("latin-1")
    except UnicodeEncodeError:  # a lone surrogate pymilter never produces
        return text.encode("utf-8", "replace").decode("latin-1")


def headers_from_pairs(
    pairs: Iterable[tuple[str | bytes, str | bytes]],
    max_headers: int = MAX_HEADERS,
    *,
    leading_space_included: bool = False,
) -> MessageHeaders:
    """Build headers from milter header callbacks (name, value), in order.

    Args:
        pairs: what the ``header`` callbacks received; str values are taken as pymilter decodes
            them (UTF-8 with surrogateescape), bytes as they are.
        max_headers: how many fields to keep (see MessageHeaders for From and A-R fields).
        leading_space_included: the milter negotiated SMFIP_HDR_LEADSPC, so values arrive with
            their leading whitespace; otherwise the MTA ate one space and it is put back.

    Returns:
        The headers, in the same representation ``parse_message`` gives.
    """
    collector = HeaderCollector(max_headers)
    for raw_name, raw_value in pairs:
        collector.add(raw_name, raw_value, leading_space_included=leading_space_included)
    return collector.result()


def assemble_message(headers: MessageHeaders, body: bytes) -> bytes:
    """Headers and body back into one CRLF message, e.g. for DKIM verification.

    Args:
        headers: the fields, written as ``name:value CRLF`` in order.
        body: the body bytes as the MTA passed them (already CRLF).

    Returns:
        The header block, an empty line, then the body.
    """
    head = "".join(f"{field.name}:{field.value}\r\n" for field in headers.fields)
    return b"".join((head.encode("latin-1"), b"\r\n", body))


def unfold(value: str) -> str:
    """Undo folding (RFC 5322 §2.2.3): drop each CRLF (or bare LF) followed by WSP.

    Args:
        value: a header field value.

    Returns:
        The value on one line.
    """
    return _FOLD.sub("", value)


# --- RFC5322.From -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FromAuthors:
    """The author addresses of RFC5322.From, for DMARC (RFC 9989 §4.4).

    Attributes:
        addresses: the addr-specs, as written (quoted local parts re-quoted).
        domains: distinct lower-cased domains as A-labels without a trailing dot, in order.
        error: "" when fine; otherwise why DMARC cannot evaluate. Addresses and domains are
            empty then: a partly parsed From must never be used.
    """

    addresses: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    error: str = ""


class _FromError(Exception):
    """Why a From field cannot be used; caught inside ``parse_from``."""


class _Token(NamedTuple):
    kind: str  # "atom", "qstring", "literal" or "special"
    text: str  # atom text, quoted-string content (unescaped), literal content or the special


# RFC 5322 §3.2.3: atext = ALPHA / DIGIT / "!#$%&'*+-/=?^_`{|}~"; RFC 6532 §3.2 adds UTF8-non-ascii.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
# RFC 5322 §3.2.3: the specials that structure an address (the rest are handled by the scanner).
_SPECIALS = frozenset("<>@,;:.")
# RFC 1035 §2.3.1 (LDH) plus "_", which DMARC and DKIM names use; checked on A-labels.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def parse_from(headers: MessageHeaders) -> FromAuthors:
    """Find the author domains DMARC evaluates (RFC 9989 §4.4, RFC 5322 §3.6.2).

    Exactly one From field must be present. Its mailbox-list is tokenised and parsed strictly
    (RFC 5322 §3.4 with the §4.4 obsolete forms, RFC 6854 groups), before any RFC 2047 decoding,
    so a display name, comment or quoted string can never supply the domain. Anything a
    receiver could read two ways is an error rather than a guess.

    Args:
        headers: the message headers.

    Returns:
        The authors, or an error saying why there are none to evaluate.
    """
    if headers.key_fields_dropped:
        return FromAuthors(error="too many header fields: another From may be hidden")
    fields = headers.get_all("From")
    if not fields:
        return FromAuthors(error="no From header field")
    if len(fields) > 1:
        return FromAuthors(error=f"{len(fields)} From header fields")
    return parse_from_value(fields[0].value)


def parse_from_value(value: str) -> FromAuthors:
    """The authors of one From field's value (see :func:`parse_from`, which finds the field).

    Args:
        value: the field value, as ``HeaderField.value``.

    Returns:
        The authors, or an error saying why there are none to evaluate.
    """
    if len(value) <= MAX_CACHED_FROM_LENGTH:
        return _authors_of(value)
    return _authors_of.__wrapped__(value)


@lru_cache(maxsize=1024)
def _authors_of(value: str) -> FromAuthors:
    # Pure in the field value; the same From recurs message after message (and the milter asks
    # twice per message: DMARC and the log line), so short values are parsed once.
    try:
        addresses, domains = _parse_mailbox_list(value)
    except _FromError as exc:
        return FromAuthors(error=str(exc))
    return FromAuthors(tuple(addresses), tuple(dict.fromkeys(domains)))


def _parse_mailbox_list(raw_value: str) -> tuple[list[str], list[str]]:
    if len(raw_value) > MAX_FROM_LENGTH:
        raise _FromError("From header field too long")
    # Back to the wire bytes, then UTF-8 (RFC 6532); undecodable bytes become U+FFFD, which no
    # domain accepts.
    text = unfold(raw_value).encode("latin-1").decode("utf-8", "replace")
    parser = _AddressParser(_tokenize(text))
    parser.parse()
    if not parser.addresses:
        raise _FromError("From header field has no mailbox")
    return parser.addresses, parser.domains


def _tokenize(text: str) -> list[_Token]:
    """RFC 5322 §3.2 lexical tokens; comments and whitespace (CFWS) are dropped."""
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char in " \t":
            pos += 1
        elif char == "(":
            pos = _skip_comment(text, pos)
        elif char == '"':
            pos = _read_delimited(text, pos, '"', "qstring", tokens)
        elif char == "[":
            pos = _read_delimited(text, pos, "]", "literal", tokens)
        elif char in _SPECIALS:
            tokens.append(_Token("special", char))
            pos += 1
        elif char in _ATEXT or ord(char) > 0x7F:
            end = pos + 1
            while end < len(text) and (text[end] in _ATEXT or ord(text[end]) > 0x7F):
                end += 1
            tokens.append(_Token("atom", text[pos:end]))
            pos = end
        elif char == ")":
            raise _FromError("unbalanced parentheses")
        else:
            raise _FromError(f"invalid character {char!r}")
    return tokens


def _check_quoted_char(char: str) -> None:
    # NUL and bare CR/LF are never allowed (RFC 5322 §4.1 obs-qtext/obs-ctext exclude them).
    if char in "\x00\r\n":
        raise _FromError(f"invalid character {char!r}")


def _skip_comment(text: str, pos: int) -> int:
    """RFC 5322 §3.2.2: comment = "(" *([FWS] ccontent) [FWS] ")", ccontent nests comments."""
    depth = 0
    while pos < len(text):
        char = text[pos]
        _check_quoted_char(char)
        if char == "\\":  # quoted-pair, §3.2.1
            pos += 1
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    raise _FromError("unbalanced parentheses")


def _read_delimited(text: str, pos: int, closer: str, kind: str, tokens: list[_Token]) -> int:
    """quoted-string (§3.2.4) or domain-literal (§3.4.1), with quoted-pairs unescaped."""
    chars: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        _check_quoted_char(char)
        if char == "\\" and pos + 1 < len(text):
            pos += 1
            char = text[pos]
            _check_quoted_char(char)
        elif char == closer:
            tokens.append(_Token(kind, "".join(chars)))
            return pos + 1
        chars.append(char)
        pos += 1
    raise _FromError("unbalanced quotes" if closer == '"' else "unbalanced brackets")


class _AddressParser:
    """Recursive descent over the tokens of RFC 5322 §3.4 / RFC 6854 (From as address-list)."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.addresses: list[str] = []
        self.domains: list[str] = []

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def at_special(self, char: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "special" and token.text == char

    def expect(self, char: str, error: str) -> None:
        if not self.at_special(char):
            raise _FromError(error)
        self.pos += 1

    def parse(self) -> None:
        # address-list = address *("," address); obs-addr-list (§4.4) allows empty elements.
        while self.peek() is not None:
            if self.at_special(","):
                self.pos += 1
                continue
            self.parse_address(in_group=False)
            if self.peek() is not None:
                self.expect(",", f"unexpected {self.describe()} after an address")

    def describe(self) -> str:
        token = self.peek()
        if token is None:
            return "end of field"
        return repr(token.text) if token.kind == "special" else f"{token.kind} {token.text[:40]!r}"

    def parse_address(self, in_group: bool) -> None:
        # mailbox = name-addr / addr-spec; group = display-name ":" [group-list] ";" (§3.4)
        phrase_start = self.pos
        while (token := self.peek()) is not None and (token.kind in ("atom", "qstring") or token.text == "."):
            self.pos += 1
        words = self.tokens[phrase_start : self.pos]
        if self.at_special("<"):
            self.parse_angle_addr()
        elif self.at_special("@"):
            self.pos = phrase_start  # the words were a local-part
            self.parse_addr_spec()
        elif self.at_special(":") and words and not in_group:
            self.pos += 1
            self.parse_group()
        elif words:
            raise _FromError(f"address without a domain: {_render_words(words)[:80]!r}")
        else:
            raise _FromError(f"unexpected {self.describe()}")

    def parse_group(self) -> None:
        # group-list = mailbox-list / CFWS / obs-group-list; an empty group gives no author.
        while not self.at_special(";"):
            if self.peek() is None:
                raise _FromError("group without its closing ';'")
            if self.at_special(","):
                self.pos += 1
                continue
            self.parse_address(in_group=True)
            if self.peek() is not None and not self.at_special(";"):
                self.expect(",", f"unexpected {self.describe()} in a group")
        self.pos += 1

    def parse_angle_addr(self) -> None:
        # angle-addr = [CFWS] "<" addr-spec ">" [CFWS] / obs-angle-addr (with obs-route, §4.4)
        self.pos += 1
        if self.at_special("@") or self.at_special(","):
            self.skip_obs_route()
        if self.at_special(">"):
            raise _FromError("empty angle address")
        self.parse_addr_spec()
        self.expect(">", "unbalanced angle brackets")

    def skip_obs_route(self) -> None:
        # obs-route = obs-domain-list ":"; obs-domain-list = *(CFWS / ",") "@" domain
        #             *("," [CFWS] ["@" domain]). Route domains are not authors (§4.4: ignored).
        while self.at_special(","):
            self.pos += 1
        self.expect("@", "malformed route")
        self.read_domain()
        while self.at_special(","):
            self.pos += 1
            if self.at_special("@"):
                self.pos += 1
                self.read_domain()
        self.expect(":", "malformed route")

    def parse_addr_spec(self) -> None:
        # addr-spec = local-part "@" domain
        local = self.read_local_part()
        if not self.at_special("@"):
            if self.peek() is None or any(self.at_special(char) for char in ",;>"):
                raise _FromError(f"address without a domain: {local[:80]!r}")
            raise _FromError(f"unexpected {self.describe()} in an address")
        self.pos += 1
        domain = self.read_domain()
        if len(self.addresses) >= MAX_FROM_MAILBOXES:
            raise _FromError("too many mailboxes in From")
        self.addresses.append(f"{local}@{domain}")
        self.domains.append(_dmarc_domain(domain))

    def read_word(self) -> str:
        token = self.peek()
        if token is None or token.kind not in ("atom", "qstring"):
            raise _FromError(f"expected a word, found {self.describe()}")
        self.pos += 1
        return token.text if token.kind == "atom" else _quote(token.text)

    def read_local_part(self) -> str:
        # local-part = dot-atom / quoted-string / obs-local-part (word *("." word))
        parts = [self.read_word()]
        while self.at_special("."):
            self.pos += 1
            parts.append(self.read_word())
        return ".".join(parts)

    def read_domain(self) -> str:
        # domain = dot-atom / domain-literal / obs-domain (atom *("." atom)); a literal names
        # an address, not a domain with a DMARC policy.
        token = self.peek()
        if token is not None and token.kind == "literal":
            raise _FromError("domain literal has no DMARC domain")
        labels = [self.read_atom()]
        while self.at_special("."):
            self.pos += 1
            following = self.peek()
            if following is None or following.kind != "atom":
                labels.append("")  # a trailing dot: the root, dropped later
                break
            labels.append(self.read_atom())
        return ".".join(labels)

    def read_atom(self) -> str:
        token = self.peek()
        if token is None or token.kind != "atom":
            raise _FromError(f"expected a domain, found {self.describe()}")
        self.pos += 1
        return token.text


def _render_words(words: list[_Token]) -> str:
    return " ".join(word.text for word in words)


def _quote(content: str) -> str:
    escaped = content.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _dmarc_domain(domain: str) -> str:
    """Lower-cased A-labels without the trailing dot (RFC 9989 §4.4 compares domains so), each
    label a host name's (letters, digits, inner hyphens, and "_"), IDNA as domains.py decides."""
    labels = []
    for label in domain.removesuffix(".").split("."):
        try:
            ascii_label = a_label(label).lower()
        except DomainError as exc:
            raise _FromError(str(exc)) from exc
        if not _LABEL.fullmatch(ascii_label):
            raise _FromError(f"invalid domain label {label[:64]!r}")
        labels.append(ascii_label)
    result = ".".join(labels)
    if len(result) > MAX_NAME_LENGTH:
        raise _FromError("domain too long")
    return result

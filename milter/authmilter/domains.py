"""Domain names and envelope paths: one normalisation, one comparison, one IDNA policy.

IDNA policy. A U-label becomes its A-label by IDNA 2003 ToASCII (Python's ``idna`` codec, RFC 3490;
the ``idna`` package, IDNA 2008 / RFC 5891, is not installed with dnspython and not a dependency),
and is accepted only when ToUnicode of that A-label gives the label back up to case. IDNA 2003 maps
a few characters IDNA 2008 keeps (ß, ς, ZWJ, ZWNJ): "faß.example" would become "fass.example",
another domain under IDNA 2008, so such a label is refused, never silently mapped. Names go to DNS
as A-labels; domains compare as lower-case A-labels without the trailing dot (RFC 4343: DNS names
compare case-insensitively; RFC 9989 §4.4 for DMARC).

Envelope paths (RFC 5321 §4.1.2): :func:`path_address` is the one reverse-path / forward-path
parser: angle brackets, the null path ``<>`` and obsolete source routes.
"""

from __future__ import annotations

from encodings.idna import ToASCII, ToUnicode
from functools import lru_cache

# RFC 1035 §2.3.4: labels are 63 octets or less, names 255 octets or less on the wire (253 as text).
MAX_LABEL_LENGTH = 63
MAX_NAME_LENGTH = 253
# Normalised names kept; each message asks for the same From, SPF and DKIM domains several times.
NAME_CACHE_SIZE = 4096
MAX_CACHED_NAME_LENGTH = 4 * MAX_NAME_LENGTH
# RFC 3490 §3.1: ideographic full stop, fullwidth full stop and halfwidth ideographic full stop
# separate labels as "." does.
_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


class DomainError(ValueError):
    """A name that is no domain name, in words fit for a reason (``invalid domain label 'a b'``)."""


def a_label(label: str) -> str:
    """One label as DNS wants it: an ASCII label as written, a U-label as its (lower-case) A-label.

    Raises:
        DomainError: empty, longer than 63 octets, not valid IDNA, or mapped by IDNA 2003 to
            another label (see the module docstring).
    """
    if label.isascii():
        if not 0 < len(label) <= MAX_LABEL_LENGTH:
            raise DomainError(f"invalid domain label {label[:64]!r}")
        return label
    try:
        ascii_label = ToASCII(label).decode("ascii")
        round_trip = ToUnicode(ascii_label)
    except UnicodeError as exc:
        raise DomainError(f"invalid internationalised domain label {label[:64]!r}") from exc
    if round_trip != label.lower():
        raise DomainError(f"ambiguous internationalised domain label {label[:64]!r}")
    return ascii_label.lower()


def to_a_labels(name: str) -> str:
    """A domain name with its U-labels as A-labels and without the trailing dot; ASCII labels keep
    their case (a name echoed back, e.g. in Authentication-Results, stays as written).

    Raises:
        DomainError: a label :func:`a_label` refuses, or a name over 253 characters.
    """
    text = name if name.isascii() else name.translate(_IDNA_DOTS)
    result = ".".join(a_label(label) for label in text.removesuffix(".").split("."))
    if len(result) > MAX_NAME_LENGTH:
        raise DomainError("domain too long")
    return result


def normalize(name: str) -> str | None:
    """The form domains are compared in: lower-case A-labels, no trailing dot, surrounding
    whitespace dropped; None when it cannot be a DNS name (a bad label, a space or control
    character in one, too long)."""
    if len(name) <= MAX_CACHED_NAME_LENGTH:
        return _normalized(name)
    return _normalized.__wrapped__(name)


@lru_cache(maxsize=NAME_CACHE_SIZE)
def _normalized(name: str) -> str | None:
    try:
        result = to_a_labels(name.strip()).lower()
    except DomainError:
        return None
    return result if result.isprintable() and " " not in result else None


def is_within(domain: str, ancestor: str) -> bool:
    """``domain`` is ``ancestor`` or below it; both normalised (RFC 6376 §3.5's i= and d= rule)."""
    return domain == ancestor or domain.endswith("." + ancestor)


def path_address(path: str) -> str:
    """The address of a MAIL FROM or RCPT TO path (RFC 5321 §4.1.2), "" for the null path.

    Angle brackets and the whitespace inside them go, and so does an obsolete source route
    (``<@a,@b:user@c>``, RFC 5321 §4.1.1.2 and Appendix C: to be ignored).
    """
    address = path.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if address.startswith("@") and ":" in address:  # A-d-l ":" Mailbox
        address = address.partition(":")[2]
    return address


def address_domain(address: str) -> str:
    """The normalised domain of an envelope address or path ("" for the null path, an address
    without a domain, or a domain that is no DNS name)."""
    _, at, domain = path_address(address).rpartition("@")
    return (normalize(domain) or "") if at else ""

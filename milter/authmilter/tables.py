"""OpenDKIM's KeyTable, SigningTable and host datasets (InternalHosts), read as they are written.

Formats and lookup rules follow opendkim.conf(5) and opendkim(8) "DATA SETS", and where the man page
is vague, OpenDKIM 2.11's code (``dkimf_apply_signtable``, ``dkimf_checkhost``, ``dkimf_checkip``):

- A flat file holds one entry per line: the key up to the first whitespace, then the value;
  ``#`` starts a comment anywhere on a line; blank lines are ignored; a value's fields are split by ``:``.
- ``refile:PATH`` makes the keys ``*`` wildcard patterns, tried in file order.

Everything is checked when a table loads, and a table is built whole before it is returned, so a
failed (re)load raises :class:`TableError` and the caller keeps the tables it had. Nothing here does
DNS: host names are only compared with the client name the MTA already verified.

Every loop is bounded: a table file may have at most ``MAX_LINES`` lines of at most
``MAX_LINE_LENGTH`` bytes; lookups walk at most the labels of one domain name or the prefix
lengths of one address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from authmilter.domains import is_within, normalize, path_address

# Bounds on what we read. No OpenDKIM table line needs more than a name, a domain, a selector and a
# path (OpenDKIM's own line buffer is BUFRSZ, 2 KiB); the line count is far above any real table.
MAX_LINES = 100_000
MAX_LINE_LENGTH = 4096

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
SENDER_DOMAIN = "%"
_REFILE = "refile:"
_FILE = "file:"

# RFC 6376 §3.1 (selector) and §3.5 (d=): sub-domain syntax. Underscores are allowed because
# selectors and host names with them exist in the wild and OpenDKIM accepts them.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class TableError(ValueError):
    """A table cannot be used. ``str(e)`` is ``"FILE:LINE: problem"`` (``"FILE: problem"`` when the
    whole file is at fault), saying what is wrong and what to write instead."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


@dataclass(frozen=True)
class _Line:
    source: str  # "FILE:LINE"
    fields: tuple[str, ...]  # whitespace-separated words, comment removed


def _table_path(spec: str) -> tuple[Path, bool]:
    """Split an OpenDKIM dataset spec into the file and whether it is a ``refile:``."""
    if spec.startswith(_REFILE):
        return Path(spec[len(_REFILE) :]), True
    if spec.startswith(_FILE):
        return Path(spec[len(_FILE) :]), False
    return Path(spec), False


def _read_lines(path: Path) -> list[_Line]:
    """Read a flat file into non-empty lines, within MAX_LINES and MAX_LINE_LENGTH."""
    try:
        with path.open("rb") as stream:
            raw_lines = _bounded_lines(stream, str(path))
    except OSError as e:
        raise TableError(str(path), f"cannot read the table: {e.strerror or e}") from e
    return list(_split_lines(raw_lines, str(path)))


def _bounded_lines(stream: BinaryIO, name: str) -> list[str]:
    # readline(limit) so that one endless line cannot fill memory before we notice it.
    lines: list[str] = []
    for number in range(1, MAX_LINES + 2):
        raw = stream.readline(MAX_LINE_LENGTH + 1)
        if not raw:
            break
        if number > MAX_LINES:
            raise TableError(name, f"more than {MAX_LINES} lines; split the table or check the file")
        if len(raw) > MAX_LINE_LENGTH and not raw.endswith(b"\n"):
            raise TableError(f"{name}:{number}", f"line longer than {MAX_LINE_LENGTH} bytes")
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise TableError(f"{name}:{number}", "not UTF-8 text") from e
    return lines


def _split_lines(lines: Iterable[str], name: str) -> Iterator[_Line]:
    for number, text in enumerate(lines, start=1):
        if number > MAX_LINES:
            raise TableError(name, f"more than {MAX_LINES} entries")
        if len(text.rstrip("\r\n")) > MAX_LINE_LENGTH:
            raise TableError(f"{name}:{number}", f"entry longer than {MAX_LINE_LENGTH} characters")
        fields = tuple(text.split("#", 1)[0].split())
        if fields:
            yield _Line(f"{name}:{number}", fields)


def _key_and_value(line: _Line, value_form: str) -> tuple[str, str]:
    if len(line.fields) == 1:
        raise TableError(line.source, f"'{line.fields[0]}' has no value; write '{value_form}'")
    if len(line.fields) > 2:
        raise TableError(line.source, f"unexpected text after the value; write '{value_form}'")
    return line.fields[0], line.fields[1]


def _is_domain(text: str) -> bool:
    return len(text) <= 253 and _DOMAIN_RE.fullmatch(text) is not None


def _domain_of(identity: str) -> str:
    return identity.rpartition("@")[2]


# --- KeyTable -------------------------------------------------------------------------------------

_KEY_FORM = "NAME DOMAIN:SELECTOR:/path/to/key[:ALGORITHM]"


@dataclass(frozen=True)
class KeyEntry:
    """One KeyTable line.

    Attributes:
        name: the key name the SigningTable refers to (exact, case-sensitive, as in OpenDKIM).
        domain: the signing domain (d=), lower-cased, or ``"%"``: the sender's domain.
        selector: s=, lower-cased.
        key_path: absolute path of the private key file (a relative path is taken from the
            KeyTable's directory).
        algorithm: ``"rsa-sha256"``, ``"ed25519-sha256"``, or None to detect it from the key.
        source: ``"FILE:LINE"`` of the entry, for messages.
    """

    name: str
    domain: str
    selector: str
    key_path: str
    algorithm: str | None
    source: str

    def domain_for(self, sender_domain: str) -> str:
        """The d= to sign with.

        Args:
            sender_domain: the domain the message is signed for (From, Sender or envelope).

        Returns:
            This entry's domain, or ``sender_domain`` lower-cased when the entry says ``%``.
        """
        return sender_domain.lower() if self.domain == SENDER_DOMAIN else self.domain


class KeyTable:
    """OpenDKIM's KeyTable: ``keyname  domain:selector:/path/to/key[:algorithm]``.

    Unlike OpenDKIM, a private key written inline (PEM or base64 in the table) is refused: keys
    live in files whose permissions keys.py checks.
    """

    def __init__(self, path: str, entries: Iterable[KeyEntry]) -> None:
        self.path = path
        self._entries = {entry.name: entry for entry in entries}

    @classmethod
    def load(cls, path: str) -> KeyTable:
        """Read and check a KeyTable.

        Args:
            path: the file, as written in the configuration (a ``file:`` or ``refile:`` prefix is
                accepted; key names are exact either way).

        Returns:
            The table.

        Raises:
            TableError: unreadable file, bad syntax, duplicate name, inline key, ``%`` in the key
                path, unknown algorithm.
        """
        file, _ = _table_path(path)
        entries: dict[str, KeyEntry] = {}
        for line in _read_lines(file):
            entry = _parse_key_line(line, file.parent)
            if entry.name in entries:
                raise TableError(
                    line.source,
                    f"key name '{entry.name}' is already defined at {entries[entry.name].source}; "
                    "give each key its own name",
                )
            entries[entry.name] = entry
        return cls(str(file), entries.values())

    def get(self, name: str) -> KeyEntry | None:
        """The entry named exactly ``name``, or None."""
        return self._entries.get(name)

    def __iter__(self) -> Iterator[KeyEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def _parse_key_line(line: _Line, base: Path) -> KeyEntry:
    name, value = _key_and_value(line, _KEY_FORM)
    if "*" in name:
        raise TableError(line.source, f"key name '{name}' has a '*'; key names are looked up exactly")
    fields = value.split(":")
    if len(fields) < 3 or not all(fields[:3]):
        raise TableError(line.source, f"'{value}' lacks a field; write '{_KEY_FORM}'")
    domain, selector, key = fields[0].lower(), fields[1].lower(), fields[2]
    if not key.startswith(("/", "./", "../")):
        # OpenDKIM reads such a value as the key itself (PEM or base64 DER).
        raise TableError(
            line.source,
            "inline private keys are not supported: put the key in a file readable only by the "
            "daemon and give its path (starting with '/', './' or '../')",
        )
    if len(fields) > 4:
        raise TableError(line.source, f"too many ':' fields in '{value}'; write '{_KEY_FORM}'")
    _check_key_fields(line.source, domain, selector, key)
    return KeyEntry(
        name=name,
        domain=domain,
        selector=selector,
        key_path=str(base / key) if not key.startswith("/") else key,
        algorithm=_algorithm(line.source, fields[3]) if len(fields) == 4 else None,
        source=line.source,
    )


def _check_key_fields(source: str, domain: str, selector: str, key: str) -> None:
    if domain != SENDER_DOMAIN and not _is_domain(domain):
        raise TableError(source, f"'{domain}' is not a domain name (or '%' for the sender's domain)")
    if not _is_domain(selector):
        raise TableError(source, f"'{selector}' is not a valid selector (RFC 6376 §3.1)")
    if "%" in key:
        raise TableError(
            source,
            "a '%' in the key path is not supported: every key file is checked at load, "
            "so write one KeyTable line per domain",
        )


def _algorithm(source: str, text: str) -> str:
    if text.lower() in ALGORITHMS:
        return text.lower()
    hint = " (RFC 8301 §3.1: rsa-sha1 must not be used to sign)" if text.lower() == "rsa-sha1" else ""
    raise TableError(source, f"unknown algorithm '{text}'{hint}; use {' or '.join(ALGORITHMS)}")


# --- SigningTable ---------------------------------------------------------------------------------

_SIGN_FORM = "PATTERN KEYNAME[:IDENTITY]"


@dataclass(frozen=True)
class SigningRule:
    """One SigningTable line.

    Attributes:
        key_name: a KeyTable name, or ``"%"``: the key named after the sender's domain.
        identity: the i= to sign with, as written (``%`` stands for the sender's domain), or None.
        pattern: the table key, lower-cased: a ``*`` pattern (refile) or an exact lookup key.
        source: ``"FILE:LINE"`` of the entry.
    """

    key_name: str
    identity: str | None
    pattern: str
    source: str


@dataclass(frozen=True)
class Signer:
    """A rule made concrete for one sender domain: what a signature will carry.

    Attributes:
        rule: the SigningTable entry that matched.
        key: the KeyTable entry it names.
        domain: d=, with ``%`` replaced.
        selector: s=.
        identity: i= with ``%`` replaced, or None (none given, or it is not within d=; OpenDKIM
            then leaves i= out too).
    """

    rule: SigningRule
    key: KeyEntry
    domain: str
    selector: str
    identity: str | None


class SigningTable:
    """OpenDKIM's SigningTable: which KeyTable key(s) sign mail from an address.

    Two modes, as in OpenDKIM: ``refile:PATH`` (keys are ``*`` patterns matched against
    ``user@domain`` in file order) and a plain file (exact keys, tried in OpenDKIM's order:
    ``user@host``, ``host``, then for each parent domain ``user@.parent`` and ``.parent``, then
    ``user@*`` and ``*``). Matching ignores case, like OpenDKIM's (its SigningTable is opened
    case-insensitive, local part included).
    """

    def __init__(self, path: str, refile: bool, rules: Iterable[SigningRule], key_table: KeyTable) -> None:
        self.path = path
        self.refile = refile
        self.key_table = key_table
        self._rules = tuple(rules)
        self._exact = {rule.pattern: rule for rule in self._rules}

    @classmethod
    def load(cls, path: str, key_table: KeyTable) -> SigningTable:
        """Read and check a SigningTable against its KeyTable.

        Args:
            path: as written in the configuration, with or without ``refile:`` (or ``file:``).
            key_table: the KeyTable every key name must be in (except ``%``).

        Returns:
            The table.

        Raises:
            TableError: unreadable file, bad syntax, unknown key name, duplicate entry, a pattern
                in a plain (exact) table, an identity outside the key's domain.
        """
        file, refile = _table_path(path)
        rules: list[SigningRule] = []
        seen: dict[tuple[str, str], str] = {}
        for line in _read_lines(file):
            rule = _parse_sign_line(line, refile, key_table)
            # In refile mode one pattern may name several keys (dual RSA + Ed25519 signing);
            # in an exact table OpenDKIM only ever reads the first line for a key.
            dedup = (rule.pattern, rule.key_name) if refile else (rule.pattern, "")
            if dedup in seen:
                raise TableError(rule.source, _duplicate_problem(rule, seen[dedup], refile))
            seen[dedup] = rule.source
            rules.append(rule)
        return cls(str(file), refile, rules, key_table)

    def lookup(self, address: str, multiple: bool) -> tuple[SigningRule, ...]:
        """The rules that apply to a sender address.

        Args:
            address: ``user@domain`` (angle brackets and a trailing dot are ignored; case too).
            multiple: MultipleSignatures: every match, in order, instead of the first one only.

        Returns:
            The matching rules in table order (refile) or lookup order (exact); empty if none.
        """
        parts = _split_address(address)
        if parts is None:
            return ()
        user, domain = parts
        if self.refile:
            target = f"{user}@{domain}"
            matches: Iterable[SigningRule] = (r for r in self._rules if _wildcard_match(r.pattern, target))
        else:
            matches = (self._exact[k] for k in _exact_keys(user, domain) if k in self._exact)
        if multiple:
            return tuple(matches)
        first = next(iter(matches), None)
        return () if first is None else (first,)

    def tried(self, address: str) -> str:
        """What a lookup compared, for a "not signed, because…" log line (OpenDKIM's LogWhy).

        Args:
            address: the sender address, as given to :meth:`lookup`.

        Returns:
            A short phrase such as ``"keys a@b.example, b.example, a@.example, .example, a@*, *"``.
        """
        parts = _split_address(address)
        if parts is None:
            return f"nothing: '{address}' is not user@domain"
        if self.refile:
            return f"{len(self._rules)} patterns against {parts[0]}@{parts[1]}"
        return "keys " + ", ".join(_exact_keys(*parts))

    def resolve(self, rule: SigningRule, sender_domain: str) -> Signer | None:
        """Make a rule concrete for the sender's domain (``%`` in the key name, d= and i=).

        Args:
            rule: a rule returned by :meth:`lookup`.
            sender_domain: the domain the message is signed for.

        Returns:
            The signer, or None when the rule's key name is ``%`` and the KeyTable has no key
            named after this domain (log it: OpenDKIM treats it as an unknown key).
        """
        domain = normalize(sender_domain)
        if domain is None:
            return None  # no domain name: nothing to sign for
        key = self.key_table.get(domain if rule.key_name == SENDER_DOMAIN else rule.key_name)
        if key is None:
            return None
        signing_domain = key.domain_for(domain)
        identity = rule.identity.replace(SENDER_DOMAIN, domain) if rule.identity else None
        if identity is not None and not is_within(_domain_of(identity).lower(), signing_domain):
            identity = None
        return Signer(rule=rule, key=key, domain=signing_domain, selector=key.selector, identity=identity)

    def __iter__(self) -> Iterator[SigningRule]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)


def _parse_sign_line(line: _Line, refile: bool, key_table: KeyTable) -> SigningRule:
    pattern, value = _key_and_value(line, _SIGN_FORM)
    pattern = pattern.lower()
    if not refile:
        _check_exact_key(line.source, pattern)
    key_name, _, identity = value.partition(":")
    if not key_name:
        raise TableError(line.source, f"no key name in '{value}'; write '{_SIGN_FORM}'")
    if ":" in identity:
        raise TableError(line.source, f"too many ':' fields in '{value}'; write '{_SIGN_FORM}'")
    key = key_table.get(key_name)
    if key_name != SENDER_DOMAIN and key is None:
        raise TableError(
            line.source, f"key name '{key_name}' is not in the KeyTable {key_table.path} (names are exact)"
        )
    if identity:
        _check_identity(line.source, identity, key)
    return SigningRule(key_name=key_name, identity=identity or None, pattern=pattern, source=line.source)


def _check_exact_key(source: str, key: str) -> None:
    user, at, domain = key.rpartition("@")
    if not at:
        user, domain = "", key
    if "*" in user or ("*" in domain and domain != "*"):
        raise TableError(
            source,
            f"'{key}' is a wildcard pattern, but this SigningTable is read as exact keys, so it "
            "would never match; write 'refile:' before the path in the configuration, "
            "or use 'example.com' / '.example.com' / 'user@*' / '*'",
        )
    bare = domain.removeprefix(".")
    if domain != "*" and not _is_domain(bare):
        raise TableError(source, f"'{domain}' is not a domain name")
    if at and not user:
        raise TableError(source, f"'{key}' has an empty local part; write 'user@domain' or 'domain'")


def _check_identity(source: str, identity: str, key: KeyEntry | None) -> None:
    if "@" not in identity:
        raise TableError(
            source, f"identity '{identity}' lacks '@': i= is [local-part]@domain (RFC 6376 §3.5)"
        )
    domain = _domain_of(identity).lower()
    if key is None or key.domain == SENDER_DOMAIN or SENDER_DOMAIN in domain:
        return  # known only per message: SigningTable.resolve drops an i= outside d=
    if not is_within(domain, key.domain):
        raise TableError(
            source,
            f"identity '{identity}' is not within the key's domain '{key.domain}' "
            "(RFC 6376 §3.5: i= must be d= or a subdomain of it)",
        )


def _duplicate_problem(rule: SigningRule, first: str, refile: bool) -> str:
    if refile:
        return f"'{rule.pattern}' already names key '{rule.key_name}' at {first}; remove one line"
    return (
        f"'{rule.pattern}' is already listed at {first}; an exact table uses only the first line, "
        "so for several keys per sender use 'refile:' with one line per key"
    )


def _split_address(address: str) -> tuple[str, str] | None:
    text = path_address(address)
    user, at, domain = text.rpartition("@")
    name = normalize(domain) if at and len(text) <= MAX_LINE_LENGTH else None
    if name is None:
        return None
    return user.lower(), name


def _exact_keys(user: str, domain: str) -> tuple[str, ...]:
    """OpenDKIM's exact-lookup order (``dkimf_apply_signtable``): user@host, host, then for each
    parent ``user@.parent`` and ``.parent`` in turn (the code interleaves them; the man page
    lists them grouped), then ``user@*`` and ``*``."""
    keys = [f"{user}@{domain}", domain]
    labels = domain.split(".")
    for start in range(1, len(labels)):
        parent = "." + ".".join(labels[start:])
        keys += [f"{user}@{parent}", parent]
    return (*keys, f"{user}@*", "*")


def _wildcard_match(pattern: str, text: str) -> bool:
    """``*`` matches any run of characters, everything else itself (opendkim(8) "refile").

    Greedy match with one backtrack point: O(len(pattern) * len(text)) at worst, never exponential.
    """
    p = t = 0
    star, star_t = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, star_t, p = p, t, p + 1
        elif p < len(pattern) and pattern[p] == text[t]:
            p, t = p + 1, t + 1
        elif star >= 0:
            star_t += 1
            p, t = star + 1, star_t
        else:
            return False
    return all(char == "*" for char in pattern[p:])


# --- Host datasets (InternalHosts, ExternalIgnoreList, PeerList) ----------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Key = TypeVar("_Key", str, Network)


@dataclass(frozen=True)
class HostEntry:
    """One dataset entry.

    Attributes:
        text: the entry as written.
        included: False for a ``!`` entry.
        source: ``"FILE:LINE"``.
    """

    text: str
    included: bool
    source: str


# Entries are keyed by name or network. OpenDKIM looks up "!x" before "x" at each specificity; we
# refuse a table holding both (a contradiction), so one entry per key suffices.
_Entries = dict[_Key, HostEntry]
# The probe for "any host under .domain" in HostSet.shared_client: no entry can name it.
_ANY_HOST = "*."


class HostSet:
    """An OpenDKIM host dataset: IPv4/IPv6 addresses and CIDR networks, host names, ``.domain``
    entries (every name under the domain, not the domain itself) and ``!`` exclusions.

    The most specific entry wins, as in OpenDKIM: for a name, the full name, then each parent
    ``.domain``; for an address, the longest prefix. An entry and its own negation together are
    refused (OpenDKIM lets the ``!`` one win). A name entry
    (when the MTA gave a verified name) decides before the address is looked at. OpenDKIM instead
    ORs the name and address checks, so there a ``!host`` never excludes a host whose address is
    listed; we let it exclude, which is what an exclusion is written for.
    """

    def __init__(self, names: _Entries[str], networks: _Entries[Network]) -> None:
        self._names = names
        self._networks = networks
        # Looked up on every connection: per IP version, the prefix lengths in use (longest first),
        # each with its networks keyed by the address bits under the prefix. A lookup is then one
        # shift and one dict probe per length in use, instead of a network object per length.
        by_prefix: dict[tuple[int, int], dict[int, HostEntry]] = {}
        for network, entry in networks.items():
            by_prefix.setdefault((network.version, network.prefixlen), {})[
                int(network.network_address) >> (network.max_prefixlen - network.prefixlen)
            ] = entry
        self._prefixes: dict[int, tuple[tuple[int, dict[int, HostEntry]], ...]] = {
            version: tuple(
                (max_bits - length, by_prefix[(version, length)])
                for length in sorted((n for v, n in by_prefix if v == version), reverse=True)
            )
            for version, max_bits in ((4, 32), (6, 128))
        }

    @classmethod
    def parse(cls, lines: Iterable[str], source: str, wildcards: bool = False) -> HostSet:
        """Build a set from entries, one per line (``#`` comments and blank lines are skipped).

        Args:
            lines: the entries (a file's lines, or a list from the configuration).
            source: the name messages use for these lines (a path, or e.g. ``"<config>"``).
            wildcards: the lines come from a ``refile:``, where ``*.example.com`` means every
                name under example.com (as ``.example.com`` does in a plain file).

        Returns:
            The set.

        Raises:
            TableError: a bad address or CIDR, an invalid name, a wildcard outside a refile,
                more than one entry on a line, a duplicate or contradicting entry.
        """
        names: _Entries[str] = {}
        networks: _Entries[Network] = {}
        for line in _split_lines(lines, source):
            if len(line.fields) > 1:
                raise TableError(line.source, "one entry per line: a host, .domain, address or network")
            text = line.fields[0]
            entry = HostEntry(text, not text.startswith("!"), line.source)
            key = _parse_host_entry(line.source, text.removeprefix("!"), wildcards)
            if isinstance(key, str):
                _add_unique(names, key, entry)
            else:
                _add_unique(networks, key, entry)
        return cls(names, networks)

    @classmethod
    def load(cls, path: str) -> HostSet:
        """Read a dataset file.

        Args:
            path: as written in the configuration: a path, ``file:PATH`` or ``refile:PATH``.

        Returns:
            The set.

        Raises:
            TableError: the file cannot be read, or an entry is invalid (see :meth:`parse`).
        """
        file, refile = _table_path(path)
        try:
            with file.open("rb") as stream:
                lines = _bounded_lines(stream, str(file))
        except OSError as e:
            raise TableError(str(file), f"cannot read the host list: {e.strerror or e}") from e
        return cls.parse(lines, str(file), wildcards=refile)

    def match(self, ip: str, hostname: str = "") -> HostEntry | None:
        """The entry that decides for a client, for logs ("internal: 10.0.0.0/8 at FILE:3").

        Args:
            ip: the client address as text (brackets allowed); unparseable means no address.
            hostname: the client name the MTA verified (Postfix passes "unknown" otherwise, and
                that is ignored, as is a bracketed address literal).

        Returns:
            The deciding entry (check ``included``), or None when no entry covers the client.
        """
        return self._match_name(hostname) or self._match_ip(ip)

    def contains(self, ip: str, hostname: str = "") -> bool:
        """Whether the client is in the set. Never raises; does no DNS.

        Args:
            ip: the client address as text.
            hostname: the MTA-verified client name, or "".

        Returns:
            True when the most specific covering entry is not a ``!`` entry.
        """
        entry = self.match(ip, hostname)
        return entry is not None and entry.included

    def __len__(self) -> int:
        return len(self._names) + len(self._networks)

    def entries(self) -> tuple[HostEntry, ...]:
        """Every entry, ``!`` ones included (names first, then networks)."""
        return (*self._names.values(), *self._networks.values())

    def shared_client(self, other: HostSet) -> tuple[str, HostEntry, HostEntry] | None:
        """A client both sets contain, if any: for a configuration that must keep two lists apart.

        Membership only changes where an entry starts or ends, so one probe per entry boundary (an
        address) and one per name entry (the name, or a host under a ``.domain``) finds every
        overlap the entries can express; a name in one set and its address in the other cannot be
        seen without DNS.

        Args:
            other: the second set.

        Returns:
            The client (an address, or a host name), the entry of this set and the entry of
            ``other`` that include it; None when no client is in both.
        """
        for name in self._probe_names(other):
            mine, theirs = self._match_name(name), other._match_name(name)
            if mine is not None and theirs is not None and mine.included and theirs.included:
                client = "." + name[len(_ANY_HOST) :] if name.startswith(_ANY_HOST) else name
                return (client, mine, theirs)
        for packed in self._probe_addresses(other):
            mine, theirs = self._longest_prefix(packed), other._longest_prefix(packed)
            if mine is not None and theirs is not None and mine.included and theirs.included:
                return (str(ipaddress.ip_address(packed)), mine, theirs)
        return None

    def _probe_names(self, other: HostSet) -> list[str]:
        # A ".domain" entry stands for the hosts under it: probe one no entry names ("*" is never
        # a label of an entry, so only the ".domain" entries above it decide).
        keys = {*self._names, *other._names}
        return sorted(_ANY_HOST + key[1:] if key.startswith(".") else key for key in keys)

    def _probe_addresses(self, other: HostSet) -> list[bytes]:
        bounds: set[tuple[int, int]] = set()
        for network in (*self._networks, *other._networks):
            bounds.add((network.version, int(network.network_address)))
            after = int(network.broadcast_address) + 1
            if after < 1 << network.max_prefixlen:
                bounds.add((network.version, after))
        return [value.to_bytes(4 if version == 4 else 16, "big") for version, value in sorted(bounds)]

    def _match_name(self, hostname: str) -> HostEntry | None:
        if not self._names:
            return None
        name = normalize(hostname)
        if name is None or name == "unknown" or name.startswith("["):
            return None
        labels = name.split(".")
        candidates = [name] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
        return next((self._names[c] for c in candidates if c in self._names), None)

    def _match_ip(self, ip: str) -> HostEntry | None:
        if not self._networks:  # ignore_hosts is usually empty: the address needs no parsing
            return None
        packed = packed_client_ip(ip)
        if packed is None:
            return None
        found = self._longest_prefix(packed)
        if found is None and packed[:12] == IPV4_MAPPED_PREFIX:  # RFC 4291 §2.5.5.2
            found = self._longest_prefix(packed[12:])
        return found

    def _longest_prefix(self, packed: bytes) -> HostEntry | None:
        bits = int.from_bytes(packed, "big")
        for host_bits, networks in self._prefixes[4 if len(packed) == 4 else 6]:
            found = networks.get(bits >> host_bits)
            if found is not None:
                return found
        return None


def _add_unique(table: _Entries[_Key], key: _Key, entry: HostEntry) -> None:
    other = table.get(key)
    if other is not None:
        what = "repeats" if other.included == entry.included else "contradicts"
        raise TableError(entry.source, f"'{entry.text}' {what} '{other.text}' at {other.source}")
    table[key] = entry


def _parse_host_entry(source: str, body: str, wildcards: bool) -> str | Network:
    """A lower-case name (``.domain`` kept) or a network (a single address is a /32 or /128)."""
    if wildcards and body.startswith("*."):
        body = body[1:]
    if "*" in body:
        fix = "" if wildcards else " (outside a 'refile:' the '*' is literal and never matches)"
        raise TableError(source, f"'{body}': use '.example.com' for every host under a domain{fix}")
    if _looks_like_address(body):
        return _parse_network(source, body)
    under = body.startswith(".")  # every host under the domain
    name = normalize(body.removeprefix("."))
    if name is None or not _is_domain(name):
        raise TableError(source, f"'{body}' is neither an IP address, a network nor a host name")
    return "." + name if under else name


def _looks_like_address(text: str) -> bool:
    return ":" in text or "/" in text or text.startswith("[") or re.fullmatch(r"[0-9.]+", text) is not None


def _parse_network(source: str, text: str) -> Network:
    # OpenDKIM also accepts "[address]" and "[address]/bits".
    address, _, bits = text.partition("/")
    address = address.removeprefix("[").removesuffix("]")
    spec = f"{address}/{bits}" if bits else address
    try:
        return ipaddress.ip_network(spec, strict=True)
    except ValueError as e:
        if bits and "host bits set" in str(e):
            better = ipaddress.ip_network(spec, strict=False)
            raise TableError(
                source, f"'{text}' has host bits set, so it never matches; did you mean '{better}'?"
            ) from e
        raise TableError(source, f"'{text}' is not a valid IP address or CIDR network ({e})") from e


IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # RFC 4291 §2.5.5.2


def packed_client_ip(ip: str) -> bytes | None:
    """The 4 or 16 bytes of a client address (inet_pton: every connection needs it, and the
    ipaddress module costs ten times more).

    Args:
        ip: the address as text; brackets, an ``IPv6:`` tag and a zone index are allowed.

    Returns:
        The packed address, or None when ``ip`` is not an IPv4 or IPv6 address.
    """
    text = ip.strip().removeprefix("[").removesuffix("]")
    text = text[5:] if text.lower().startswith("ipv6:") else text
    text = text.partition("%")[0]  # no zone index (RFC 4007 §11)
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):
        return None


DEFAULT_INTERNAL_HOSTS = HostSet.parse(["127.0.0.1", "::1"], "<default>")

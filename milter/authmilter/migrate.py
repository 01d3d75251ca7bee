"""``authmilter migrate``: an opendkim.conf and/or opendmarc.conf → an equivalent authmilter.toml.

Every setting found gets one verdict, printed for the administrator: carried over (to which key),
not needed (why), or not supported (what changes). Where OpenDKIM's or OpenDMARC's default
behaves differently from authmilter's, the generated config keeps the old behaviour and says so:
the result signs, skips, holds and rejects what the old pair did (docs/migrate.md lists every
mapping). Tables and datasets are referenced where they are, never copied; the one exception is
OpenDKIM's single-key mode (``Domain``, ``KeyFile``, ``Selector``), which has no table to point
at: a KeyTable and a SigningTable equivalent to it are written next to the output file.

The syntax read is opendkim.conf(5)'s, which opendmarc.conf(5) shares: one ``Name value`` per
line, the name case-insensitive, ``#`` starting a comment anywhere, no continuation lines; a
Boolean is judged by its first character (``TtYy1`` / ``FfNn0``). A dataset is a file
(``file:PATH``, ``refile:PATH``, or a value starting with ``/``), an inline comma-separated list
(``csl:LIST`` or anything else), or a database (``db:``, ``dsn:``, ``ldap:``...) that authmilter
cannot read.

The mapping functions are pure (text in, a :class:`Migration` out); :func:`check_references`
reads the files a migration refers to, as the daemon will.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from authmilter.keys import KeyFileError, load_private_key
from authmilter.resolver import parse_nameserver
from authmilter.tables import HostSet, KeyTable, SigningTable, TableError

# OpenDKIM's default for InternalHosts (opendkim.conf(5)); authmilter's default adds ::1.
OPENDKIM_INTERNAL_HOSTS = ("127.0.0.1",)
# Database dataset types (opendkim(8) "DATA SETS"); authmilter reads flat files and lists only.
_DATABASE_PREFIXES = ("db:", "dsn:", "ldap:", "ldaps:", "ldapi:", "lua:", "memcache:", "mdb:", "erlang:")
# The macros whose presence OpenDKIM's MacroList may test that authmilter treats the same way.
_AUTH_MACROS = {"auth_type", "auth_authen", "{auth_type}", "{auth_authen}"}
_DAEMON_NAME_MACROS = {"daemon_name", "{daemon_name}"}
# Where the systemd unit lets the daemon create a unix socket (RuntimeDirectory=, ReadWritePaths=).
_UNIT_SOCKET_DIRECTORIES = ("/run/authmilter/", "/var/spool/postfix/authmilter/")
# Under systemd the history goes to the unit's StateDirectory=.
SUGGESTED_HISTORY = "/var/lib/authmilter/history.jsonl"
# File names of the tables written for OpenDKIM's single-key mode, next to the output file.
SINGLE_KEY_TABLE = "KeyTable"
SINGLE_KEY_SIGNING_TABLE = "SigningTable"

Value = str | bool | int | float | list[str]


class Verdict(StrEnum):
    CARRIED = "carried over"
    NOT_NEEDED = "not needed"
    UNSUPPORTED = "not supported"
    DEFAULT = "default kept"  # the old program's default differs from authmilter's: kept
    PROBLEM = "problem"  # the setting or a file it names cannot be used as it is


@dataclass(frozen=True)
class Setting:
    """One ``Name value`` line of a config file."""

    name: str  # as written
    value: str
    source: str  # "FILE:LINE"; "FILE" for a default (not set in the file)
    default: bool = False


@dataclass(frozen=True)
class Note:
    """What became of one setting (or of a default), for the administrator."""

    source: str  # "FILE:LINE", or "FILE" for a default
    setting: str  # "Name value" as written, or "Name (default: ...)"
    verdict: Verdict
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.setting}: {self.verdict}: {self.detail}"


@dataclass(frozen=True)
class Reference:
    """A file the generated config names, to be checked as the daemon will read it."""

    kind: str  # "key_table", "signing_table", "hosts", "psl_file"
    spec: str  # the dataset as written in the TOML (refile:/file: prefix kept)
    setting: Setting
    key_table: str = ""  # for a signing table: the KeyTable it names keys from


@dataclass
class Migration:
    """The generated configuration and what became of every setting."""

    sections: dict[str, dict[str, Value]] = field(default_factory=dict)
    origins: dict[tuple[str, str], str] = field(default_factory=dict)  # (section, key) → why
    notes: list[Note] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # name next to the output → contents
    key_permissions: str = "refuse"

    def set(self, section: str, key: str, value: Value, origin: str) -> None:
        self.sections.setdefault(section, {})[key] = value
        self.origins[(section, key)] = origin

    def note(self, setting: Setting, verdict: Verdict, detail: str) -> None:
        self.notes.append(Note(setting.source, f"{setting.name} {setting.value}".strip(), verdict, detail))

    def carry(self, setting: Setting, section: str, key: str, value: Value, detail: str = "") -> None:
        origin = (
            f"{setting.source}: {setting.name} not set, its default"
            if setting.default
            else (f"{setting.source} {setting.name}")
        )
        self.set(section, key, value, origin)
        shown = f"[{section}] {key} = {_toml_value(value)}"
        verdict = Verdict.DEFAULT if setting.default else Verdict.CARRIED
        self.note(setting, verdict, f"{shown}{'; ' + detail if detail else ''}")

    @property
    def signs(self) -> bool:
        return bool(self.sections.get("signing", {}).get("key_table"))


# --- reading the files -------------------------------------------------------------------------


def parse_conf(text: str, name: str) -> list[Setting]:
    """The settings of an opendkim.conf / opendmarc.conf text, in file order.

    Args:
        text: the file's contents.
        name: the file's name, for ``FILE:LINE`` in messages.
    """
    settings = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, *value = line.split(None, 1)
        settings.append(Setting(key, value[0].strip() if value else "", f"{name}:{number}"))
    return settings


def parse_boolean(value: str) -> bool | None:
    """opendkim.conf(5): only the first character counts; None when it is neither yes nor no."""
    first = value[:1]
    if first in ("T", "t", "Y", "y", "1"):
        return True
    if first in ("F", "f", "N", "n", "0"):
        return False
    return None


@dataclass(frozen=True)
class Dataset:
    """An OpenDKIM dataset: a file (``spec`` keeps its ``refile:`` / ``file:`` prefix) or a list."""

    spec: str = ""  # for a file
    items: tuple[str, ...] = ()  # for an inline list
    database: str = ""  # the prefix of a database type authmilter cannot read


def parse_dataset(value: str) -> Dataset:
    """opendkim(8) "DATA SETS": which kind of dataset ``value`` names."""
    for prefix in _DATABASE_PREFIXES:
        if value.startswith(prefix):
            return Dataset(database=prefix.rstrip(":"))
    if value.startswith(("refile:", "file:")):
        return Dataset(spec=value)
    if value.startswith("/"):
        if value.endswith(".db"):
            return Dataset(database="db")
        return Dataset(spec=value)
    body = value.removeprefix("csl:")
    return Dataset(items=tuple(item.strip() for item in body.split(",") if item.strip()))


# --- the mapping --------------------------------------------------------------------------------

Handler = Callable[[Migration, Setting], None]


def _not_needed(why: str) -> Handler:
    return lambda migration, setting: migration.note(setting, Verdict.NOT_NEEDED, why)


def _unsupported(change: str) -> Handler:
    return lambda migration, setting: migration.note(setting, Verdict.UNSUPPORTED, change)


def _boolean(migration: Migration, setting: Setting) -> bool | None:
    value = parse_boolean(setting.value)
    if value is None:
        migration.note(setting, Verdict.PROBLEM, "not a Boolean (yes/no, true/false, 1/0): ignored")
    return value


_SYSTEMD = "systemd runs the daemon (Type=notify, Restart=on-failure) and knows its PID"


def _socket(migration: Migration, setting: Setting) -> None:
    value = setting.value
    kind, _, rest = value.partition(":")
    if kind in ("local", "unix") and rest.startswith("/"):
        spec = f"unix:{rest}"
    elif kind in ("inet", "inet6") and rest:
        port, _, host = rest.partition("@")
        # No host: OpenDKIM listens on every interface.
        spec = f"{kind}:{port}@{host or ('[::]' if kind == 'inet6' else '0.0.0.0')}"
    else:
        migration.note(
            setting, Verdict.PROBLEM, "not a socket (local:/PATH, inet:PORT@HOST): not carried over"
        )
        return
    if "socket" in migration.sections.get("milter", {}):
        kept = migration.sections["milter"]["socket"]
        migration.note(
            setting,
            Verdict.NOT_NEEDED,
            f"authmilter serves both jobs on one socket, {kept}: take this one out of the MTA's "
            "milter list (Postfix smtpd_milters, non_smtpd_milters)",
        )
        return
    detail = "point the MTA's milter list at it alone (it replaces both milters)"
    if spec.startswith("unix:") and not rest.startswith(_UNIT_SOCKET_DIRECTORIES):
        detail += (
            f"; the systemd unit can create a socket only in {' or '.join(_UNIT_SOCKET_DIRECTORIES)}: "
            "move it there or add ReadWritePaths= to a drop-in"
        )
    if spec.startswith("inet") and not rest.partition("@")[2]:
        detail += "; OpenDKIM listened on every interface without a host: consider @127.0.0.1"
    migration.carry(setting, "milter", "socket", spec, detail)


def _socket_mode(migration: Migration, setting: Setting) -> None:
    migration.note(
        setting,
        Verdict.NOT_NEEDED,
        "the unit's UMask=0007 covers files; a unix socket's mode and group are [milter] socket_mode "
        '("0660") and socket_group (e.g. "postfix")',
    )


def _user(migration: Migration, setting: Setting) -> None:
    user = setting.value.partition(":")[0]
    migration.note(
        setting,
        Verdict.NOT_NEEDED,
        f"the unit runs authmilter as User=authmilter: files only {user} could read (keys, tables) "
        "must become readable by authmilter (chown authmilter FILE; authmilter checkconf checks as "
        "that user)",
    )


def _authserv_id(migration: Migration, setting: Setting) -> None:
    """OpenDKIM's is read first; OpenDMARC's, on the DMARC result, replaces a different one."""
    value = "" if setting.value.upper() == "HOSTNAME" else setting.value
    current = migration.sections.get("milter", {}).get("authserv_id")
    detail = "" if value else "empty: this host's name"
    if current is not None and current != value:
        detail = (
            f"replaces {_toml_value(current)} (OpenDKIM's): one authserv-id for both; A-R headers "
            "naming the other are removed only if [milter] remove_authserv_ids lists it"
        )
    migration.carry(setting, "milter", "authserv_id", value, detail)


def _hosts(section: str, key: str, meaning: str) -> Handler:
    def handle(migration: Migration, setting: Setting) -> None:
        dataset = parse_dataset(setting.value)
        if dataset.database:
            migration.note(
                setting,
                Verdict.PROBLEM,
                f"a {dataset.database}: dataset: authmilter reads files and lists only; write the "
                f"entries to a file and set [{section}] {key} to it",
            )
            return
        if dataset.items:
            try:
                HostSet.parse(dataset.items, setting.source)
            except TableError as e:
                migration.note(setting, Verdict.PROBLEM, f"{e.problem}: not carried over")
                return
        value: Value = dataset.spec or list(dataset.items)
        existing = migration.sections.get(section, {}).get(key)
        if existing is not None and existing != value:
            migration.note(
                setting,
                Verdict.PROBLEM,
                f"[{section}] {key} is already {_toml_value(existing)}: it takes one dataset; merge "
                "the two into one file and name it there",
            )
            return
        if dataset.spec:
            migration.references.append(Reference("hosts", dataset.spec, setting))
        migration.carry(setting, section, key, value, meaning)

    return handle


_internal_hosts = _hosts("milter", "internal_hosts", "mail from them is signed, not verified")
_ignore_hosts = _hosts(
    "milter",
    "ignore_hosts",
    "connections from them are accepted without any processing, as before",
)


def _remove_ar_from(migration: Migration, setting: Setting) -> None:
    dataset = parse_dataset(setting.value)
    if not dataset.items:
        migration.note(
            setting,
            Verdict.PROBLEM,
            "give the host names inline (RemoveARFrom a.example,b.example): [milter] "
            "remove_authserv_ids takes a list",
        )
        return
    exact = [item for item in dataset.items if not item.startswith(".")]
    domains = [item for item in dataset.items if item.startswith(".")]
    if domains:
        migration.note(
            setting,
            Verdict.UNSUPPORTED,
            f"domain entries ({', '.join(domains)}): authmilter removes A-R headers of exact "
            "authserv-ids only; list each host",
        )
    if exact:
        migration.carry(setting, "milter", "remove_authserv_ids", exact)


def _mode(migration: Migration, setting: Setting) -> None:
    modes = set(setting.value)
    if not modes or not modes <= {"s", "v"}:
        migration.note(setting, Verdict.PROBLEM, "not a mode (s, v or sv): ignored")
        return
    if "s" not in modes:
        migration.note(
            setting,
            Verdict.CARRIED,
            "verify only: no [signing] tables are written (KeyTable and SigningTable are left out)",
        )
        return
    detail = "outbound mail (internal_hosts, SASL-authenticated clients, sign_daemon_names) is signed"
    if "v" not in modes:
        detail += "; authmilter also verifies the rest (OpenDMARC needed that; it adds only a header)"
    migration.note(setting, Verdict.CARRIED, detail)


def _table(key: str) -> Handler:
    def handle(migration: Migration, setting: Setting) -> None:
        dataset = parse_dataset(setting.value)
        if not dataset.spec:
            what = f"a {dataset.database}: database" if dataset.database else "an inline list"
            migration.note(
                setting,
                Verdict.PROBLEM,
                f"{what}: authmilter reads tables from flat files only; write it to a file in "
                "OpenDKIM's format and name it here",
            )
            return
        migration.carry(setting, "signing", key, dataset.spec, "the same file, read as it is")

    return handle


def _canonicalization(migration: Migration, setting: Setting) -> None:
    parts = setting.value.lower().split("/")
    # opendkim.conf(5): two values apply to header/body; OpenDKIM applies a single one to both.
    header, body = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if {header, body} <= {"simple", "relaxed"} and len(parts) <= 2:
        migration.carry(setting, "signing", "canonicalization", f"{header}/{body}")
    else:
        migration.note(setting, Verdict.PROBLEM, "not simple or relaxed (header/body): not carried over")


def _signature_algorithm(migration: Migration, setting: Setting) -> None:
    value = setting.value.lower()
    if value == "rsa-sha256":
        migration.note(setting, Verdict.NOT_NEEDED, "each key signs with its own algorithm (RSA: rsa-sha256)")
    elif value == "ed25519-sha256":
        migration.note(
            setting,
            Verdict.NOT_NEEDED,
            "each key signs with its own algorithm: an Ed25519 key file signs ed25519-sha256 "
            "(or add :ed25519-sha256 to its KeyTable line)",
        )
    else:
        migration.note(
            setting,
            Verdict.UNSUPPORTED,
            f"{setting.value}: authmilter signs with rsa-sha256 (RFC 8301 forbids rsa-sha1)",
        )


def _header_list(key: str) -> Handler:
    def handle(migration: Migration, setting: Setting) -> None:
        dataset = parse_dataset(setting.value)
        if not dataset.items:
            migration.note(setting, Verdict.PROBLEM, "give the header names inline (From,Subject,...)")
            return
        names = [item.lower() for item in dataset.items]
        detail = ""
        if key == "headers" and "from" not in names:
            names.insert(0, "from")
            detail = "From added: it is always signed (RFC 6376 §5.4), as OpenDKIM also did"
        migration.carry(setting, "signing", key, names, detail)

    return handle


def _macro_list(migration: Migration, setting: Setting) -> None:
    dataset = parse_dataset(setting.value)
    names: list[str] = []
    for item in dataset.items:
        macro, _, values = item.partition("=")
        if macro in _DAEMON_NAME_MACROS and values:
            names += [v for v in values.split("|") if v]
        elif macro in _AUTH_MACROS and not values:
            migration.note(
                setting,
                Verdict.CARRIED,
                f"{macro}: [milter] skip_authenticated = true (the default): SASL clients' mail is signed",
            )
        else:
            migration.note(
                setting,
                Verdict.UNSUPPORTED,
                f"{item}: authmilter decides on internal_hosts, SASL authentication and {{daemon_name}} "
                "only: mail marked by this macro alone is no longer signed",
            )
    if names:
        migration.carry(setting, "signing", "sign_daemon_names", names)


def _syslog(migration: Migration, setting: Setting) -> None:
    value = _boolean(migration, setting)
    if value:
        migration.carry(
            setting, "log", "destination", "syslog", 'or "stderr" for the journal, which systemd prefers'
        )
    elif value is not None:
        migration.carry(setting, "log", "destination", "stderr", "the journal under systemd")


def _syslog_facility(migration: Migration, setting: Setting) -> None:
    facility = setting.value.lower()
    if facility in ("mail", "daemon", "user", *(f"local{i}" for i in range(8))):
        migration.carry(setting, "log", "syslog_facility", facility)
    else:
        migration.note(
            setting, Verdict.PROBLEM, "not a facility authmilter knows (mail, daemon, user, local0-7)"
        )


def _log_why(migration: Migration, setting: Setting) -> None:
    if _boolean(migration, setting):
        migration.carry(setting, "log", "level", "debug", "says why each decision was taken")
    else:
        migration.note(setting, Verdict.NOT_NEEDED, '[log] level = "info" (the default)')


def _syslog_success(migration: Migration, setting: Setting) -> None:
    migration.note(
        setting, Verdict.NOT_NEEDED, '[log] level = "info" (the default) logs one line per message'
    )


def _nameservers(migration: Migration, setting: Setting) -> None:
    servers = [item.strip() for item in setting.value.split(",") if item.strip()]
    try:
        for server in servers:
            parse_nameserver(server)
    except ValueError as e:
        migration.note(setting, Verdict.PROBLEM, f"{e}: not carried over")
        return
    migration.carry(setting, "dns", "nameservers", servers)


def _require_safe_keys(migration: Migration, setting: Setting) -> None:
    value = _boolean(migration, setting)
    if value is None:
        return
    migration.key_permissions = "refuse" if value else "warn"
    migration.carry(
        setting,
        "signing",
        "key_permissions",
        migration.key_permissions,
        "authmilter also refuses a key its group may read (OpenDKIM allowed its own group): "
        "chmod 600 and chown authmilter"
        if value
        else "unsafe key files are logged, as OpenDKIM did",
    )


def _minimum_key_bits(migration: Migration, setting: Setting) -> None:
    try:
        bits = int(setting.value)
    except ValueError:
        migration.note(setting, Verdict.PROBLEM, "not a number")
        return
    if bits < 1024:
        migration.carry(setting, "dkim", "min_rsa_bits", 1024, "RFC 8301 §3.2 forbids accepting fewer bits")
    else:
        migration.carry(setting, "dkim", "min_rsa_bits", min(bits, 16384))


def _dns_timeout(migration: Migration, setting: Setting) -> None:
    try:
        seconds = float(setting.value)
    except ValueError:
        migration.note(setting, Verdict.PROBLEM, "not a number of seconds")
        return
    migration.carry(setting, "dns", "timeout", min(max(seconds, 0.1), 60.0))


def _flag(section: str, key: str, detail: str = "") -> Handler:
    def handle(migration: Migration, setting: Setting) -> None:
        value = _boolean(migration, setting)
        if value is not None:
            migration.carry(setting, section, key, value, detail)

    return handle


def _reject_failures(migration: Migration, setting: Setting) -> None:
    value = _boolean(migration, setting)
    if value is not None:
        _set_enforcement(migration, setting, value)


def _set_enforcement(migration: Migration, setting: Setting, enforce: bool) -> None:
    if enforce:
        migration.carry(setting, "policy", "enforce", True, "DMARC reject and quarantine are applied")
        migration.carry(setting, "policy", "dmarc_temperror", "tempfail", "451 when DNS fails, as before")
    else:
        detail = "DMARC results are only reported (Authentication-Results), as before"
        migration.carry(setting, "policy", "enforce", False, detail)
        migration.carry(setting, "policy", "dmarc_temperror", "accept", "no 4xx when DNS fails, as before")


@dataclass(frozen=True)
class _Choice:
    """What a yes/no setting of the old pair becomes: ``[section] key`` = the value for its answer,
    with the detail shown to the administrator."""

    section: str
    key: str
    if_yes: tuple[Value, str]
    if_no: tuple[Value, str]

    def carry(self, migration: Migration, setting: Setting, yes: bool) -> None:
        value, detail = self.if_yes if yes else self.if_no
        migration.carry(setting, self.section, self.key, value, detail)

    def handler(self) -> Handler:
        def handle(migration: Migration, setting: Setting) -> None:
            value = _boolean(migration, setting)
            if value is not None:
                self.carry(migration, setting, value)

        return handle


_HOLD_QUARANTINED = _Choice(
    "milter",
    "quarantine",
    ("hold", "the MTA's hold queue, as before"),
    ("header", "delivered with an X-Authmilter-Quarantine header for a later filter, not held, as before"),
)
_REQUIRED_HEADERS = _Choice(
    "policy",
    "from_error",
    ("reject", "no From, several From fields, no domain"),
    (
        "accept",
        "a message with no From, several From fields or a From without a domain is accepted, as before",
    ),
)
_REJECT_MULTI_VALUE_FROM = _Choice(
    "policy",
    "from_multiple_domains",
    ("reject", "a From field whose addresses name different domains is rejected, as before"),
    (
        "evaluate",
        "differs: OpenDMARC skipped such messages; authmilter evaluates each domain (RFC 9989 §5.3.1)",
    ),
)


def _set_skip_authenticated(migration: Migration, setting: Setting, ignored: bool) -> None:
    if ignored or migration.signs:
        detail = "SASL clients' mail is signed and not checked"
        if not ignored:
            detail += (
                "; differs: OpenDMARC checked it too, but authmilter signs it (as OpenDKIM did) "
                "and a signed message is not checked again"
            )
        migration.carry(setting, "milter", "skip_authenticated", True, detail)
    else:
        migration.carry(
            setting, "milter", "skip_authenticated", False, "SASL clients' mail is checked, as before"
        )


def _ignore_mail_from(migration: Migration, setting: Setting) -> None:
    domains = [d.strip().lower() for d in setting.value.split(",") if d.strip()]
    migration.carry(
        setting,
        "policy",
        "never_reject_domains",
        domains,
        "never rejected or held, as before; differs: still checked and reported, and subdomains count too",
    )


def _public_suffix_list(migration: Migration, setting: Setting) -> None:
    migration.carry(
        setting,
        "dmarc",
        "org_domain",
        "psl",
        "organisational domains from the Public Suffix List (RFC 7489), as before; RFC 9989's DNS "
        'tree walk is "treewalk"',
    )
    migration.carry(setting, "dmarc", "psl_file", setting.value)
    migration.references.append(Reference("psl_file", setting.value, setting))


def _history_file(migration: Migration, setting: Setting) -> None:
    migration.carry(
        setting,
        "history",
        "path",
        SUGGESTED_HISTORY,
        f"differs: JSON Lines (docs/history-schema.md), not OpenDMARC's format, so not {setting.value}: "
        "opendmarc-importstats cannot read it; the systemd unit creates /var/lib/authmilter",
    )


_PIDFILE = _not_needed(_SYSTEMD)
_SOFTWARE_HEADER = _unsupported("no DKIM-Filter / DMARC-Filter header is added any more")
_JOB_ID = _unsupported("the authserv-id is written without the queue id; the log lines carry it (queue_id=)")
_FAILURE_REPORTS = _unsupported(
    "no failure reports (RFC 9991, ruf=) are sent any more; aggregate reports come from [history]"
)

OPENDKIM_SETTINGS: dict[str, Handler] = {
    "Socket": _socket,
    "Mode": _mode,
    "Domain": lambda m, s: None,  # single-key mode: see _single_key
    "KeyFile": lambda m, s: None,
    "Selector": lambda m, s: None,
    "SubDomains": lambda m, s: None,
    "KeyTable": lambda m, s: None,  # both tables: see _signing, which knows the Mode
    "SigningTable": lambda m, s: None,
    "MultipleSignatures": _flag("signing", "multiple_signatures"),
    "InternalHosts": _internal_hosts,
    "ExternalIgnoreList": _not_needed(
        'it only silences OpenDKIM\'s "external host tried to send mail as" log line, which '
        "authmilter does not write; those hosts' mail is still verified, not skipped"
    ),
    "PeerList": _ignore_hosts,
    "Canonicalization": _canonicalization,
    "SignatureAlgorithm": _signature_algorithm,
    "OversignHeaders": _header_list("oversign_headers"),
    "SignHeaders": _header_list("headers"),
    "MacroList": _macro_list,
    "AuthservID": _authserv_id,
    "AuthservIDWithJobID": _JOB_ID,
    "AlwaysAddARHeader": _not_needed("authmilter always adds Authentication-Results to mail it verifies"),
    "RemoveARFrom": _remove_ar_from,
    "RemoveOldSignatures": _unsupported(
        "existing DKIM-Signature fields are kept when signing (they do no harm: verifiers check each)"
    ),
    "RequireSafeKeys": _require_safe_keys,
    "UserID": _user,
    "UMask": _socket_mode,
    "Syslog": _syslog,
    "SyslogFacility": _syslog_facility,
    "SyslogSuccess": _syslog_success,
    "LogWhy": _log_why,
    "Nameservers": _nameservers,
    "TrustAnchorFile": _unsupported(
        "authmilter does not validate DNSSEC itself: put a validating resolver (e.g. unbound on "
        "127.0.0.1) in [dns] nameservers"
    ),
    "MinimumKeyBits": _minimum_key_bits,
    "DNSTimeout": _dns_timeout,
    "PidFile": _PIDFILE,
    "Background": _PIDFILE,
    "AutoRestart": _PIDFILE,
    "AutoRestartCount": _PIDFILE,
    "AutoRestartRate": _PIDFILE,
    "SoftwareHeader": _SOFTWARE_HEADER,
    "Include": _unsupported("migrate does not follow Include: run it on the included file's settings too"),
}

OPENDMARC_SETTINGS: dict[str, Handler] = {
    "Socket": _socket,
    "AuthservID": _authserv_id,
    "AuthservIDWithJobID": _JOB_ID,
    "TrustedAuthservIDs": _not_needed(
        "authmilter checks SPF and DKIM itself and trusts no incoming Authentication-Results"
    ),
    "IgnoreHosts": _ignore_hosts,
    "IgnoreMailFrom": _ignore_mail_from,
    "IgnoreAuthenticatedClients": lambda m, s: None,  # see _opendmarc_defaults: signing decides
    "RejectFailures": _reject_failures,
    "RejectMultiValueFrom": _REJECT_MULTI_VALUE_FROM.handler(),
    "RequiredHeaders": _REQUIRED_HEADERS.handler(),
    "SPFSelfValidate": _not_needed("authmilter always checks SPF itself ([spf] enabled)"),
    "SPFIgnoreResults": _not_needed("authmilter never takes SPF results from incoming headers"),
    "HistoryFile": _history_file,
    "HoldQuarantinedMessages": _HOLD_QUARANTINED.handler(),
    "PublicSuffixList": _public_suffix_list,
    "FailureReports": _FAILURE_REPORTS,
    "FailureReportsBcc": _FAILURE_REPORTS,
    "FailureReportsOnNone": _FAILURE_REPORTS,
    "FailureReportsSentBy": _FAILURE_REPORTS,
    "CopyFailuresTo": _unsupported("failing messages are no longer copied to that address"),
    "RejectString": _unsupported(
        "the reply is authmilter's own: 550 5.7.26 naming the domain and why (actions.py)"
    ),
    "SoftwareHeader": _SOFTWARE_HEADER,
    "RecordAllMessages": _not_needed("[history] records every message DMARC evaluated"),
    "IgnoreMailTo": _unsupported("messages to these addresses are recorded in [history] too"),
    "UserID": _user,
    "UMask": _socket_mode,
    "Syslog": _syslog,
    "SyslogFacility": _syslog_facility,
    "DNSTimeout": _dns_timeout,
    "PidFile": _PIDFILE,
    "Background": _PIDFILE,
    "AutoRestart": _PIDFILE,
    "AutoRestartCount": _PIDFILE,
    "AutoRestartRate": _PIDFILE,
}


def migrate(opendkim: tuple[str, str] | None, opendmarc: tuple[str, str] | None) -> Migration:
    """Map the old configs onto authmilter's.

    Args:
        opendkim: (file name, contents) of opendkim.conf, or None.
        opendmarc: (file name, contents) of opendmarc.conf, or None.

    Returns:
        the sections to write, a note for every setting found and for every default kept, the
        files the config refers to (to check), and the tables to write for single-key mode.
    """
    migration = Migration()
    if opendkim:
        dkim_settings = _apply(migration, opendkim, OPENDKIM_SETTINGS)
        _signing(migration, dkim_settings)
        _opendkim_defaults(migration, opendkim[0], dkim_settings)
    if opendmarc:
        dmarc_settings = _apply(migration, opendmarc, OPENDMARC_SETTINGS)
        _opendmarc_defaults(migration, opendmarc[0], dmarc_settings)
    else:
        _without_opendmarc(migration, opendkim[0] if opendkim else "")
    return migration


def _apply(migration: Migration, conf: tuple[str, str], handlers: dict[str, Handler]) -> dict[str, Setting]:
    """Each setting through its handler; returns the settings by canonical name (the last wins)."""
    name, text = conf
    canonical = {key.lower(): key for key in handlers}
    found: dict[str, Setting] = {}
    for setting in parse_conf(text, name):
        key = canonical.get(setting.name.lower())
        if key is None:
            migration.note(
                setting,
                Verdict.UNSUPPORTED,
                "authmilter has no such setting (see docs/migrate.md); nothing is carried over",
            )
            continue
        if key in found:
            migration.note(found[key], Verdict.NOT_NEEDED, f"given again at {setting.source}, which wins")
        found[key] = setting
    for key, setting in found.items():
        handlers[key](migration, setting)
    return found


def _signing(migration: Migration, settings: dict[str, Setting]) -> None:
    """Signing tables: OpenDKIM's KeyTable/SigningTable, or the single-key mode's equivalents."""
    mode = settings.get("Mode")
    tables = [settings[k] for k in ("KeyTable", "SigningTable") if k in settings]
    single = [settings[k] for k in ("Domain", "KeyFile", "Selector", "SubDomains") if k in settings]
    if mode is not None and set(mode.value) == {"v"}:
        for setting in (*tables, *single):
            migration.note(setting, Verdict.NOT_NEEDED, f"Mode {mode.value}: OpenDKIM did not sign")
        return
    if "KeyTable" in settings:
        for setting in single:
            migration.note(setting, Verdict.NOT_NEEDED, "OpenDKIM ignores it when a KeyTable is set")
        if "SigningTable" not in settings:
            migration.note(settings["KeyTable"], Verdict.PROBLEM, "no SigningTable: nothing would be signed")
            return
        _table("key_table")(migration, settings["KeyTable"])
        _table("signing_table")(migration, settings["SigningTable"])
        _check_tables(migration, settings["KeyTable"], settings["SigningTable"])
        return
    if "SigningTable" in settings:
        migration.note(settings["SigningTable"], Verdict.PROBLEM, "no KeyTable: nothing would be signed")
    if single:
        _single_key(migration, settings)
    elif "SubDomains" in settings:
        migration.note(settings["SubDomains"], Verdict.NOT_NEEDED, "no Domain: nothing to apply it to")


def _check_tables(migration: Migration, key_table: Setting, signing_table: Setting) -> None:
    signing = migration.sections.get("signing", {})
    if "key_table" in signing and "signing_table" in signing:
        keys = str(signing["key_table"])
        migration.references.append(Reference("key_table", keys, key_table))
        migration.references.append(
            Reference("signing_table", str(signing["signing_table"]), signing_table, key_table=keys)
        )


def _single_key(migration: Migration, settings: dict[str, Setting]) -> None:
    """Domain + KeyFile + Selector → a one-key KeyTable and a SigningTable, written beside the output."""
    missing = [k for k in ("Domain", "KeyFile", "Selector") if k not in settings]
    if missing:
        for key in ("Domain", "KeyFile", "Selector"):
            if key in settings:
                migration.note(
                    settings[key],
                    Verdict.PROBLEM,
                    f"single-key mode needs Domain, KeyFile and Selector; {', '.join(missing)} missing: "
                    "nothing is signed",
                )
        return
    domains = parse_dataset(settings["Domain"].value)
    if not domains.items:
        migration.note(
            settings["Domain"],
            Verdict.PROBLEM,
            "a Domain file: list the domains inline (Domain a.example,b.example), or write a "
            "SigningTable for them",
        )
        return
    sub = settings.get("SubDomains")
    subdomains = sub is not None and bool(parse_boolean(sub.value))
    selector, key_file = settings["Selector"].value, settings["KeyFile"].value
    key_lines, sign_lines = [], []
    for domain in (d.lower() for d in domains.items):
        key_lines.append(f"{domain} {domain}:{selector}:{key_file}")
        sign_lines.append(f"*@{domain} {domain}")
        if subdomains:
            sign_lines.append(f"*@*.{domain} {domain}")
    header = "# Written by authmilter migrate from OpenDKIM's single-key mode (Domain, KeyFile, Selector).\n"
    migration.files[SINGLE_KEY_TABLE] = header + "\n".join(key_lines) + "\n"
    migration.files[SINGLE_KEY_SIGNING_TABLE] = header + "\n".join(sign_lines) + "\n"
    for key in ("Domain", "KeyFile", "Selector", "SubDomains"):
        if key in settings:
            migration.note(
                settings[key],
                Verdict.CARRIED,
                f"{SINGLE_KEY_TABLE} and {SINGLE_KEY_SIGNING_TABLE} written next to the output "
                "([signing] key_table, signing_table), signing as before",
            )
    origin = f"{settings['KeyFile'].source} single-key mode"
    migration.set("signing", "key_table", SINGLE_KEY_TABLE, origin)
    migration.set("signing", "signing_table", f"refile:{SINGLE_KEY_SIGNING_TABLE}", origin)
    _check_tables(migration, settings["KeyFile"], settings["Domain"])


def _default(migration: Migration, name: str, setting: str, detail: str) -> None:
    migration.notes.append(Note(name, setting, Verdict.DEFAULT, detail))


def _default_setting(name: str, key: str, value: str) -> Setting:
    return Setting(key, f"(not set: {value})", name, default=True)


def _opendkim_defaults(migration: Migration, name: str, settings: dict[str, Setting]) -> None:
    if "InternalHosts" not in settings:
        migration.set(
            "milter", "internal_hosts", list(OPENDKIM_INTERNAL_HOSTS), f"{name}: OpenDKIM's default"
        )
        _default(
            migration,
            name,
            "InternalHosts (not set: 127.0.0.1)",
            '[milter] internal_hosts = ["127.0.0.1"]: authmilter\'s default also signs mail from ::1',
        )
    if not migration.signs:
        return
    if "Canonicalization" not in settings:
        migration.set("signing", "canonicalization", "simple/simple", f"{name}: OpenDKIM's default")
        _default(
            migration,
            name,
            "Canonicalization (not set: simple)",
            '[signing] canonicalization = "simple/simple"; authmilter\'s default "relaxed/relaxed" '
            "survives more forwarding",
        )
    if "OversignHeaders" not in settings:
        migration.set("signing", "oversign_headers", [], f"{name}: OpenDKIM's default")
        _default(
            migration,
            name,
            "OversignHeaders (not set: none)",
            "[signing] oversign_headers = []; authmilter's default oversigns From, To, Subject... "
            "(RFC 6376 §8.15), which protects better",
        )


def _opendmarc_defaults(migration: Migration, name: str, settings: dict[str, Setting]) -> None:
    """OpenDMARC's defaults where authmilter's differ, set to OpenDMARC's."""
    if "RejectFailures" not in settings:
        _set_enforcement(migration, _default_setting(name, "RejectFailures", "false"), False)
    if "HoldQuarantinedMessages" not in settings:
        _HOLD_QUARANTINED.carry(migration, _default_setting(name, "HoldQuarantinedMessages", "false"), False)
    if "RequiredHeaders" not in settings:
        _REQUIRED_HEADERS.carry(migration, _default_setting(name, "RequiredHeaders", "false"), False)
    if "RejectMultiValueFrom" not in settings:
        _REJECT_MULTI_VALUE_FROM.carry(
            migration, _default_setting(name, "RejectMultiValueFrom", "false"), False
        )
    ignore = settings.get("IgnoreAuthenticatedClients")
    if ignore is None:
        _set_skip_authenticated(
            migration, _default_setting(name, "IgnoreAuthenticatedClients", "false"), False
        )
    elif (value := _boolean(migration, ignore)) is not None:
        _set_skip_authenticated(migration, ignore, value)
    if "PublicSuffixList" not in settings:
        _default(
            migration,
            name,
            "PublicSuffixList (not set)",
            "differs: OpenDMARC then compared exact domains only; authmilter finds organisational "
            'domains with RFC 9989\'s DNS tree walk ([dmarc] org_domain = "treewalk")',
        )
    if "AuthservID" not in settings:
        _default(
            migration,
            name,
            "AuthservID (not set: the MTA's name)",
            "[milter] authserv_id empty: this host's name; set it to the name your old headers carry",
        )


def _without_opendmarc(migration: Migration, name: str) -> None:
    """No OpenDMARC before: DMARC was not applied, so it is only reported now."""
    setting = Setting("DMARC", "(no opendmarc.conf: not applied)", name, default=True)
    migration.carry(
        setting, "policy", "enforce", False, "DMARC is reported, never applied, as without OpenDMARC"
    )
    migration.carry(setting, "policy", "dmarc_temperror", "accept", "no 4xx when DNS fails")
    migration.carry(setting, "policy", "from_error", "accept", "a bad From is not rejected")


# --- the output ---------------------------------------------------------------------------------

_SECTION_ORDER = ("milter", "log", "dns", "spf", "dkim", "dmarc", "policy", "history", "signing")


def render_toml(migration: Migration, sources: str) -> str:
    """The config file: each key with a comment saying where it came from."""
    lines = [
        f"# authmilter configuration written by `authmilter migrate` from {sources}.",
        "# Every key not written here has authmilter's default (conf/authmilter.toml documents each);",
        "# docs/migrate.md says what became of each OpenDKIM / OpenDMARC setting.",
        "# Check it with: authmilter checkconf --config FILE",
    ]
    for section in sorted(migration.sections, key=_SECTION_ORDER.index):
        lines += ["", f"[{section}]"]
        for key, value in migration.sections[section].items():
            lines.append(f"# from {migration.origins[(section, key)]}")
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's


# --- the files referred to (I/O) -----------------------------------------------------------------


def check_references(migration: Migration, base: Path) -> list[Note]:
    """Read every table, dataset and key file the migration names, as the daemon will.

    Args:
        migration: the result of :func:`migrate`.
        base: the folder relative names are taken from (the output file's).

    Returns:
        a PROBLEM note for each unusable file (also appended to ``migration.notes``).
    """
    found = []
    for reference in migration.references:
        if reference.kind == "psl_file":
            _check_psl_file(migration, reference)
            continue
        problem = _reference_problem(reference, base, migration.key_permissions)
        if problem:
            note = Note(reference.setting.source, reference.setting.name, Verdict.PROBLEM, problem)
            migration.notes.append(note)
            found.append(note)
    if not found:
        found.extend(_keep_host_lists_apart(migration, base))
    return found


def _keep_host_lists_apart(migration: Migration, base: Path) -> list[Note]:
    """A client in both ignore_hosts and internal_hosts: resolved as OpenDKIM and OpenDMARC did.

    They look at PeerList / IgnoreHosts first, so such a client was left alone; authmilter refuses
    a client in both lists. An inline internal_hosts gets a ``!`` exclusion for each ignored entry
    it covers (the most specific entry wins), or loses an entry the ignored list repeats; a dataset
    file is not changed here, so the overlap is left as a problem to resolve by hand.

    Returns:
        a PROBLEM note when the lists still share a client (also appended to ``migration.notes``).
    """
    milter = migration.sections.get("milter", {})
    internal, ignored = milter.get("internal_hosts"), milter.get("ignore_hosts")
    if not (isinstance(internal, str | list) and isinstance(ignored, str | list) and internal and ignored):
        return []
    ignored_set, internal_set = _host_set(ignored, base), _host_set(internal, base)
    if ignored_set.shared_client(internal_set) is None:
        return []
    source = migration.origins.get(("milter", "internal_hosts"), "")
    if isinstance(internal, list):
        plain = [entry.text.replace("*.", ".", 1) for entry in ignored_set.entries() if entry.included]
        covered = [text for text in plain if _host_set([text], base).shared_client(internal_set)]
        kept = [item for item in internal if item not in covered]
        exclusions = [f"!{text}" for text in covered if text not in internal]
        milter["internal_hosts"] = kept + exclusions
        internal_set = _host_set(kept + exclusions, base)
        if ignored_set.shared_client(internal_set) is None:
            change = ", ".join([*exclusions, *(f"{text} removed" for text in covered if text in internal)])
            migration.notes.append(
                Note(
                    source,
                    "internal_hosts",
                    Verdict.CARRIED,
                    f"{change}: clients in both lists were left alone by the old pair (its ignore "
                    "list is checked first), and still are",
                )
            )
            return []
    client, _, _ = ignored_set.shared_client(internal_set) or ("", None, None)
    note = Note(
        source,
        "internal_hosts",
        Verdict.PROBLEM,
        f"client {client} is in ignore_hosts and internal_hosts, which authmilter refuses; the old "
        f"pair left it alone: add a '!' line for it to {internal} or remove it from one list",
    )
    migration.notes.append(note)
    return [note]


def _host_set(value: str | list[str], base: Path) -> HostSet:
    if isinstance(value, str):
        return HostSet.load(_absolute(value, base))
    return HostSet.parse(value, "<migrated>")


def _check_psl_file(migration: Migration, reference: Reference) -> None:
    """A missing list is no reason to stop: the copy bundled with authmilter serves instead."""
    if Path(reference.spec).is_file():
        return
    del migration.sections["dmarc"]["psl_file"]
    migration.notes.append(
        Note(
            reference.setting.source,
            reference.setting.name,
            Verdict.NOT_NEEDED,
            f"{reference.spec} does not exist: [dmarc] psl_file is left out, the list bundled with "
            "authmilter is used",
        )
    )


def _reference_problem(reference: Reference, base: Path, permissions: str) -> str:
    spec = _absolute(reference.spec, base)
    try:
        if reference.kind == "hosts":
            HostSet.load(spec)
        elif reference.kind == "key_table":
            table = KeyTable.load(spec)
            for entry in table:
                load_private_key(entry.key_path, entry.algorithm, permissions=permissions)
        else:
            SigningTable.load(spec, KeyTable.load(_absolute(reference.key_table, base)))
    except (TableError, KeyFileError) as e:
        return str(e)
    return ""


def _absolute(spec: str, base: Path) -> str:
    prefix = next((p for p in ("refile:", "file:") if spec.startswith(p)), "")
    path = Path(spec[len(prefix) :])
    return prefix + str(path if path.is_absolute() else base / path)


__all__ = [
    "Migration",
    "Note",
    "Verdict",
    "check_references",
    "migrate",
    "parse_boolean",
    "parse_conf",
    "parse_dataset",
    "render_toml",
]

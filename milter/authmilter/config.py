"""The TOML configuration: parsed into a frozen, validated tree of each check's own settings.

Each check owns its settings dataclass (``SpfSettings`` in spf_check, ``DmarcSettings`` in dmarc…);
this module maps one TOML table onto each and validates every key: unknown keys, wrong types,
values out of range and unknown choices are errors that name the file, the line and the key.
Loading has no side effects, so a failed reload leaves the running configuration untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import ipaddress
import logging
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from authmilter.actions import FailureAction, PolicySettings
from authmilter.arc_check import ArcSettings, normalise_sealers
from authmilter.authresults import sanitize_authserv_id
from authmilter.dkim_sign import (
    SigningSettings,
    check_header_names,
)
from authmilter.dkim_verify import DkimSettings
from authmilter.dmarc import DmarcSettings
from authmilter.domains import normalize
from authmilter.history import HistorySettings
from authmilter.keys import KeyFileError, load_private_key
from authmilter.reports import ReportsSettings, SettingProblem, check_setting
from authmilter.resolver import DnsSettings, parse_nameserver
from authmilter.settings import bounds_of, choice_problem, choices_of, range_problem
from authmilter.spf_check import SpfSettings
from authmilter.tables import DEFAULT_INTERNAL_HOSTS, HostEntry, HostSet, KeyTable, SigningTable, TableError

log = logging.getLogger(__name__)

# What an empty config gives for [milter] internal_hosts (tables.DEFAULT_INTERNAL_HOSTS).
DEFAULT_INTERNAL_HOST_ENTRIES = ("127.0.0.1", "::1")


class ConfigError(ValueError):
    """The configuration is invalid; the message says where (file:line) and what is wrong."""


class _SettingError(ConfigError):
    """A setting whose value (a file it names) is unusable; parse_config adds the line."""

    def __init__(self, path: str, section: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: [{section}] {key}: {problem}")
        self.section = section
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class MilterSettings:
    """Section ``[milter]``.

    Attributes:
        socket: where the daemon listens (``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:PATH``).
        socket_mode: permissions of a unix socket, octal text (e.g. "0660").
        socket_group: group of a unix socket (e.g. "postfix"); empty = the daemon's group.
        workers: worker processes; 0 = one per CPU.
        max_connections: MTA connections one worker serves at once (an MTA holds one per SMTP
            session); beyond it, and beyond what the descriptor limit allows, a new connection is
            closed at once so that the MTA applies its milter_default_action.
        shutdown_timeout: seconds in-flight messages get to finish on SIGTERM.
        authserv_id: the name in our Authentication-Results (RFC 8601 §2.5); empty = this host's name.
        max_headers: header fields kept per message; more are dropped and the message is still checked.
        body_memory_limit: the most body bytes a message may hold in memory. The body is never kept
            (it is hashed for DKIM as it arrives, dkim_body.py): a message holds one milter chunk
            (64 KiB) at most, below the smallest value allowed, whatever its size.
        quarantine: how quarantine is applied: "hold" (the MTA's hold queue, via the milter
            quarantine action) or "header" (an X-Authmilter-Quarantine header is added).
        internal_hosts: the clients whose mail is outbound (signed, not verified), in OpenDKIM's
            dataset syntax: a list of entries (addresses, CIDR networks, host names, ``.domain``,
            ``!`` exclusions), or the path of a dataset file (``refile:`` allowed). The parsed set
            is ``Config.internal_hosts``.
        skip_authenticated: mail from SASL-authenticated clients is outbound too (signed, not
            verified); false: it is verified like inbound mail.
        ignore_hosts: the clients whose connections are accepted without any processing (no
            verification, no signing, no A-R removal, no history), as OpenDKIM's PeerList and
            OpenDMARC's IgnoreHosts; same syntax as ``internal_hosts``, parsed into
            ``Config.ignore_hosts``. A client in both lists is a configuration error.
        remove_authserv_ids: further authserv-ids (e.g. the site's other hosts) whose incoming
            Authentication-Results are removed like those with ours (OpenDKIM's RemoveARFrom).
        idle_timeout: seconds a milter connection may stay silent before libmilter closes it
            (smfi_settimeout): at once for one stalled inside a command, at libmilter's sweep of
            idle sessions (every 600 s in Debian's worker-pool build) for one idle between
            commands. It must outlast the longest silence of a legitimate session: Postfix sends
            nothing while its client is between commands (up to smtpd_timeout, 300 s) or sending
            DATA, so the default is twice that.
        status_file: where the supervisor keeps its PID and the outcome of its start and of each
            reload, for ``authmilter reload``; empty: ``$RUNTIME_DIRECTORY/status`` under systemd.
    """

    socket: str = "inet:8990@127.0.0.1"
    socket_mode: str = "0660"
    socket_group: str = ""
    workers: int = 0
    max_connections: int = 4096
    shutdown_timeout: float = 30.0
    authserv_id: str = ""
    max_headers: int = 1000
    body_memory_limit: int = 1048576
    quarantine: str = "hold"
    internal_hosts: tuple[str, ...] | str = DEFAULT_INTERNAL_HOST_ENTRIES
    skip_authenticated: bool = True
    ignore_hosts: tuple[str, ...] | str = ()
    remove_authserv_ids: tuple[str, ...] = ()
    idle_timeout: int = 600
    status_file: str = ""


@dataclass(frozen=True)
class LogSettings:
    """Section ``[log]``.

    Attributes:
        destination: "stderr" (journald under systemd) or "syslog".
        level: "debug", "info", "warning" or "error".
        syslog_facility: the facility for "syslog" (e.g. "mail", "local0").
        format: "text" (``key=value`` lines) or "json" (one JSON object per record, for
            journald and log shippers).
    """

    destination: str = "stderr"
    level: str = "info"
    syslog_facility: str = "mail"
    format: str = "text"


@dataclass(frozen=True)
class MetricsSettings:
    """Section ``[metrics]``.

    Attributes:
        listen: where the Prometheus endpoint listens, ``HOST:PORT`` or ``[IPv6]:PORT``; empty:
            no metrics (nothing is measured). Read at start only: a reload keeps the address.
    """

    listen: str = ""

    @property
    def address(self) -> tuple[str, int] | None:
        """``listen`` as (host, port); None when metrics are off."""
        return listen_address(self.listen) if self.listen else None


@dataclass(frozen=True)
class Config:
    path: str
    milter: MilterSettings = field(default_factory=MilterSettings)
    log: LogSettings = field(default_factory=LogSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    spf: SpfSettings = field(default_factory=SpfSettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    dmarc: DmarcSettings = field(default_factory=DmarcSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    arc: ArcSettings = field(default_factory=ArcSettings)
    reports: ReportsSettings = field(default_factory=ReportsSettings)

    @functools.cached_property
    def internal_hosts(self) -> HostSet:
        """``[milter] internal_hosts`` parsed (read, for a file); checked once by parse_config.

        Raises:
            ConfigError: an invalid entry, or an unreadable dataset file.
        """
        if self.milter.internal_hosts == DEFAULT_INTERNAL_HOST_ENTRIES:
            return DEFAULT_INTERNAL_HOSTS
        return self._host_set("internal_hosts", self.milter.internal_hosts)

    @functools.cached_property
    def ignore_hosts(self) -> HostSet:
        """``[milter] ignore_hosts`` parsed (read, for a file); checked once by parse_config.

        Raises:
            ConfigError: an invalid entry, or an unreadable dataset file.
        """
        return self._host_set("ignore_hosts", self.milter.ignore_hosts)

    def _host_set(self, key: str, spec: tuple[str, ...] | str) -> HostSet:
        try:
            if isinstance(spec, str):
                return HostSet.load(spec)
            return HostSet.parse(spec, f"{self.path}:[milter].{key}")
        except TableError as e:
            raise _SettingError(self.path, "milter", key, str(e)) from None

    @functools.cached_property
    def signing_table(self) -> SigningTable | None:
        """The SigningTable (with its KeyTable), every key file checked; None without signing.

        Keys are loaded here only to check them (type, size, permissions; a "warn" is logged);
        the Config keeps paths, never key material: each worker loads its own (keys.KeyCache).

        Raises:
            ConfigError: a table or key is unusable; the message names the table's file and line.
        """
        return _load_signing_table(self.signing, self.path)

    @functools.cached_property
    def authserv_id(self) -> str:
        """The configured id, else this host's name (RFC 8601 §2.5 recommends a host name)."""
        if self.milter.authserv_id:
            return self.milter.authserv_id
        try:
            return sanitize_authserv_id(socket.gethostname())
        except ValueError:
            return "localhost"


SECTIONS: dict[str, type[Any]] = {
    "milter": MilterSettings,
    "log": LogSettings,
    "dns": DnsSettings,
    "spf": SpfSettings,
    "dkim": DkimSettings,
    "dmarc": DmarcSettings,
    "policy": PolicySettings,
    "history": HistorySettings,
    "signing": SigningSettings,
    "metrics": MetricsSettings,
    "arc": ArcSettings,
    "reports": ReportsSettings,
}

# Numeric bounds, inclusive, of the settings defined here. A section defined elsewhere declares its
# bounds and choices on its own fields (settings.py), where they are read from.
RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("milter", "max_headers"): (10, 100000),
    ("milter", "workers"): (0, 64),
    ("milter", "max_connections"): (1, 1_000_000),
    ("milter", "shutdown_timeout"): (1, 600),
    ("milter", "body_memory_limit"): (65536, 1 << 30),
    # Up to libmilter's own default (7210 s, what Sendmail's 1 h command timeout needs).
    ("milter", "idle_timeout"): (1, 7210),
}

CHOICES: dict[tuple[str, str], frozenset[str]] = {
    ("milter", "quarantine"): frozenset({"hold", "header"}),
    ("log", "destination"): frozenset({"stderr", "syslog"}),
    ("log", "level"): frozenset({"debug", "info", "warning", "error"}),
    ("log", "syslog_facility"): frozenset({"mail", "daemon", "user", *(f"local{i}" for i in range(8))}),
    ("log", "format"): frozenset({"text", "json"}),
}

# [milter] keys in OpenDKIM's host dataset syntax: a list of entries, or a dataset file's name.
HOST_LIST_KEYS = {("milter", "internal_hosts"), ("milter", "ignore_hosts")}
# Keys whose values are file names: relative names are taken from the config file's folder.
PATH_KEYS = {("dns", "zone_files"), ("dmarc", "psl_file")}
# OpenDKIM dataset names ("refile:PATH", "file:PATH" or PATH): made absolute, read by the loaders.
DATASET_KEYS = {("signing", "key_table"), ("signing", "signing_table")}


# The embedded default, conf/authmilter.toml, installed with the package under this name (in the
# source tree a symlink to it, so there is one copy): `authmilter run` without a config file.
PACKAGED_CONFIG = "authmilter.toml"


def packaged_config_path() -> Path:
    """The default config file installed with the package (verify only, loopback socket)."""
    return Path(str(importlib.resources.files("authmilter").joinpath(PACKAGED_CONFIG)))


def default_config() -> Config:
    """The built-in defaults (what an empty config file gives)."""
    return _with_report_defaults(Config(path="<defaults>"))


def load_config(path: str | Path) -> Config:
    """Read and validate a config file.

    Raises:
        ConfigError: unreadable file, TOML syntax error, or an invalid key; the message names
            the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: config file is not UTF-8 (byte {e.start})") from e
    return parse_config(text, path)


def parse_config(text: str, path: str | Path) -> Config:
    """Validate config text; ``path`` is used in messages and for relative file names."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_toml_error(path, e)) from e
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in SECTIONS:
            known = ", ".join(f"[{s}]" for s in SECTIONS)
            raise ConfigError(f"{_where(path, text, name, None)}unknown section [{name}] (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{_where(path, text, name, None)}{name} must be a [table]")
        sections[name] = _build_section(name, table, path, text)
    config = Config(path=str(path), **sections)
    try:
        config = _with_report_defaults(config)
    except SettingProblem as e:
        raise ConfigError(f"{_where(path, text, 'reports', e.key)}[reports] {e.key}: {e}") from None
    try:
        # Read the datasets, tables and keys now (cached on the Config), so that a bad one
        # refuses the (re)load instead of failing messages.
        _ = config.internal_hosts, config.ignore_hosts, config.signing_table
    except _SettingError as e:
        raise ConfigError(
            f"{_where(path, text, e.section, e.key)}[{e.section}] {e.key}: {e.problem}"
        ) from None
    _check_host_lists_apart(config, path, text)
    _check_arc(config, path, text)
    return config


def _check_arc(config: Config, path: Path, text: str) -> None:
    """``[arc] seal`` needs its d=, s= and a usable RSA key (checked as signing keys are), and a
    chain validation to record (cv=) on the inbound mail it seals."""
    settings = config.arc
    if not settings.seal:
        return
    for key in ("signing_domain", "selector", "key_file"):
        if not getattr(settings, key):
            raise ConfigError(f"{_where(path, text, 'arc', 'seal')}[arc] seal = true needs {key}")
    if settings.seals(outbound=False) and not settings.verify:
        raise ConfigError(
            f"{_where(path, text, 'arc', 'verify')}[arc] verify = false: sealing inbound mail needs the "
            'chain validated (cv=); set verify = true or seal_mail = "outbound"'
        )
    try:
        load_private_key(settings.key_file, "rsa-sha256", permissions=config.signing.key_permissions)
    except KeyFileError as e:
        raise ConfigError(f"{_where(path, text, 'arc', 'key_file')}[arc] key_file: {e}") from None


def _check_host_lists_apart(config: Config, path: Path, text: str) -> None:
    """A client in ``ignore_hosts`` and ``internal_hosts`` would be skipped where the other list
    says sign it: refused, naming the entry of each list (its dataset file's line, or the
    config file's line of an inline list)."""
    shared = config.ignore_hosts.shared_client(config.internal_hosts)
    if shared is None:
        return
    client, ignored, internal = shared

    def where(key: str, entry: HostEntry) -> str:
        if isinstance(getattr(config.milter, key), str):
            return f"'{entry.text}' at {entry.source}"
        return f"'{entry.text}' at {path}:{_find_line(text, 'milter', key)}"

    raise ConfigError(
        f"{_where(path, text, 'milter', 'ignore_hosts')}[milter] ignore_hosts: client {client} is in "
        f"ignore_hosts ({where('ignore_hosts', ignored)}) and in internal_hosts "
        f"({where('internal_hosts', internal)}): an ignored client is never processed, an internal "
        "one is signed as ours; remove it from one of the lists"
    )


def _toml_error(path: Path, error: tomllib.TOMLDecodeError) -> str:
    """``file:line: TOML syntax error: ...``: tomllib only says "(at line N, column M)"."""
    match = re.search(r"\(at line (\d+), column (\d+)\)$", str(error))
    if match is None:
        return f"{path}: TOML syntax error: {error}"
    reason = str(error)[: match.start()].rstrip()
    return f"{path}:{match.group(1)}: TOML syntax error: {reason} (column {match.group(2)})"


def setting_location(path: str | Path, section: str, key: str | None = None) -> str:
    """``file:line`` of ``key`` in ``[section]`` of a config file (``file`` when not found).

    For checks made after loading (checkconf's), which point at the setting to change.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    return _where(Path(path), text, section, key).removesuffix(": ")


def _with_report_defaults(config: Config) -> Config:
    """``[reports]`` names and addresses left empty are derived from the authserv-id."""
    return dataclasses.replace(config, reports=config.reports.with_defaults(config.authserv_id))


def _where(path: Path, text: str, section: str, key: str | None) -> str:
    """``file:line: `` of ``key`` in ``[section]`` (or of the section header), best effort."""
    line = _find_line(text, section, key)
    return f"{path}:{line}: " if line else f"{path}: "


def _find_line(text: str, section: str, key: str | None) -> int | None:
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        match = header.match(line)
        if match:
            current = match.group(1)
            if key is None and current == section:
                return number
            continue
        if key is not None and current == section and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return None


def _build_section(name: str, table: Mapping[str, Any], path: Path, text: str) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        where = _where(path, text, name, key)
        if key not in known:
            raise ConfigError(f"{where}unknown key '{key}' in [{name}] (known: {', '.join(sorted(known))})")
        try:
            if (name, key) in HOST_LIST_KEYS:
                values[key] = _host_list(key, raw, path)
                continue
            if (name, key) == ("arc", "trusted_sealers"):
                values[key] = _trusted_sealers(raw, path)
                continue
            value = _convert(hints[key], raw)
            values[key] = _check_value(name, key, value, path)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}[{name}] {key}: {e}") from None
    return cls(**values)


def _convert(hint: Any, raw: Any) -> Any:
    """TOML value → the annotated type; raises TypeError/ValueError with a plain reason."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], raw)
    if origin is tuple:
        if not isinstance(raw, list):
            raise TypeError(f"expected a list, got {_toml_type(raw)}")
        return tuple(_convert(args[0], item) for item in raw)
    if isinstance(hint, type) and issubclass(hint, Enum):
        if not isinstance(raw, str):
            raise TypeError(f"expected a string, got {_toml_type(raw)}")
        if raw not in {m.value for m in hint}:
            raise ValueError(f"'{raw}' is not one of: {', '.join(m.value for m in hint)}")
        return hint(raw)
    convert: Callable[[Any], Any] = _SCALARS.get(hint, _network)
    return convert(raw)


def _expect(kind: type[Any] | tuple[type[Any], ...], label: str) -> Callable[[Any], Any]:
    def check(raw: Any) -> Any:
        if isinstance(raw, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise TypeError(f"expected {label}, got a boolean")
        if not isinstance(raw, kind):
            raise TypeError(f"expected {label}, got {_toml_type(raw)}")
        return float(raw) if label == "a number" else raw

    return check


def _network(raw: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(raw, str):
        raise TypeError(f"expected a network like 192.0.2.0/24, got {_toml_type(raw)}")
    try:
        return ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise ValueError(
            f"'{raw}' is not an IP address or network (e.g. 192.0.2.0/24, 2001:db8::/32)"
        ) from None


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    bool: _expect(bool, "true or false"),
    int: _expect(int, "an integer"),
    float: _expect((int, float), "a number"),
    str: _expect(str, "a string"),
}


def _toml_type(raw: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(raw), type(raw).__name__)


def _check_value(section: str, key: str, value: Any, path: Path) -> Any:
    settings = SECTIONS[section]
    bounds = RANGES.get((section, key)) or bounds_of(settings, key)
    problem = range_problem(value, bounds) if bounds is not None else ""
    choices = CHOICES.get((section, key)) or choices_of(settings, key)
    problem = problem or (choice_problem(value, choices) if choices is not None else "")
    if problem:
        raise ValueError(problem)
    if (section, key) in PATH_KEYS:
        return _resolve_paths(value, path)
    if section == "reports":
        return check_setting(key, value)
    if (section, key) == ("milter", "socket_mode") and not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f"'{value}' is not an octal mode like \"0660\"")
    if (section, key) == ("milter", "socket"):
        _check_socket(value)
    if (section, key) == ("dns", "nameservers"):
        for text in value:
            parse_nameserver(text)
    if (section, key) == ("milter", "status_file") and value and not value.startswith("/"):
        raise ValueError("must be an absolute path, e.g. /run/authmilter/status")
    if (section, key) == ("metrics", "listen") and value:
        listen_address(value)
    if (section, key) == ("history", "path") and value and not value.startswith("/"):
        raise ValueError("must be an absolute path, e.g. /var/lib/authmilter/history.jsonl")
    if (section, key) == ("milter", "authserv_id") and value:
        return sanitize_authserv_id(value)
    if (section, key) == ("milter", "remove_authserv_ids"):
        return tuple(sanitize_authserv_id(v) for v in value)
    if (section, key) == ("policy", "never_reject_domains"):
        return tuple(_domain_name(d) for d in value)
    if (section, key) in DATASET_KEYS:
        return _dataset_path(value, path)
    if (section, key) in (("signing", "headers"), ("signing", "oversign_headers")):
        return check_header_names(value, require_from=key == "headers")
    if (section, key) == ("signing", "sign_daemon_names") and not all(value):
        raise ValueError("empty daemon name")
    if (section, key) == ("arc", "key_file") and value:
        return _resolve_paths(value, path)
    if (section, key) in (("arc", "signing_domain"), ("arc", "selector")) and value:
        return sanitize_authserv_id(value)  # a host name (RFC 6376 §3.5 d=, s= are domain names)
    return value


def _domain_name(text: str) -> str:
    """A domain as it is compared: lower-case A-labels (domains.py)."""
    name = normalize(text)
    if name is None:
        raise ValueError(f"'{text}' is not a domain name")
    return name


def _trusted_sealers(raw: Any, path: Path) -> frozenset[str]:
    """``[arc] trusted_sealers``: a list of domains, or a file of them (one a line, ``#`` comments)."""
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return normalise_sealers(_sealer_domain(item, f"entry '{item}'") for item in raw)
    if not isinstance(raw, str) or not raw:
        raise TypeError('expected a list of domains (e.g. ["lists.example.org"]) or a file of them')
    file = _resolve_paths(raw, path)
    domains = []
    with open(file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            entry = line.partition("#")[0].strip()
            if entry:
                domains.append(_sealer_domain(entry, f"{file}:{number}"))
    return normalise_sealers(domains)


def _sealer_domain(entry: str, where: str) -> str:
    try:
        return sanitize_authserv_id(entry.rstrip("."))
    except ValueError:
        raise ValueError(f"{where}: '{entry}' is not a domain name (the d= of an ARC-Seal)") from None


def _host_list(key: str, raw: Any, path: Path) -> tuple[str, ...] | str:
    """A host list (``HOST_LIST_KEYS``): dataset entries, or a dataset file's name (made absolute)."""
    if isinstance(raw, str):
        if not raw:
            raise ValueError(f"empty file name; write [] for no {key.replace('_', ' ')}")
        return _dataset_path(raw, path)
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise TypeError(
            'expected a list of hosts, networks and .domains (e.g. ["127.0.0.1", "10.0.0.0/8"]) '
            "or the name of a dataset file"
        )
    return tuple(raw)


def _dataset_path(value: str, path: Path) -> str:
    """An OpenDKIM dataset name with its file made absolute (from the config file's folder)."""
    if not value:
        return value
    prefix = next((p for p in ("refile:", "file:") if value.startswith(p)), "")
    name = value[len(prefix) :]
    if not name:
        raise ValueError(f"'{value}' names no file")
    candidate = Path(name)
    return prefix + str(candidate if candidate.is_absolute() else path.parent / candidate)


def _load_signing_table(settings: SigningSettings, config_path: str) -> SigningTable | None:
    """The tables of ``[signing]``, and every KeyTable key loaded once to check it."""
    if bool(settings.key_table) != bool(settings.signing_table):
        given, missing = (
            ("key_table", "signing_table") if settings.key_table else ("signing_table", "key_table")
        )
        problem = f"{missing} is not set: set key_table and signing_table, or neither"
        raise _SettingError(config_path, "signing", given, problem)
    if not settings.key_table:
        return None
    try:
        key_table = KeyTable.load(settings.key_table)
    except TableError as e:
        raise _SettingError(config_path, "signing", "key_table", str(e)) from None
    try:
        signing_table = SigningTable.load(settings.signing_table, key_table)
    except TableError as e:
        raise _SettingError(config_path, "signing", "signing_table", str(e)) from None
    _check_keys(key_table, settings.key_permissions, config_path)
    return signing_table


def _check_keys(key_table: KeyTable, permissions: str, config_path: str) -> None:
    checked: set[tuple[str, str | None]] = set()
    for entry in key_table:
        if (entry.key_path, entry.algorithm) in checked:
            continue
        checked.add((entry.key_path, entry.algorithm))
        try:
            key = load_private_key(entry.key_path, entry.algorithm, permissions=permissions)
        except KeyFileError as e:
            raise _SettingError(
                config_path, "signing", "key_table", f"{entry.source}: key {entry.name}: {e}"
            ) from None
        for warning in key.warnings:
            log.warning("%s: key %s: %s", entry.source, entry.name, warning)


def _check_socket(value: str) -> None:
    """libmilter's connection strings: unix:PATH, local:PATH, inet:PORT@HOST, inet6:PORT@HOST."""
    kind, _, rest = value.partition(":")
    if kind in ("unix", "local") and rest.startswith("/"):
        return
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        if port.isdigit() and 0 < int(port) < 65536 and host:
            return
    raise ValueError(f"'{value}' is not a milter socket: use inet:PORT@HOST, inet6:PORT@HOST or unix:/PATH")


def listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); the host is an IP address.

    Raises:
        ValueError: not that form, the host is not an IP address, or the port is not 1-65535.
    """
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        versions = {6}
    else:
        versions = {4}
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if not colon or address is None or address.version not in versions or not port.isdigit():
        raise ValueError(f"'{value}' is not an address like \"127.0.0.1:9465\" or \"[::1]:9465\"")
    if not 0 < int(port) < 65536:
        raise ValueError(f"'{value}': port {port} is out of range (1 to 65535)")
    return host, int(port)


def _resolve_paths(value: Any, path: Path) -> Any:
    def resolve(name: str) -> str:
        if not name:
            raise ValueError("empty file name")
        candidate = Path(name)
        resolved = candidate if candidate.is_absolute() else path.parent / candidate
        # Found now rather than on the first message, so a reload with a bad path is refused.
        if not os.access(resolved, os.R_OK) or not resolved.is_file():
            raise ValueError(f"cannot read file {resolved}")
        return str(resolved)

    if isinstance(value, tuple):
        return tuple(resolve(v) for v in value)
    return resolve(value) if value is not None else None


__all__ = [
    "Config",
    "ConfigError",
    "FailureAction",
    "MetricsSettings",
    "MilterSettings",
    "default_config",
    "load_config",
    "parse_config",
]

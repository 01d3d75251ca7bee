"""The ``authmilter`` command line.

Three layers, as in aiosmtpd's main.py: ``_parser()`` only builds the parser, ``parse_args()``
does every cross-check through ``parser.error``, ``main(argv)`` acts. Exit status: 0 when the
command did its job (for ``check``: a verdict was printed, whatever it says; for ``sign``: the
message was printed, signed or not, and why goes to standard error), 1 when a file or the
configuration is unusable (for ``keys test``: also when a key or its DNS record has a problem), 2 for
a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from authmilter import __version__
from authmilter.config import Config, ConfigError, default_config, load_config
from authmilter.dkim_rsa import install as install_openssl_rsa
from authmilter.keys import (
    KEY_TYPES,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    RECOMMENDED_RSA_BITS,
    KeyFileError,
    check_published_key,
    generate_key,
    key_record_name,
    load_private_key,
    zone_file_lines,
)
from authmilter.message import parse_message
from authmilter.model import Verdict
from authmilter.pipeline import Connection, SigningOutcome, Transaction, evaluate, sign_transaction
from authmilter.reports.delivery import (
    DeliverySettings,
    Outcome,
    ReportStore,
    SendRun,
    SettingsError,
    SmtpRelay,
    Status,
)
from authmilter.resolver import DnsSettings, DnsStatus, Resolver, ZoneFileError, build_resolver
from authmilter.supervisor import StartupError
from authmilter.supervisor import run as run_supervisor
from authmilter.tables import SENDER_DOMAIN, KeyEntry, KeyTable, TableError

log = logging.getLogger("authmilter")

# Where `authmilter run` looks without --config (the Debian package's place for it).
DEFAULT_CONFIG = Path("/etc/authmilter/authmilter.toml")
# What genkey's key file and DNS record file are called, after the selector (as opendkim-genkey).
PRIVATE_KEY_SUFFIX = ".private"
DNS_RECORD_SUFFIX = ".txt"


class CliError(Exception):
    """A problem the user can fix (unreadable file, bad config); printed without a traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authmilter",
        description="SPF, DKIM and DMARC (RFC 9989) checks with Authentication-Results, "
        "for Postfix and Sendmail.",
    )
    parser.add_argument("--version", action="version", version=f"authmilter {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="check one message as the milter would and print its Authentication-Results",
        description="Check one message as the milter would, without an MTA: SPF for the client address, "
        "HELO and MAIL FROM, DKIM, DMARC; print the Authentication-Results header authmilter would add "
        "and the action it would take. DNS comes from --zone files, --nameserver, or the system's resolvers.",
    )
    check.add_argument(
        "message", metavar="MESSAGE", help="the message file (RFC 5322), or - for standard input"
    )
    check.add_argument("--client-ip", required=True, help="the SMTP client's IP address")
    check.add_argument("--helo", required=True, help="the HELO/EHLO name the client gave")
    check.add_argument(
        "--mail-from", required=True, help="the envelope sender (MAIL FROM); '' or '<>' for the null sender"
    )
    check.add_argument("--rcpt", action="append", default=[], help="an envelope recipient (repeatable)")
    check.add_argument("--config", type=Path, help="apply this config file's settings (default: built-in)")
    _add_dns_options(check)
    check.add_argument(
        "--authserv-id", help="the authserv-id to write (default: the config's, or the host name)"
    )
    check.add_argument("--json", action="store_true", help="print the verdict as JSON (docs/verdict-json.md)")

    checkconf = commands.add_parser(
        "checkconf",
        help="validate a config file and print the effective settings",
        description="Validate a config file (and the zone files it names) and print the effective settings.",
    )
    checkconf.add_argument("--config", type=Path, help=f"the config file (default: {DEFAULT_CONFIG})")

    run = commands.add_parser(
        "run",
        help="run the milter daemon",
        description="Serve the milter protocol on the config's socket with pre-forked workers. "
        "SIGTERM stops gracefully (messages in progress finish), SIGHUP reloads the config "
        "(an invalid one is logged and the running one stays). Readiness goes to systemd "
        "(Type=notify) when $NOTIFY_SOCKET is set.",
    )
    run.add_argument("--config", type=Path, help=f"the config file (default: {DEFAULT_CONFIG})")

    _add_sign_parser(commands)
    _add_genkey_parser(commands)
    _add_keys_parser(commands)
    report_commands = _add_report_parser(commands)
    _add_report_send(report_commands)
    return parser


def _add_report_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    report = commands.add_parser(
        "report",
        help="DMARC aggregate reports (RFC 9990)",
        description="DMARC aggregate reports (RFC 9990): see docs/reports.md.",
    )
    return report.add_subparsers(dest="report_command", required=True, metavar="REPORT_COMMAND")


def _add_report_send(report_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = report_commands.add_parser(
        "send",
        help="deliver the reports of every ended period",
        description="Build and deliver one report per policy domain and ended period, to its verified "
        "mailto: rua destinations through the [reports] relay, or as files with --out. Each report is "
        "recorded as delivered once the relay accepted it or its file is complete; a second run delivers "
        "nothing again. Exit status 1 when a report had to be left for the next run.",
    )
    send.add_argument("--config", type=Path, help=f"the config file (default: {DEFAULT_CONFIG})")
    send.add_argument(
        "--out", type=Path, metavar="DIR", help="write the reports (.xml.gz, named as mailed) into DIR"
    )
    send.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be delivered; send nothing, record nothing (--out still writes the files)",
    )
    send.add_argument(
        "--until",
        type=parse_until,
        metavar="TIME",
        help="only periods ended by TIME: seconds since the epoch, YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] "
        "(UTC unless an offset is given; default: now)",
    )


def parse_until(text: str) -> int:
    """``--until``: epoch seconds, or an ISO 8601 date or date-time (UTC unless it has an offset)."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is neither seconds since the epoch nor YYYY-MM-DD[THH:MM[:SS]]"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def _add_sign_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sign = commands.add_parser(
        "sign",
        help="sign one message as the milter signs outbound mail, and print it",
        description="Print the message with the DKIM-Signature fields the milter would add to it as "
        "outbound mail (same code path), so a table change can be tried before a reload. The tables "
        "come from the config's [signing] section, or from --key-table and --signing-table, which "
        "override it. What was signed, or why nothing was, goes to standard error.",
    )
    sign.add_argument(
        "message", metavar="MESSAGE", help="the message file (RFC 5322), or - for standard input"
    )
    sign.add_argument("--config", type=Path, help="the config file ([signing] and its tables)")
    sign.add_argument("--key-table", type=Path, help="the KeyTable to use instead of the config's")
    sign.add_argument(
        "--signing-table",
        help="the SigningTable to use instead of the config's (refile:PATH for * patterns)",
    )
    sign.add_argument(
        "--mail-from", default="", help='the envelope sender, for [signing] signing_domain = "envelope"'
    )


def _add_dns_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--zone",
        action="append",
        type=Path,
        default=[],
        help="answer DNS from this RFC 1035 zone file only (repeatable); names outside are NXDOMAIN",
    )
    command.add_argument(
        "--nameserver",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="ask this nameserver instead of the system's (repeatable; [IPv6]:PORT for IPv6 with a port)",
    )


def _add_genkey_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    genkey = commands.add_parser(
        "genkey",
        help="make a DKIM signing key and its DNS record",
        description="Make a DKIM signing key: write DIR/SELECTOR.private (mode 0600; an existing file is "
        "never overwritten) and DIR/SELECTOR.txt (the DNS TXT record in zone-file syntax, split into "
        "255-byte strings), and print the KeyTable and SigningTable lines to add.",
    )
    genkey.add_argument("--domain", required=True, help="the signing domain (d=)")
    genkey.add_argument("--selector", required=True, help="the selector (s=), e.g. 2026a")
    genkey.add_argument(
        "--type",
        dest="key_type",
        choices=tuple(KEY_TYPES.values()),
        default="rsa",
        help="rsa (default; every verifier) or ed25519 (RFC 8463; sign with both during the transition)",
    )
    genkey.add_argument(
        "--bits",
        type=int,
        help=f"RSA key size, {MIN_RSA_BITS} to {MAX_RSA_BITS} (default {RECOMMENDED_RSA_BITS})",
    )
    genkey.add_argument(
        "--dir", type=Path, default=Path("."), help="where to write the files (default: here)"
    )
    genkey.add_argument(
        "--testing", action="store_true", help="publish t=y: the domain is testing DKIM (RFC 6376 §3.6.1)"
    )


def _add_keys_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="check the signing keys", description="Check the signing keys.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    test = key_commands.add_parser(
        "test",
        help="check every KeyTable key against its published DNS record",
        description="For every KeyTable entry, load the private key and look up its DNS record "
        "(SELECTOR._domainkey.DOMAIN TXT): the record must exist, be the only one, match the key, "
        "and have the right k=. Prints one line per key; exit status 1 when any has a problem. "
        "A key file others may read is reported as a problem: the daemon refuses it by default.",
    )
    test.add_argument("--config", type=Path, help="take DNS settings from this config file")
    test.add_argument("--key-table", type=Path, help="the KeyTable file (OpenDKIM format); required")
    _add_dns_options(test)


def parse_nameserver(text: str) -> tuple[str, int | None]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address → (address, port or None).

    Raises:
        ValueError: not an IP address, or a port outside 1-65535.
    """
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"'{text}': expected [IPv6] or [IPv6]:PORT")
        port = rest[1:] or None
    elif text.count(":") == 1:
        host, port = text.split(":")
    ipaddress.ip_address(host)
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{text}': port must be a number from 1 to 65535")
    return host, int(port)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        try:
            ipaddress.ip_address(args.client_ip)
        except ValueError:
            parser.error(f"--client-ip: '{args.client_ip}' is not an IPv4 or IPv6 address")
        _check_dns_options(parser, args)
    if args.command == "keys":
        if args.key_table is None and args.config is None:
            parser.error(
                "keys test: --key-table FILE is required (or --config FILE with [signing] key_table)"
            )
        _check_dns_options(parser, args)
    if args.command == "sign":
        if (args.key_table is None) != (args.signing_table is None):
            parser.error("sign: give --key-table and --signing-table together")
        if args.key_table is None and args.config is None:
            parser.error("sign: give --config FILE, or --key-table FILE and --signing-table FILE")
    if args.command == "genkey":
        _check_genkey_options(parser, args)
    if args.command == "report" and args.report_command == "send":
        _check_report_send_options(parser, args)
    # The daemon and the check of its config read the same file by default.
    if args.command in ("run", "checkconf") and args.config is None:
        if not DEFAULT_CONFIG.is_file():
            parser.error(f"no --config given and {DEFAULT_CONFIG} does not exist")
        args.config = DEFAULT_CONFIG
    return args


def _check_dns_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate --zone/--nameserver; set ``args.nameservers`` to (address, port or None) pairs."""
    if args.zone and args.nameserver:
        parser.error("--zone and --nameserver exclude each other: zone files answer every query")
    servers = []
    for text in args.nameserver:
        try:
            servers.append(parse_nameserver(text))
        except ValueError as e:
            parser.error(f"--nameserver {e}")
    ports = {port for _, port in servers}
    if len(ports) > 1:
        parser.error("--nameserver: all nameservers must use the same port")
    args.nameservers = servers


def _check_report_send_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.out is not None and not args.out.is_dir():
        parser.error(f"report send: --out {args.out}: not a directory")
    # The same config file as the daemon's, whose history the reports come from.
    if args.config is None:
        if not DEFAULT_CONFIG.is_file():
            parser.error(f"report send: no --config given and {DEFAULT_CONFIG} does not exist")
        args.config = DEFAULT_CONFIG


def _check_genkey_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate genkey's options; normalise the domain, default the bits, make --dir absolute."""
    args.domain = args.domain.removesuffix(".").lower()
    try:
        key_record_name(args.selector, args.domain)
    except ValueError as e:
        parser.error(str(e))
    if args.key_type == "ed25519" and args.bits is not None:
        parser.error("--bits applies to RSA keys only; an Ed25519 key is always 256 bits")
    if args.bits is None:
        args.bits = RECOMMENDED_RSA_BITS
    elif not MIN_RSA_BITS <= args.bits <= MAX_RSA_BITS:
        parser.error(f"--bits must be {MIN_RSA_BITS} to {MAX_RSA_BITS} (RFC 8301 §3.2), not {args.bits}")
    args.dir = args.dir.resolve()
    # The KeyTable value is domain:selector:path, one whitespace-free field (OpenDKIM's format).
    if any(c.isspace() or c == ":" for c in str(args.dir)):
        parser.error(f"--dir {args.dir}: a KeyTable path cannot hold spaces or ':'; choose another directory")


def _load(path: Path | None) -> Config:
    try:
        return load_config(path) if path is not None else default_config()
    except ConfigError as e:
        raise CliError(str(e)) from None


def _check_config(args: argparse.Namespace) -> Config:
    """The config with the command line's DNS and authserv-id choices on top."""
    config = _load(args.config)
    dns = _dns_settings(config.dns, args)
    milter = config.milter
    if args.authserv_id:
        milter = dataclasses.replace(milter, authserv_id=args.authserv_id)
    return dataclasses.replace(config, dns=dns, milter=milter)


def _dns_settings(dns: DnsSettings, args: argparse.Namespace) -> DnsSettings:
    """The config's DNS settings with --zone or --nameserver on top."""
    if args.zone:
        return dataclasses.replace(dns, zone_files=tuple(str(p) for p in args.zone))
    if args.nameservers:
        port = args.nameservers[0][1] or 53
        return DnsSettings(tuple(h for h, _ in args.nameservers), port, dns.timeout, dns.cache_size, ())
    return dns


def _resolver(dns: DnsSettings) -> Resolver:
    try:
        return build_resolver(dns)
    except ZoneFileError as e:
        raise CliError(str(e)) from None


def _read_message(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as e:
        raise CliError(f"{name}: cannot read the message: {e.strerror}") from None


def run_check(args: argparse.Namespace) -> Verdict:
    config = _check_config(args)
    resolver = _resolver(config.dns)
    install_openssl_rsa()
    message = parse_message(_read_message(args.message), max_headers=config.milter.max_headers)
    transaction = Transaction(
        connection=Connection(client_ip=args.client_ip, helo=args.helo),
        mail_from=args.mail_from,
        recipients=tuple(args.rcpt),
        message=message,
    )
    return evaluate(transaction, resolver, config)


def format_verdict(verdict: Verdict) -> str:
    lines = [f"Authentication-Results: {verdict.authentication_results}", f"action: {verdict.action}"]
    if verdict.reply is not None:
        lines.append(f"reply: {verdict.reply}")
    if verdict.reason:
        lines.append(f"reason: {verdict.reason}")
    return "\n".join(lines)


def _sign_config(args: argparse.Namespace) -> Config:
    """The config, with --key-table and --signing-table on top, its tables and keys checked."""
    config = _load(args.config)
    if args.key_table is not None:
        refile = args.signing_table.startswith("refile:")
        table = Path(args.signing_table.removeprefix("refile:")).absolute()
        signing = dataclasses.replace(
            config.signing,
            key_table=str(args.key_table.absolute()),
            signing_table=("refile:" if refile else "") + str(table),
        )
        config = dataclasses.replace(config, signing=signing)
    try:
        if config.signing_table is None:
            raise CliError(f"{config.path}: no [signing] key_table and signing_table: nothing signs")
    except ConfigError as e:
        raise CliError(str(e)) from None
    return config


def run_sign(args: argparse.Namespace) -> tuple[bytes, SigningOutcome]:
    """``authmilter sign``: the message with its signatures, and what was signed or why not."""
    config = _sign_config(args)
    install_openssl_rsa()
    raw = _read_message(args.message)
    transaction = Transaction(
        connection=Connection(client_ip="", helo=""),
        mail_from=args.mail_from.strip().removeprefix("<").removesuffix(">"),
        recipients=(),
        message=parse_message(raw, max_headers=config.milter.max_headers),
    )
    try:
        outcome = sign_transaction(transaction, config)
    except KeyFileError as e:
        raise CliError(str(e)) from None
    # The message goes out as it came in; the new fields use its line ending (the MTA uses CRLF).
    newline = "\r\n" if b"\r\n" in raw or b"\n" not in raw else "\n"
    fields = "".join(f"DKIM-Signature: {v}".replace("\n", newline) + newline for v in outcome.signatures)
    return fields.encode("ascii") + raw, outcome


def run_checkconf(args: argparse.Namespace) -> str:
    config = _load(args.config)
    _resolver(config.dns)
    sections = {
        f.name: dataclasses.asdict(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name != "path"
    }
    sections["milter"]["authserv_id"] = config.authserv_id
    return f"{config.path}: OK\n" + json.dumps(sections, indent=2, default=str)


def _exists_error(path: Path) -> CliError:
    return CliError(f"{path}: already exists; authmilter never overwrites it: choose another selector")


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; an existing file is an error, never overwritten."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as e:
        raise CliError(f"{path}: cannot create: {e.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        file.write(data)


def run_genkey(args: argparse.Namespace) -> str:
    """``authmilter genkey``: write the key and its DNS record; return what to print."""
    private_path = args.dir / f"{args.selector}{PRIVATE_KEY_SUFFIX}"
    record_path = args.dir / f"{args.selector}{DNS_RECORD_SUFFIX}"
    for path in (private_path, record_path):
        if path.exists():
            raise _exists_error(path)
    pem, key = generate_key(args.key_type, args.bits)
    _write_new_file(private_path, pem, 0o600)
    record = zone_file_lines(args.selector, args.domain, key, testing=args.testing)
    _write_new_file(record_path, record.encode("ascii"), 0o644)
    key_name = key_record_name(args.selector, args.domain)
    return "\n".join(
        [
            f"wrote {private_path} ({key.description}, mode 0600) and {record_path}",
            f"publish the record in {record_path} in the DNS zone of {args.domain}, then check it with "
            "authmilter keys test",
            "# add to the KeyTable:",
            f"{key_name} {args.domain}:{args.selector}:{private_path}",
            "# add to the SigningTable (a refile: pattern):",
            f"*@{args.domain} {key_name}",
        ]
    )


def _test_key(entry: KeyEntry, resolver: Resolver) -> tuple[str, bool]:
    """One KeyTable entry against its DNS record: the line to print and whether it is fine."""
    if entry.domain == SENDER_DOMAIN:
        return f"{entry.source}: {entry.name}: skipped: the domain is %, each message's own", True
    record_name = f"{entry.selector}._domainkey.{entry.domain}"
    label = f"{entry.source}: {record_name}"
    if entry.name != record_name:
        label += f" (key {entry.name})"
    try:
        # Loaded with "warn" so the DNS record is checked too; the warning is reported as a problem.
        key = load_private_key(entry.key_path, entry.algorithm, permissions="warn")
    except KeyFileError as e:
        return f"{label}: FAIL: {e}", False
    answer = resolver.txt(record_name)
    if answer.status is DnsStatus.TEMPFAIL:
        check = check_published_key(key, None, answer.reason or "temporary failure")
    else:
        check = check_published_key(key, answer.texts if answer.status is DnsStatus.OK else None)
    problems = (*key.warnings, *check.problems)
    notes = f" ({'; '.join(check.notes)})" if check.notes else ""
    if problems:
        return f"{label}: FAIL: {'; '.join(problems)}{notes}", False
    return f"{label}: OK{notes}", True


def run_keys_test(args: argparse.Namespace) -> tuple[str, bool]:
    """``authmilter keys test``: one line per KeyTable entry, and whether all are fine."""
    config = _load(args.config)
    resolver = _resolver(_dns_settings(config.dns, args))
    key_table = str(args.key_table) if args.key_table is not None else config.signing.key_table
    if not key_table:
        raise CliError(f"{config.path}: no [signing] key_table; give --key-table FILE")
    try:
        table = KeyTable.load(key_table)
    except TableError as e:
        raise CliError(str(e)) from None
    results = [_test_key(entry, resolver) for entry in table]
    if not results:
        return f"{key_table}: no keys to test", False
    return "\n".join(line for line, _ in results), all(ok for _, ok in results)


def run_daemon(args: argparse.Namespace) -> int:
    """``authmilter run``: the supervisor's exit status (0 after a clean stop).

    Logging follows the config's ``[log]`` section (also after a reload), not ``-v``.
    """
    config = _load(args.config)
    try:
        return run_supervisor(config)
    except StartupError as e:
        raise CliError(str(e)) from None


def _reports_section(config: Config) -> object:
    """The config's ``[reports]`` section (its settings are defined and validated in config.py)."""
    section = getattr(config, "reports", None)
    if section is None:
        raise CliError(f"{config.path}: no [reports] section; set [reports] database (docs/reports.md)")
    return section


def _delivery_settings(section: object, config_path: str) -> DeliverySettings:
    """DeliverySettings from the ``[reports]`` keys of the same names."""
    names = [f.name for f in dataclasses.fields(DeliverySettings)]
    try:
        return DeliverySettings(**{name: getattr(section, name) for name in names if hasattr(section, name)})
    except (SettingsError, TypeError) as e:
        raise CliError(f"{config_path}: [reports]: {e}") from None


def _report_store_module() -> ModuleType:
    """authmilter.reports.store: ``open_store(url)`` and ``StoreError``."""
    try:
        return importlib.import_module("authmilter.reports.store")
    except ImportError as e:
        raise CliError(f"the report store is not available in this build: {e}") from None


def run_report_send(args: argparse.Namespace) -> list[Outcome]:
    """``authmilter report send``: what happened to each due report."""
    config = _load(args.config)
    section = _reports_section(config)
    delivery = _delivery_settings(section, config.path)
    resolver = _resolver(config.dns)
    until = args.until if args.until is not None else int(time.time())
    stores = _report_store_module()
    try:
        store: ReportStore = stores.open_store(str(getattr(section, "database", "")))
        with SmtpRelay(delivery) as relay:
            return SendRun(store, delivery, resolver, config.dmarc, relay, args.out, args.dry_run).run(until)
    except stores.StoreError as e:
        raise CliError(str(e)) from None


def format_send_outcomes(outcomes: Sequence[Outcome], dry_run: bool) -> str:
    prefix = "dry run: " if dry_run else ""
    if not outcomes:
        return f"{prefix}no report due"
    return "\n".join(prefix + outcome.line() for outcome in outcomes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="authmilter: %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "run":
            return run_daemon(args)
        if args.command == "keys":
            output, all_ok = run_keys_test(args)
            print(output)
            return 0 if all_ok else 1
        if args.command == "sign":
            signed, outcome = run_sign(args)
            sys.stdout.buffer.write(signed)
            sys.stdout.flush()
            print(f"authmilter: {outcome.reason}", file=sys.stderr)
            return 0
        if args.command == "report" and args.report_command == "send":
            outcomes = run_report_send(args)
            print(format_send_outcomes(outcomes, args.dry_run))
            left = (Status.DEFERRED, Status.FAILED)
            return 1 if any(outcome.status in left for outcome in outcomes) else 0
        if args.command == "genkey":
            output = run_genkey(args)
        elif args.command == "check":
            verdict = run_check(args)
            output = json.dumps(verdict.as_json(), indent=2) if args.json else format_verdict(verdict)
        else:
            output = run_checkconf(args)
    except CliError as e:
        print(f"authmilter: {e}", file=sys.stderr)
        return 1
    print(output)
    return 0

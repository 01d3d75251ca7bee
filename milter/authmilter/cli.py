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
import contextlib
import dataclasses
import datetime
import grp
import ipaddress
import json
import logging
import os
import pwd
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from authmilter import __version__
from authmilter.config import Config, ConfigError, default_config, load_config, packaged_config_path
from authmilter.dkim_rsa import install as install_openssl_rsa
from authmilter.domains import path_address, to_a_labels
from authmilter.keys import (
    KEY_TYPES,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    RECOMMENDED_RSA_BITS,
    KeyFileError,
    check_published_key,
    effective_user,
    generate_key,
    key_record_name,
    load_private_key,
    zone_file_lines,
)
from authmilter.message import parse_message
from authmilter.migrate import Note as MigrationNote
from authmilter.migrate import Verdict as MigrationVerdict
from authmilter.migrate import check_references, render_toml
from authmilter.migrate import migrate as migrate_configs
from authmilter.model import Verdict
from authmilter.pipeline import Connection, SigningOutcome, Transaction, evaluate, sign_transaction
from authmilter.preflight import problems as preflight_problems
from authmilter.reload import ReloadError, configured_status_file, reload_daemon, status_path
from authmilter.reports import SECONDS_PER_DAY, ReportsSettings
from authmilter.reports.delivery import DeliverySettings, Outcome, SendRun, SettingsError, SmtpRelay, Status
from authmilter.reports.importer import history_files, import_files
from authmilter.reports.show import prune_line
from authmilter.reports.show import show as show_reports
from authmilter.reports.store import Store, StoreError, open_store
from authmilter.resolver import (
    DnsSettings,
    DnsStatus,
    Resolver,
    ZoneFileError,
    build_resolver,
    parse_nameserver,
)
from authmilter.session import Session
from authmilter.supervisor import StartupError
from authmilter.supervisor import run as run_supervisor
from authmilter.tables import SENDER_DOMAIN, KeyEntry, KeyTable, TableError

log = logging.getLogger("authmilter")

# Where `authmilter run` looks without --config (the Debian package's place for it); when there is
# no such file, the packaged default (verify only, loopback) is used.
DEFAULT_CONFIG = Path("/etc/authmilter/authmilter.toml")
DEFAULT_CONFIG_HELP = (
    f"the config file (default: {DEFAULT_CONFIG}, else the packaged default: "
    "verify only on loopback, see --print-default-config)"
)
# The user systemd/authmilter.service runs the daemon as (User=).
UNIT_USER = "authmilter"
# `authmilter reload` waits this long by default: systemd's default TimeoutStartSec, which bounds
# ExecReload= too; longer than the new workers' READY_TIMEOUT plus a retiring worker's drain.
RELOAD_TIMEOUT = 90.0
# What genkey's key file and DNS record file are called, after the selector (as opendkim-genkey).
PRIVATE_KEY_SUFFIX = ".private"
DNS_RECORD_SUFFIX = ".txt"


class CliError(Exception):
    """A problem the user can fix (unreadable file, bad config); printed without a traceback."""


class _PrintDefaultConfig(argparse.Action):
    """``--print-default-config``: like ``--version``, acts and exits before a command is required."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        path = packaged_config_path()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            parser.exit(1, f"authmilter: {path}: cannot read the packaged default config: {e.strerror}\n")
        sys.stdout.write(text)
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authmilter",
        description="SPF, DKIM and DMARC (RFC 9989) checks with Authentication-Results, "
        "for Postfix and Sendmail.",
    )
    parser.add_argument("--version", action="version", version=f"authmilter {__version__}")
    parser.add_argument(
        "--print-default-config",
        action=_PrintDefaultConfig,
        help="print the packaged default config file (every key, documented) and exit",
    )
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
    checkconf.add_argument("--config", type=Path, help=DEFAULT_CONFIG_HELP)
    checkconf.add_argument(
        "--user",
        help="check as this user, the unit's User= (default as root: "
        f"{UNIT_USER} if it exists; otherwise the current user): files it must read, "
        "directories it must write",
    )
    checkconf.add_argument("--json", action="store_true", help="print only the effective settings, as JSON")

    run = commands.add_parser(
        "run",
        help="run the milter daemon",
        description="Serve the milter protocol on the config's socket with pre-forked workers. "
        "SIGTERM stops gracefully (messages in progress finish), SIGHUP reloads the config "
        "(an invalid one is logged and the running one stays). Readiness goes to systemd "
        "(Type=notify) when $NOTIFY_SOCKET is set.",
    )
    run.add_argument("--config", type=Path, help=DEFAULT_CONFIG_HELP)

    reload = commands.add_parser(
        "reload",
        help="make the running daemon reload its config, and wait for the outcome",
        description="Send SIGHUP to the running daemon and wait until the new configuration serves "
        "every new connection (exit 0), or the daemon refuses it (exit 1, with the reason; the "
        "running configuration stays). The daemon is found through its status file ([milter] "
        "status_file, or $RUNTIME_DIRECTORY/status under systemd). For the unit's ExecReload=.",
    )
    reload.add_argument(
        "--config",
        type=Path,
        help=f"the daemon's config file, for [milter] status_file (default: {DEFAULT_CONFIG})",
    )
    reload.add_argument(
        "--pid", type=int, help="the daemon's PID (systemd: $MAINPID; default: from the status file)"
    )
    reload.add_argument(
        "--timeout",
        type=float,
        default=RELOAD_TIMEOUT,
        help=f"seconds to wait for the outcome (default {RELOAD_TIMEOUT:g}, systemd's own reload timeout)",
    )

    migrate = commands.add_parser(
        "migrate",
        help="write an authmilter config equivalent to an opendkim.conf and/or opendmarc.conf",
        description="Read opendkim.conf and/or opendmarc.conf (and check the tables, datasets and "
        "keys they name, which the new config refers to where they are), write the equivalent "
        "authmilter config, and say on standard error what became of every setting: carried over "
        "(to which key), not needed (why) or not supported (what changes). Where the old defaults "
        "differ from authmilter's, the old behaviour is kept. Exit status 1 when a setting or a "
        "file it names cannot be used (the config is written all the same). docs/migrate.md.",
    )
    migrate.add_argument(
        "--opendkim", type=Path, metavar="FILE", help="OpenDKIM's config, e.g. /etc/opendkim.conf"
    )
    migrate.add_argument(
        "--opendmarc", type=Path, metavar="FILE", help="OpenDMARC's config, e.g. /etc/opendmarc.conf"
    )
    migrate.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="write the config here (never over an existing file; default: standard output); "
        "OpenDKIM's single-key mode also writes a KeyTable and SigningTable next to it",
    )

    _add_sign_parser(commands)
    _add_genkey_parser(commands)
    _add_keys_parser(commands)
    _add_report_parser(commands)
    return parser


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
        metavar="TIME",
        help="only periods ended by TIME: 2026-12-05, 2026-12-05T10:00 (UTC unless an offset is "
        "given), seconds since the epoch, or an age such as 1d (default: now)",
    )


def _add_report_prune(report_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    prune = report_commands.add_parser(
        "prune",
        help="delete the periods older than [reports] keep_days",
        description="Delete from the report store every period that ended more than [reports] "
        "keep_days ago, with its counts, reported or not, and say how many had a report due that "
        "was never delivered. report send does this after each run; keep_days = 0 keeps everything.",
    )
    prune.add_argument("--config", type=Path, help=f"the config file (default: {DEFAULT_CONFIG})")
    prune.add_argument("--dry-run", action="store_true", help="print what would be deleted; delete nothing")


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
        "--owner",
        metavar="USER[:GROUP]",
        help="give the key file to this user (and group; default: the user's own), e.g. authmilter, "
        "the user the daemon runs as: only it may read the key (needs root)",
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
    if args.command == "migrate" and args.opendkim is None and args.opendmarc is None:
        parser.error("migrate: give --opendkim FILE, --opendmarc FILE or both")
    if args.command == "reload" and args.timeout <= 0:
        parser.error("reload: --timeout must be a positive number of seconds")
    if args.command == "reload" and args.config is None and DEFAULT_CONFIG.is_file():
        args.config = DEFAULT_CONFIG
    if args.command == "report":
        _check_report_options(parser, args)
    # The daemon and the check of its config read the same file by default.
    if args.command in ("run", "checkconf") and args.config is None:
        args.config = DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else packaged_config_path()
    return args


def _check_dns_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate --zone/--nameserver (the syntax of ``[dns] nameservers``, each with its own port)."""
    if args.zone and args.nameserver:
        parser.error("--zone and --nameserver exclude each other: zone files answer every query")
    for text in args.nameserver:
        try:
            parse_nameserver(text)
        except ValueError as e:
            parser.error(f"--nameserver {e}")


def _check_genkey_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate genkey's options; normalise the domain, default the bits, make --dir absolute."""
    try:
        args.domain = to_a_labels(args.domain).lower()  # as DNS and d= want it (domains.py)
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
    args.owner_ids = _owner_ids(parser, args.owner) if args.owner else None
    # The KeyTable value is domain:selector:path, one whitespace-free field (OpenDKIM's format).
    if any(c.isspace() or c == ":" for c in str(args.dir)):
        parser.error(f"--dir {args.dir}: a KeyTable path cannot hold spaces or ':'; choose another directory")


def _owner_ids(parser: argparse.ArgumentParser, owner: str) -> tuple[int, int]:
    """``USER[:GROUP]`` → (uid, gid); the group defaults to the user's primary group."""
    user_name, _, group_name = owner.partition(":")
    try:
        user = pwd.getpwnam(user_name)
    except KeyError:
        parser.error(f"--owner {owner}: no user named '{user_name}'")
    if not group_name:
        return user.pw_uid, user.pw_gid
    try:
        return user.pw_uid, grp.getgrnam(group_name).gr_gid
    except KeyError:
        parser.error(f"--owner {owner}: no group named '{group_name}'")


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
    if args.nameserver:
        return DnsSettings(tuple(args.nameserver), 53, dns.timeout, dns.cache_size, ())
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
    # The milter's state machine, fed from the file: the message arrives whole.
    session = Session(config)
    session.connect(args.client_ip, "", {})
    session.hello(args.helo)
    session.mail(args.mail_from)
    for recipient in args.rcpt:
        session.rcpt(recipient)
    session.whole_message(message)
    session.end_of_message()
    return evaluate(session.transaction(), resolver, config)


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
        mail_from=path_address(args.mail_from),
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
    """``authmilter checkconf``: the effective settings, once everything ``run`` needs is checked.

    As root, the checks run in a child process that has become the daemon's user, so that a key
    file only root can read is found now rather than when the daemon starts.
    """
    user = _checkconf_user(args.user)
    args.config = args.config.absolute()  # the other user may not read the current directory
    if user is None or user.pw_uid == os.geteuid():
        settings = _checked_settings(args.config)
        name = user.pw_name if user is not None else effective_user()
    else:
        settings = _as_user(user, lambda: _checked_settings(args.config))
        name = user.pw_name
    if args.json:
        return settings
    return f"{args.config}: OK (checked as user {name})\n{settings}"


def _checkconf_user(name: str | None) -> pwd.struct_passwd | None:
    """The user to check as: --user, else as root the unit's user when it exists."""
    if name is None:
        if os.geteuid() != 0:
            return None
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(UNIT_USER)
        return None
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise CliError(f"--user {name}: no such user") from None
    if os.geteuid() != 0 and user.pw_uid != os.geteuid():
        raise CliError(f"--user {name}: checking as another user needs root")
    return user


def _checked_settings(path: Path) -> str:
    """The config's effective settings as JSON text, after every check of ``run``'s needs."""
    config = _load(path)
    found = preflight_problems(config)
    if found:
        raise CliError("\n".join(found))
    sections = {
        f.name: dataclasses.asdict(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name != "path"
    }
    sections["milter"]["authserv_id"] = config.authserv_id
    return json.dumps(sections, indent=2, default=str)


def _as_user(user: pwd.struct_passwd, work: Callable[[], str]) -> str:
    """``work()`` in a child process with the user's identity and groups (as systemd's User= gives).

    Returns:
        what ``work`` returned.

    Raises:
        CliError: what ``work`` raised, or the child could not take the identity.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        try:
            os.initgroups(user.pw_name, user.pw_gid)
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            outcome = {"output": work()}
        except CliError as e:
            outcome = {"error": str(e)}
        except BaseException as e:  # reported by the parent; the child must not return into pytest/main
            outcome = {"error": f"checking as {user.pw_name} failed: {e!r}"}
        with os.fdopen(writer, "w", encoding="utf-8") as pipe:
            json.dump(outcome, pipe)
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, encoding="utf-8") as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    outcome = json.loads(text) if text else {"error": f"checking as {user.pw_name} failed"}
    if "error" in outcome:
        raise CliError(outcome["error"])
    return str(outcome["output"])


def _exists_error(path: Path) -> CliError:
    return CliError(f"{path}: already exists; authmilter never overwrites it: choose another selector")


def _write_new_file(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Create ``path`` with ``mode`` (and ``owner``: uid, gid); an existing file is an error,
    never overwritten."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as e:
        raise CliError(f"{path}: cannot create: {e.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        if owner is not None:
            try:
                os.fchown(fd, *owner)  # before the key is written: never readable by the wrong user
            except OSError as e:
                os.unlink(path)
                raise CliError(f"{path}: cannot change the owner: {e.strerror} (run as root)") from None
        file.write(data)


def run_genkey(args: argparse.Namespace) -> str:
    """``authmilter genkey``: write the key and its DNS record; return what to print."""
    private_path = args.dir / f"{args.selector}{PRIVATE_KEY_SUFFIX}"
    record_path = args.dir / f"{args.selector}{DNS_RECORD_SUFFIX}"
    for path in (private_path, record_path):
        if path.exists():
            raise _exists_error(path)
    pem, key = generate_key(args.key_type, args.bits)
    _write_new_file(private_path, pem, 0o600, args.owner_ids)
    record = zone_file_lines(args.selector, args.domain, key, testing=args.testing)
    _write_new_file(record_path, record.encode("ascii"), 0o644)
    key_name = key_record_name(args.selector, args.domain)
    return "\n".join(
        [
            f"wrote {private_path} ({key.description}, mode 0600{_owner_note(args.owner_ids)}) "
            f"and {record_path}",
            f"publish the record in {record_path} in the DNS zone of {args.domain}, then check it with "
            "authmilter keys test",
            "# add to the KeyTable:",
            f"{key_name} {args.domain}:{args.selector}:{private_path}",
            "# add to the SigningTable (a refile: pattern):",
            f"*@{args.domain} {key_name}",
        ]
    )


def _owner_note(owner: tuple[int, int] | None) -> str:
    if owner is None:
        return ""
    return f", owner {pwd.getpwuid(owner[0]).pw_name}:{grp.getgrgid(owner[1]).gr_name}"


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


def _read_old_config(path: Path | None) -> tuple[str, str] | None:
    if path is None:
        return None
    try:
        return str(path), path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise CliError(f"{path}: cannot read: {e.strerror}") from None


def run_migrate(args: argparse.Namespace) -> tuple[str, list[MigrationNote]]:
    """``authmilter migrate``: the config text (already written with --output) and the notes."""
    migration = migrate_configs(_read_old_config(args.opendkim), _read_old_config(args.opendmarc))
    if migration.files and args.output is None:
        raise CliError(
            "OpenDKIM's single-key mode (Domain, KeyFile, Selector): give --output FILE; a KeyTable "
            "and a SigningTable equivalent to it are written next to it"
        )
    base = args.output.absolute().parent if args.output is not None else Path.cwd()
    for name, contents in migration.files.items():
        _write_new_file(base / name, contents.encode(), 0o644)
    check_references(migration, base)
    sources = " and ".join(str(p) for p in (args.opendkim, args.opendmarc) if p is not None)
    text = render_toml(migration, sources)
    if args.output is not None:
        _write_new_file(args.output, text.encode(), 0o644)
        written = [args.output, *(base / name for name in migration.files)]
        migration.notes.append(
            MigrationNote(str(args.output), "written", MigrationVerdict.CARRIED, ", ".join(map(str, written)))
        )
    return text, migration.notes


def print_migration(text: str, notes: list[MigrationNote], to_stdout: bool) -> int:
    """The notes on standard error, the config on standard output unless written; the exit status."""
    for note in notes:
        print(f"authmilter: {note}", file=sys.stderr)
    problems = sum(note.verdict is MigrationVerdict.PROBLEM for note in notes)
    if problems:
        print(f"authmilter: {problems} problem(s) above: fix them, then run checkconf", file=sys.stderr)
    if to_stdout:
        sys.stdout.write(text)
    return 1 if problems else 0


def run_reload(args: argparse.Namespace) -> str:
    """``authmilter reload``: the daemon's status line once the new configuration serves."""
    path = status_path(configured_status_file(args.config) if args.config is not None else "")
    if path is None:
        raise CliError(
            "cannot find the daemon's status file: set [milter] status_file in its config and give "
            "--config FILE (under systemd, $RUNTIME_DIRECTORY is used)"
        )
    try:
        return reload_daemon(path, args.pid, args.timeout).status
    except ReloadError as e:
        raise CliError(str(e)) from None


def run_daemon(args: argparse.Namespace) -> int:
    """``authmilter run``: the supervisor's exit status (0 after a clean stop).

    Logging follows the config's ``[log]`` section (also after a reload), not ``-v``.
    """
    config = _load(args.config)
    try:
        return run_supervisor(config)
    except StartupError as e:
        raise CliError(str(e)) from None


def _delivery_settings(config: Config) -> DeliverySettings:
    """DeliverySettings from the ``[reports]`` keys of the same names (validated at load)."""
    names = [f.name for f in dataclasses.fields(DeliverySettings)]
    section = config.reports
    try:
        return DeliverySettings(**{name: getattr(section, name) for name in names if hasattr(section, name)})
    except (SettingsError, TypeError) as e:
        raise CliError(f"{config.path}: [reports]: {e}") from None


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
        if args.command == "report":
            return run_report(args)
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
        if args.command == "genkey":
            output = run_genkey(args)
        elif args.command == "migrate":
            return print_migration(*run_migrate(args), to_stdout=args.output is None)
        elif args.command == "reload":
            output = run_reload(args)
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


# ---------------------------------------------------------------------------------------------
# `authmilter report`: DMARC aggregate reports (docs/reports.md)


def _add_report_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser(
        "report",
        help="DMARC aggregate reports (RFC 9990): import the history, show the counts, send, prune",
        description="DMARC aggregate reports (RFC 9990) from the history file, through the store "
        "named by [reports] database (docs/reports.md).",
    )
    report_commands = report.add_subparsers(dest="report_command", required=True, metavar="SUBCOMMAND")
    importing = report_commands.add_parser(
        "import",
        help="read history files into the report store",
        description="Read history files into the report store. What was imported before (the same "
        "file, a grown one, a rotated or gzip copy) is never counted again. Corrupt lines, records of "
        "unknown versions and tempfail records are skipped and counted. Exit status 1 when a file "
        "could not be read or the database failed.",
    )
    importing.add_argument(
        "history",
        nargs="*",
        metavar="HISTORY",
        help="history files, plain or gzip (default: [history] path and its rotated siblings)",
    )
    importing.add_argument("--config", type=Path, help=f"the config file (default: {DEFAULT_CONFIG})")
    showing = report_commands.add_parser(
        "show",
        help="show the counts per policy domain",
        description="Per policy domain: messages, DMARC, aligned SPF and DKIM, raw SPF and DKIM "
        "results, dispositions, top source addresses, and its reporting periods.",
    )
    showing.add_argument("--config", type=Path, help=f"the config file (default: {DEFAULT_CONFIG})")
    showing.add_argument("--domain", help="only this policy domain")
    showing.add_argument(
        "--since",
        metavar="TIME",
        help="only periods ending after TIME: 2026-12-05, 2026-12-05T10:00 (UTC), seconds since "
        "the epoch, or an age such as 7d or 12h",
    )
    showing.add_argument("--json", action="store_true", help="print JSON")
    _add_report_send(report_commands)
    _add_report_prune(report_commands)


def parse_time(text: str, now: float) -> int:
    """A point in time from the command line, as seconds since the epoch.

    Accepts seconds since the epoch, an ISO 8601 date or date and time (UTC unless it names a
    zone), or an age: a number followed by d (days) or h (hours) before ``now``.

    Raises:
        ValueError: none of these.
    """
    if text.isdigit():
        return int(text)
    if len(text) > 1 and text[:-1].isdigit() and text[-1] in "dh":
        return int(now) - int(text[:-1]) * (86400 if text[-1] == "d" else 3600)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"'{text}' is not a time: use 2026-12-05, 2026-12-05T10:00 (UTC), epoch seconds, or 7d / 12h"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def _check_report_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Default --config; parse --since and --until into ``args.since_time`` / ``args.until_time``."""
    if args.config is None:
        if not DEFAULT_CONFIG.is_file():
            parser.error(f"no --config given and {DEFAULT_CONFIG} does not exist")
        args.config = DEFAULT_CONFIG
    now = time.time()
    args.since_time, args.until_time = 0, int(now)
    for option in ("since", "until"):
        if getattr(args, option, None) is not None:
            try:
                setattr(args, f"{option}_time", parse_time(getattr(args, option), now))
            except ValueError as e:
                parser.error(f"--{option}: {e}")
    if getattr(args, "out", None) is not None and not args.out.is_dir():
        parser.error(f"report send: --out {args.out}: not a directory")


def run_report(args: argparse.Namespace) -> int:
    """``authmilter report SUBCOMMAND``: the exit status (0 done, 1 a file or the database failed)."""
    config = _load(args.config)
    settings = config.reports
    try:
        with open_store(settings.database, suppress_domains=settings.suppress_domains) as store:
            if args.report_command == "import":
                outcome = import_files(
                    store,
                    args.history or _default_history(config),
                    period=settings.period,
                    suppress_domains=settings.suppress_domains,
                    ended_before=_prune_cutoff(settings.keep_days),
                )
                print(outcome.summary())
                return 1 if outcome.failed else 0
            if args.report_command == "send":
                outcomes = _send_reports(store, config, args)
                print(format_send_outcomes(outcomes, args.dry_run))
                if settings.keep_days and not args.dry_run:
                    _prune_old_periods(store, settings, quiet=True)
                left = (Status.DEFERRED, Status.FAILED)
                return 1 if any(outcome.status in left for outcome in outcomes) else 0
            if args.report_command == "prune":
                if not settings.keep_days:
                    print("[reports] keep_days = 0: the store keeps every period; nothing removed")
                else:
                    _prune_old_periods(store, settings, dry_run=args.dry_run)
                return 0
            print(show_reports(store, since=args.since_time, domain=args.domain, as_json=args.json))
            return 0
    except StoreError as e:
        print(f"authmilter: {e}", file=sys.stderr)
        return 1


def _send_reports(store: Store, config: Config, args: argparse.Namespace) -> list[Outcome]:
    """``report send``: what happened to each report due by ``--until``."""
    delivery = _delivery_settings(config)
    resolver = _resolver(config.dns)
    with SmtpRelay(delivery) as relay:
        return SendRun(store, delivery, resolver, config.dmarc, relay, args.out, args.dry_run).run(
            args.until_time
        )


def _prune_old_periods(
    store: Store, settings: ReportsSettings, *, dry_run: bool = False, quiet: bool = False
) -> None:
    """Delete the periods that ended over ``keep_days`` ago; print what went (``quiet``: only if any)."""
    before = _prune_cutoff(settings.keep_days)
    # Under the send lock, so that no send running meanwhile finds the period of its report gone.
    with contextlib.nullcontext() if dry_run else store.send_lock():
        outcome = store.prune(before, period=settings.period, dry_run=dry_run)
    if outcome.periods or not quiet:
        print(prune_line(outcome, keep_days=settings.keep_days, before=before, dry_run=dry_run))


def _prune_cutoff(keep_days: int) -> int:
    """The end before which periods are pruned and not imported again; 0 (none) for keep_days = 0."""
    return int(time.time()) - keep_days * SECONDS_PER_DAY if keep_days else 0


def _default_history(config: Config) -> list[str]:
    if not config.history.path:
        raise CliError(f"{config.path}: [history] path is not set: give the HISTORY files to import")
    return history_files(config.history.path)

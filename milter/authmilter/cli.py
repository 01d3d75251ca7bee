"""The ``authmilter`` command line.

Three layers, as in aiosmtpd's main.py: ``_parser()`` only builds the parser, ``parse_args()``
does every cross-check through ``parser.error``, ``main(argv)`` acts. Exit status: 0 when the
command did its job (for ``check``: a verdict was printed, whatever it says), 1 when a file or the
configuration is unusable, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from authmilter import __version__
from authmilter.config import Config, ConfigError, default_config, load_config
from authmilter.dkim_rsa import install as install_openssl_rsa
from authmilter.message import parse_message
from authmilter.model import Verdict
from authmilter.pipeline import Connection, Transaction, evaluate
from authmilter.resolver import DnsSettings, ZoneFileError, build_resolver
from authmilter.supervisor import StartupError
from authmilter.supervisor import run as run_supervisor

log = logging.getLogger("authmilter")

# Where `authmilter run` looks without --config (the Debian package's place for it).
DEFAULT_CONFIG = Path("/etc/authmilter/authmilter.toml")


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
    check.add_argument(
        "--zone",
        action="append",
        type=Path,
        default=[],
        help="answer DNS from this RFC 1035 zone file only (repeatable); names outside are NXDOMAIN",
    )
    check.add_argument(
        "--nameserver",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="ask this nameserver instead of the system's (repeatable; [IPv6]:PORT for IPv6 with a port)",
    )
    check.add_argument(
        "--authserv-id", help="the authserv-id to write (default: the config's, or the host name)"
    )
    check.add_argument("--json", action="store_true", help="print the verdict as JSON (docs/verdict-json.md)")

    checkconf = commands.add_parser(
        "checkconf",
        help="validate a config file and print the effective settings",
        description="Validate a config file (and the zone files it names) and print the effective settings.",
    )
    checkconf.add_argument("--config", type=Path, default=Path("conf/authmilter.toml"))

    run = commands.add_parser(
        "run",
        help="run the milter daemon",
        description="Serve the milter protocol on the config's socket with pre-forked workers. "
        "SIGTERM stops gracefully (messages in progress finish), SIGHUP reloads the config "
        "(an invalid one is logged and the running one stays). Readiness goes to systemd "
        "(Type=notify) when $NOTIFY_SOCKET is set.",
    )
    run.add_argument("--config", type=Path, help=f"the config file (default: {DEFAULT_CONFIG})")
    return parser


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
    if args.command == "run" and args.config is None:
        if not DEFAULT_CONFIG.is_file():
            parser.error(f"no --config given and {DEFAULT_CONFIG} does not exist")
        args.config = DEFAULT_CONFIG
    return args


def _load(path: Path | None) -> Config:
    try:
        return load_config(path) if path is not None else default_config()
    except ConfigError as e:
        raise CliError(str(e)) from None


def _check_config(args: argparse.Namespace) -> Config:
    """The config with the command line's DNS and authserv-id choices on top."""
    config = _load(args.config)
    dns = config.dns
    if args.zone:
        dns = dataclasses.replace(dns, zone_files=tuple(str(p) for p in args.zone))
    elif args.nameservers:
        port = args.nameservers[0][1] or 53
        dns = DnsSettings(tuple(h for h, _ in args.nameservers), port, dns.timeout, dns.cache_size, ())
    milter = config.milter
    if args.authserv_id:
        milter = dataclasses.replace(milter, authserv_id=args.authserv_id)
    return dataclasses.replace(config, dns=dns, milter=milter)


def _read_message(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as e:
        raise CliError(f"{name}: cannot read the message: {e.strerror}") from None


def run_check(args: argparse.Namespace) -> Verdict:
    config = _check_config(args)
    try:
        resolver = build_resolver(config.dns)
    except ZoneFileError as e:
        raise CliError(str(e)) from None
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


def run_checkconf(args: argparse.Namespace) -> str:
    config = _load(args.config)
    try:
        build_resolver(config.dns)
    except ZoneFileError as e:
        raise CliError(str(e)) from None
    sections = {
        f.name: dataclasses.asdict(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name != "path"
    }
    sections["milter"]["authserv_id"] = config.authserv_id
    return f"{config.path}: OK\n" + json.dumps(sections, indent=2, default=str)


def run_daemon(args: argparse.Namespace) -> int:
    """``authmilter run``: the supervisor's exit status (0 after a clean stop).

    Logging follows the config's ``[log]`` section (also after a reload), not ``-v``.
    """
    config = _load(args.config)
    try:
        return run_supervisor(config)
    except StartupError as e:
        raise CliError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="authmilter: %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "run":
            return run_daemon(args)
        if args.command == "check":
            verdict = run_check(args)
            output = json.dumps(verdict.as_json(), indent=2) if args.json else format_verdict(verdict)
        else:
            output = run_checkconf(args)
    except CliError as e:
        print(f"authmilter: {e}", file=sys.stderr)
        return 1
    print(output)
    return 0

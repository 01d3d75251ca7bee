"""Config loading and validation (config.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from enum import Enum
from pathlib import Path

import pytest

from authmilter.actions import FailureAction
from authmilter.config import SECTIONS, ConfigError, default_config, load_config, parse_config
from authmilter.dkim_verify import DkimSettings
from authmilter.keys import generate_key
from authmilter.resolver import NameserverSource
from authmilter.settings import bounds_of, choices_of

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_documents_the_defaults() -> None:
    shipped = load_config(ROOT / "conf" / "authmilter.toml")
    defaults = default_config()
    for section in SECTIONS:
        assert getattr(shipped, section) == getattr(defaults, section), section


def test_every_setting_is_documented_in_the_shipped_config() -> None:
    text = (ROOT / "conf" / "authmilter.toml").read_text()
    config = default_config()
    for section in SECTIONS:
        assert f"[{section}]" in text
        for field in dataclasses.fields(getattr(config, section)):
            assert f"{field.name} =" in text, f"[{section}] {field.name} is not documented"


def test_values_are_typed_and_converted(tmp_path: Path) -> None:
    (tmp_path / "zones").mkdir()
    (tmp_path / "zones" / "a.zone").write_text("")
    psl = tmp_path / "psl.dat"
    psl.write_text("com\n")
    config = parse_config(
        f"""
[dmarc]
psl_file = "{psl}"
[policy]
dmarc_temperror = "accept"
never_reject_networks = ["192.0.2.0/24", "2001:db8::1"]
never_reject_domains = ["Example.COM."]
[dns]
timeout = 2
zone_files = ["zones/a.zone"]
""",
        tmp_path / "authmilter.toml",
    )
    assert config.policy.dmarc_temperror is FailureAction.ACCEPT
    assert config.policy.never_reject_networks == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::1/128"),
    )
    assert config.policy.never_reject_domains == ("example.com",)
    assert config.dns.timeout == 2.0 and isinstance(config.dns.timeout, float)
    assert config.dns.zone_files == (str(tmp_path / "zones/a.zone"),)
    assert config.dmarc.psl_file == str(psl)


@pytest.mark.parametrize(
    "text",
    [
        "[dns]\nzone_files = ['missing.zone']\n",
        "[dmarc]\npsl_file = '/nonexistent'\n",
        "[dmarc]\npsl_file = ''\n",
    ],
)
def test_files_named_must_be_readable(tmp_path: Path, text: str) -> None:
    with pytest.raises(
        ConfigError, match=r"authmilter.toml:2: \[(dns|dmarc)\] .*(cannot read file|empty file name)"
    ):
        parse_config(text, tmp_path / "authmilter.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dmarc]\norg_domain = 'dns'\n", ":2: [dmarc] org_domain: 'dns' is not one of: psl, treewalk"),
        ("[milter]\n\nauthserv = 'x'\n", ":3: unknown key 'authserv' in [milter]"),
        ("[dkim]\nmax_signatures = '5'\n", ":2: [dkim] max_signatures: expected an integer, got a string"),
        ("[dkim]\nenabled = 1\n", ":2: [dkim] enabled: expected true or false, got an integer"),
        ("[dkim]\nmin_rsa_bits = 512\n", ":2: [dkim] min_rsa_bits: 512 is out of range (1024 to 16384)"),
        ("[dns]\nport = true\n", ":2: [dns] port: expected an integer, got a boolean"),
        ("[dns]\nnameservers = '127.0.0.1'\n", ":2: [dns] nameservers: expected a list, got a string"),
        (
            "[policy]\nnever_reject_networks = ['10.0.0.0/33']\n",
            "'10.0.0.0/33' is not an IP address or network",
        ),
        ("[policy]\ndmarc_temperror = 'reject'\n", "'reject' is not one of: accept, quarantine, tempfail"),
        ("[policy]\nspf_fail = 'drop'\n", "'drop' is not one of: accept, tempfail, reject, quarantine"),
        ("[spam]\nx = 1\n", ":1: unknown section [spam]"),
        ("[milter]\nsocket = '8990'\n", ":2: [milter] socket: '8990' is not a milter socket"),
        ("[milter]\nsocket = 'inet:99999@127.0.0.1'\n", "is not a milter socket"),
        ("[milter]\nsocket = 'unix:relative/sock'\n", "is not a milter socket"),
        ("[milter]\nsocket_mode = '0999'\n", "'0999' is not an octal mode"),
        ("[milter]\nquarantine = 'discard'\n", "'discard' is not one of: header, hold"),
        ("[history]\npath = 'history.jsonl'\n", ":2: [history] path: must be an absolute path"),
        ("[log]\nlevel = 'verbose'\n", "'verbose' is not one of: debug, error, info, warning"),
        (
            "[dns]\nmessage_time_budget = 300\n",
            ":2: [dns] message_time_budget: 300.0 is out of range (1 to 240)",
        ),
        (
            "[dns]\n\nmessage_query_budget = 5\n",
            ":3: [dns] message_query_budget: 5 is out of range (10 to 10000)",
        ),
        ("[dns]\nmessage_query_budget = 1.5\n", ":2: [dns] message_query_budget: expected an integer"),
        ("[milter]\nidle_timeout = 0\n", ":2: [milter] idle_timeout: 0 is out of range (1 to 7210)"),
        ("[milter]\nidle_timeout = '10m'\n", ":2: [milter] idle_timeout: expected an integer, got a string"),
        ("[dkim\n", ":1: TOML syntax error: Expected ']' at the end of a table declaration (column 6)"),
        ("[dns]\nnameservers = ['ns1.example']\n", ":2: [dns] nameservers: 'ns1.example' is not an IP"),
        ("[dns]\nnameservers = ['127.0.0.1:0']\n", "port must be a number from 1 to 65535"),
        ("dkim = 3\n", "dkim must be a [table]"),
    ],
)
def test_errors_name_file_line_and_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/authmilter.toml")
    assert str(info.value).startswith("/etc/authmilter.toml")
    assert message in str(info.value)


def test_nameservers_take_ip_port_and_bracketed_ipv6_with_port() -> None:
    config = parse_config(
        "[dns]\nnameservers = ['127.0.0.1:21053', '[::1]:5353', '192.0.2.1', '::1']\n", "x.toml"
    )
    assert config.dns.nameservers == ("127.0.0.1:21053", "[::1]:5353", "192.0.2.1", "::1")
    source = NameserverSource(config.dns.nameservers, port=53)
    assert source.description == "127.0.0.1 port 21053,::1 port 5353,192.0.2.1 port 53,::1 port 53"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_authserv_id_defaults_to_host_name() -> None:
    import socket

    assert default_config().authserv_id == socket.gethostname()
    assert parse_config("[milter]\nauthserv_id = 'mx.example'\n", "x.toml").authserv_id == "mx.example"


# --- [milter] internal_hosts and [signing] ---------------------------------------------------------


def test_internal_hosts_as_a_list_in_opendkim_syntax() -> None:
    config = parse_config(
        "[milter]\ninternal_hosts = ['10.0.0.0/8', '!10.9.0.0/16', '.corp.example', '2001:db8::/32']\n",
        "/etc/authmilter.toml",
    )
    hosts = config.internal_hosts
    assert hosts.contains("10.1.2.3") and not hosts.contains("10.9.1.1") and not hosts.contains("127.0.0.1")
    assert hosts.contains("203.0.113.5", "mail.corp.example") and hosts.contains("2001:db8::25")
    entry = hosts.match("10.9.1.1")
    assert entry is not None and entry.source == "/etc/authmilter.toml:[milter].internal_hosts:2"
    assert default_config().internal_hosts.contains("::1")
    assert not parse_config("[milter]\ninternal_hosts = []\n", "x.toml").internal_hosts.contains("127.0.0.1")


@pytest.mark.parametrize("prefix", ["", "refile:"])
def test_internal_hosts_from_a_dataset_file(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "TrustedHosts").write_text(
        "# ours\n192.0.2.0/24\n*.relay.example\n" if prefix else "192.0.2.0/24\n"
    )
    config = parse_config(
        f"[milter]\ninternal_hosts = '{prefix}TrustedHosts'\n", tmp_path / "authmilter.toml"
    )
    assert config.milter.internal_hosts == f"{prefix}{tmp_path / 'TrustedHosts'}"
    assert config.internal_hosts.contains("192.0.2.7")
    assert config.internal_hosts.contains("198.51.100.1", "mx.relay.example") is bool(prefix)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("['10.0.0.0/33']", "authmilter.toml:3: [milter] internal_hosts: /etc/authmilter.toml:[milter]"
         ".internal_hosts:1: '10.0.0.0/33' is not a valid IP address"),
        ("['10.0.0.1/8']", "has host bits set"),
        ("'/nonexistent/hosts'", ":3: [milter] internal_hosts: /nonexistent/hosts: cannot read"),
        ("''", "empty file name"),
        ("[1]", "expected a list of hosts"),
    ],
)  # fmt: skip
def test_internal_hosts_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"[milter]\n\ninternal_hosts = {value}\n", "/etc/authmilter.toml")
    assert message in str(info.value)


def test_ignore_hosts_as_a_list_or_a_dataset_file(tmp_path: Path) -> None:
    config = parse_config("[milter]\nignore_hosts = ['192.0.2.0/24', '!192.0.2.9']\n", "x.toml")
    assert config.ignore_hosts.contains("192.0.2.7") and not config.ignore_hosts.contains("192.0.2.9")
    assert not default_config().ignore_hosts.contains("127.0.0.1")
    (tmp_path / "PeerList").write_text("# peers\n.relay.example\n")
    config = load_config(_write(tmp_path / "authmilter.toml", "[milter]\nignore_hosts = 'PeerList'\n"))
    assert config.ignore_hosts.contains("198.51.100.1", "mx.relay.example")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_client_in_ignore_hosts_and_internal_hosts_is_refused_naming_both_lines(tmp_path: Path) -> None:
    text = "[milter]\ninternal_hosts = ['127.0.0.1', '10.0.0.0/8']\n\nignore_hosts = [\n  '10.9.0.0/16',\n]\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/authmilter.toml")
    assert str(info.value).startswith(
        "/etc/authmilter.toml:4: [milter] ignore_hosts: client 10.9.0.0 is in ignore_hosts ('10.9.0.0/16' "
        "at /etc/authmilter.toml:4) and in internal_hosts ('10.0.0.0/8' at /etc/authmilter.toml:2)"
    )
    # From dataset files: each entry's own file and line.
    _write(tmp_path / "PeerList", "192.0.2.1\n\nrelay.corp.example\n")
    _write(tmp_path / "TrustedHosts", "127.0.0.1\n.corp.example\n")
    config = _write(
        tmp_path / "authmilter.toml", "[milter]\ninternal_hosts = 'TrustedHosts'\nignore_hosts = 'PeerList'\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == (
        f"{config}:3: [milter] ignore_hosts: client relay.corp.example is in ignore_hosts "
        f"('relay.corp.example' at {tmp_path}/PeerList:3) and in internal_hosts ('.corp.example' at "
        f"{tmp_path}/TrustedHosts:2): an ignored client is never processed, an internal one is signed "
        "as ours; remove it from one of the lists"
    )
    # An exclusion keeps the lists apart.
    apart = "[milter]\ninternal_hosts = ['10.0.0.0/8', '!10.9.0.0/16']\nignore_hosts = ['10.9.0.0/16']\n"
    assert parse_config(apart, "x").ignore_hosts.contains("10.9.1.1")


def test_remove_authserv_ids_are_normalised_host_names() -> None:
    config = parse_config("[milter]\nremove_authserv_ids = ['MX2.Example.COM.']\n", "x.toml")
    assert config.milter.remove_authserv_ids == ("mx2.example.com",)
    with pytest.raises(ConfigError, match=r"x.toml:2: \[milter\] remove_authserv_ids: .*not a hostname"):
        parse_config("[milter]\nremove_authserv_ids = ['mx; dkim=pass']\n", "x.toml")


def test_from_multiple_domains_choices() -> None:
    config = parse_config("[policy]\nfrom_multiple_domains = 'reject'\n", "x")
    assert config.policy.from_multiple_domains == "reject"
    with pytest.raises(ConfigError, match=r"x:2: \[policy\] from_multiple_domains: 'refuse' is not one of"):
        parse_config("[policy]\nfrom_multiple_domains = 'refuse'\n", "x")


def test_default_socket_is_no_usual_milter_port() -> None:
    # OpenDKIM 8891, OpenDMARC 8892/8893, OpenARC 8894: a trial beside them must be able to bind.
    assert default_config().milter.socket == "inet:8990@127.0.0.1"


def test_signing_settings_are_converted() -> None:
    config = parse_config(
        "[signing]\ncanonicalization = 'simple/relaxed'\nheaders = ['From', 'Subject', 'X-Custom']\n"
        "oversign_headers = ['From']\nexpire_after = 604800\nsign_daemon_names = ['submission']\n"
        "key_permissions = 'warn'\nsigning_domain = 'sender'\nmultiple_signatures = true\n",
        "/etc/authmilter.toml",
    )
    signing = config.signing
    assert signing.headers == ("from", "subject", "x-custom") and signing.oversign_headers == ("from",)
    assert (signing.canonicalization, signing.expire_after, signing.sign_daemon_names) == (
        "simple/relaxed",
        604800,
        ("submission",),
    )
    assert (signing.key_permissions, signing.signing_domain, signing.multiple_signatures) == (
        "warn",
        "sender",
        True,
    )
    assert config.signing_table is None  # no tables: nothing signs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("canonicalization = 'relaxed'", ":2: [signing] canonicalization: 'relaxed' is not one of"),
        (
            "key_permissions = 'maybe'",
            ":2: [signing] key_permissions: 'maybe' is not one of: ignore, refuse, warn",
        ),
        ("signing_domain = 'to'", ":2: [signing] signing_domain: 'to' is not one of: envelope, from, sender"),
        ("expire_after = -1", ":2: [signing] expire_after: -1 is out of range"),
        ("headers = ['Subject']", ":2: [signing] headers: the list must include From"),
        ("headers = ['From', 'Received']", "'Received' must not be signed"),
        ("oversign_headers = ['Authentication-Results']", "'Authentication-Results' must not be signed"),
        ("headers = ['From', 'a b']", "'a b' is not a header field name"),
        ("sign_daemon_names = ['']", "empty daemon name"),
        (
            "key_table = 'KeyTable'",
            ":2: [signing] key_table: signing_table is not set",
        ),
    ],
)
def test_signing_errors_name_file_line_and_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"[signing]\n{text}\n", "/etc/authmilter.toml")
    assert str(info.value).startswith("/etc/authmilter.toml")
    assert message in str(info.value)


@pytest.fixture(scope="module")
def key_pems() -> dict[str, bytes]:
    return {kind: generate_key(kind)[0] for kind in ("rsa", "ed25519")}


def write_tables(
    folder: Path, key_pems: dict[str, bytes], key_table: str, signing_table: str, mode: int = 0o600
) -> Path:
    for kind, pem in key_pems.items():
        (folder / f"{kind}.private").write_bytes(pem)
        (folder / f"{kind}.private").chmod(mode)
    (folder / "KeyTable").write_text(key_table)
    (folder / "SigningTable").write_text(signing_table)
    config = folder / "authmilter.toml"
    config.write_text("[signing]\nkey_table = 'KeyTable'\nsigning_table = 'refile:SigningTable'\n")
    return config


KEYS = "rsa example.com:rsa:./rsa.private\ned example.com:ed:./ed25519.private:ed25519-sha256\n"


def test_tables_are_loaded_and_keys_checked(tmp_path: Path, key_pems: dict[str, bytes]) -> None:
    config = load_config(write_tables(tmp_path, key_pems, KEYS, "*@example.com rsa\n*@example.com ed\n"))
    assert config.signing.key_table == str(tmp_path / "KeyTable")
    assert config.signing.signing_table == f"refile:{tmp_path / 'SigningTable'}"
    table = config.signing_table
    assert table is not None and table.refile and len(table) == 2 and len(table.key_table) == 2
    assert "PRIVATE" not in repr(config.signing) and not any(
        isinstance(v, bytes) for v in vars(config.signing).values()
    )


@pytest.mark.parametrize(
    ("key_table", "signing_table", "message"),
    [
        ("rsa example.com:rsa\n", "*@example.com rsa\n",
         ":2: [signing] key_table: {d}/KeyTable:1: 'example.com:rsa' lacks a field"),
        (KEYS, "*@example.com rsa\n*@example.com nokey\n",
         ":3: [signing] signing_table: {d}/SigningTable:2: key name 'nokey'"),
        ("rsa example.com:rsa:./rsa.private:ed25519-sha256\n", "* rsa\n",
         ":2: [signing] key_table: {d}/KeyTable:1: key rsa: {d}/rsa.private: the algorithm is ed25519"),
        ("rsa example.com:rsa:./missing.private\n", "* rsa\n",
         ":2: [signing] key_table: {d}/KeyTable:1: key rsa: {d}/missing.private: cannot read"),
    ],
)  # fmt: skip
def test_table_and_key_errors_name_file_and_line(
    tmp_path: Path, key_pems: dict[str, bytes], key_table: str, signing_table: str, message: str
) -> None:
    config = write_tables(tmp_path, key_pems, key_table, signing_table)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value).startswith(f"{config}{message.format(d=tmp_path)}")


def test_readable_key_refused_or_warned(
    tmp_path: Path, key_pems: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    config = write_tables(tmp_path, key_pems, KEYS, "* rsa\n", mode=0o644)
    with pytest.raises(ConfigError, match=r"KeyTable:1: key rsa: .*group or others may read"):
        load_config(config)
    config.write_text(config.read_text() + "key_permissions = 'warn'\n")
    with caplog.at_level(logging.WARNING, logger="authmilter.config"):
        assert load_config(config).signing_table is not None
    assert [r.getMessage().split(": ")[1] for r in caplog.records] == ["key rsa", "key ed"]
    config.write_text(config.read_text().replace("'warn'", "'ignore'"))
    caplog.clear()
    assert load_config(config).signing_table is not None and not caplog.records


def _declared_limits() -> list[tuple[str, str, tuple[float, float] | None, frozenset[str] | None]]:
    return [
        (section, field.name, bounds_of(cls, field.name), choices_of(cls, field.name))
        for section, cls in SECTIONS.items()
        for field in dataclasses.fields(cls)
        if bounds_of(cls, field.name) or choices_of(cls, field.name)
    ]


@pytest.mark.parametrize(("section", "key", "bounds", "choices"), _declared_limits())
def test_a_setting_has_one_bound_at_load_and_where_it_is_defined(
    section: str, key: str, bounds: tuple[float, float] | None, choices: frozenset[str] | None
) -> None:
    cls = SECTIONS[section]
    default = getattr(cls(), key)
    # Just outside the bound (or an unknown word): refused by the settings class and by the loader.
    bad: object = (bounds[0] - 1 if isinstance(default, int) else bounds[0] / 2) if bounds else "nonsense"
    with pytest.raises(ValueError, match=key):
        cls(**{key: bad})
    text = f'[{section}]\n{key} = {bad!r}\n'.replace("'", '"')
    with pytest.raises(ConfigError, match=rf":2: \[{section}\] {key}: "):
        parse_config(text, "/etc/authmilter.toml")
    # And the edge itself is taken by both.
    edge: object = bounds[0] if bounds else sorted(choices or ())[0]
    cls(**{key: edge} if not isinstance(default, Enum) else {key: type(default)(edge)})
    parse_config(f'[{section}]\n{key} = {edge!r}\n'.replace("'", '"'), "/etc/authmilter.toml")


def test_dkim_max_signatures_has_one_bound() -> None:
    # Was >= 0 in dkim_verify.py and 1 to 50 in config.py: 0 verified nothing and reported every
    # signature as policy, which no config file could ask for.
    with pytest.raises(ValueError, match=r"max_signatures: 0 is out of range \(1 to 50\)"):
        DkimSettings(max_signatures=0)


def test_metrics_listen_is_off_by_default_and_takes_ipv4_or_bracketed_ipv6() -> None:
    assert default_config().metrics.address is None
    ipv4 = parse_config('[metrics]\nlisten = "127.0.0.1:9465"\n', "/a.toml")
    assert ipv4.metrics.address == ("127.0.0.1", 9465)
    assert parse_config('[metrics]\nlisten = "[::1]:9465"\n', "/a.toml").metrics.address == ("::1", 9465)


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("localhost:9465", '\'localhost:9465\' is not an address like "127.0.0.1:9465" or "[::1]:9465"'),
        ("::1:9465", "is not an address like"),
        ("[127.0.0.1]:9465", "is not an address like"),
        ("127.0.0.1", "is not an address like"),
        ("127.0.0.1:http", "is not an address like"),
        ("127.0.0.1:70000", "'127.0.0.1:70000': port 70000 is out of range (1 to 65535)"),
    ],
)
def test_metrics_listen_errors_name_file_line_and_form(listen: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[metrics]\n\nlisten = "{listen}"\n', "/etc/authmilter.toml")
    assert str(info.value).startswith("/etc/authmilter.toml:3: [metrics] listen: ")
    assert message in str(info.value)


def test_log_format_is_text_or_json() -> None:
    assert default_config().log.format == "text"
    assert parse_config('[log]\nformat = "json"\n', "/a.toml").log.format == "json"
    with pytest.raises(ConfigError, match=r":2: \[log\] format: 'xml' is not one of: json, text"):
        parse_config('[log]\nformat = "xml"\n', "/a.toml")

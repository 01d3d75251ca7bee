"""Config loading and validation (config.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from authmilter.actions import FailureAction
from authmilter.config import SECTIONS, ConfigError, default_config, load_config, parse_config

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
        ("[milter]\nsocket = '8891'\n", ":2: [milter] socket: '8891' is not a milter socket"),
        ("[milter]\nsocket = 'inet:99999@127.0.0.1'\n", "is not a milter socket"),
        ("[milter]\nsocket = 'unix:relative/sock'\n", "is not a milter socket"),
        ("[milter]\nsocket_mode = '0999'\n", "'0999' is not an octal mode"),
        ("[milter]\nquarantine = 'discard'\n", "'discard' is not one of: header, hold"),
        ("[history]\npath = 'history.jsonl'\n", ":2: [history] path: must be an absolute path"),
        ("[log]\nlevel = 'verbose'\n", "'verbose' is not one of: debug, error, info, warning"),
        ("[dkim\n", "TOML syntax error"),
        ("dkim = 3\n", "dkim must be a [table]"),
    ],
)
def test_errors_name_file_line_and_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/authmilter.toml")
    assert str(info.value).startswith("/etc/authmilter.toml")
    assert message in str(info.value)


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

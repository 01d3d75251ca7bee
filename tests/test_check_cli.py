"""`authmilter check` end to end: real keys, real zone files, the installed command."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from authmilter.cli import main, parse_args, parse_nameserver
from authmilter.config import PACKAGED_CONFIG, packaged_config_path
from dnsserver import AuthoritativeDns, free_port
from signing import SigningKey, ed25519_key, make_message, rsa_key, sign, zone_txt

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_IP = "203.0.113.5"  # not in sender.example's SPF record


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {"rsa": rsa_key(2048), "ed": ed25519_key()}


@pytest.fixture(scope="module")
def zones(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]) -> Path:
    folder = tmp_path_factory.mktemp("zones")
    (folder / "sender.example.zone").write_text(
        "$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n@ IN NS ns\n"
        '@ IN TXT "v=spf1 ip4:192.0.2.0/24 -all"\n'
        '_dmarc IN TXT "v=DMARC1; p=reject"\n'
        f"rsa1._domainkey IN TXT {zone_txt(keys['rsa'].txt_record())}\n"
        f"ed1._domainkey IN TXT {zone_txt(keys['ed'].txt_record())}\n"
    )
    (folder / "quarantine.example.zone").write_text(
        "$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n"
        '@ IN TXT "v=spf1 ip4:192.0.2.0/24 -all"\n_dmarc IN TXT "v=DMARC1; p=quarantine"\n'
    )
    return folder


def run_cli(*argv: str, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    """Run the installed command as a user would; it must succeed without a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "authmilter", *argv],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr
    return result.stdout.decode()


def envelope(
    client_ip: str = OUTSIDE_IP,
    helo: str = "mx.sender.example",
    mail_from: str = "bob@sender.example",
    authserv_id: str = "mx.receiver.example",
) -> list[str]:
    return [
        "check",
        "--client-ip",
        client_ip,
        "--helo",
        helo,
        "--mail-from",
        mail_from,
        "--authserv-id",
        authserv_id,
    ]


def check(
    zones: Path,
    message: bytes,
    *extra: str,
    client_ip: str = OUTSIDE_IP,
    mail_from: str = "bob@sender.example",
) -> dict[str, object]:
    """The JSON verdict for ``message`` with every zone file of ``zones``."""
    zone_args = [arg for zone in sorted(zones.glob("*.zone")) for arg in ("--zone", str(zone))]
    output = run_cli(
        *envelope(client_ip, mail_from=mail_from), *zone_args, "--json", *extra, "-", stdin=message
    )
    verdict: dict[str, object] = json.loads(output)
    return verdict


def test_readme_example_prints_the_header() -> None:
    output = run_cli(
        *envelope("192.0.2.10"),
        "--zone",
        "tests/zones/sender.example.zone",
        "tests/zones/message.eml",
        cwd=ROOT,
    )
    assert output.splitlines()[0] == "Authentication-Results: mx.receiver.example;"
    for part in (
        "spf=pass smtp.mailfrom=bob@sender.example",
        "spf=pass smtp.helo=mx.sender.example",
        "dkim=none",
        "dmarc=pass",
        "header.from=sender.example",
    ):
        assert part in output
    assert "action: accept" in output


def test_rsa_and_ed25519_signatures_pass_and_align(
    zones: Path, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    message = sign(
        sign(make_message(), keys["rsa"], "sender.example", "rsa1"), keys["ed"], "sender.example", "ed1"
    )
    verdict = check(zones, message)
    dkim = verdict["dkim"]
    assert isinstance(dkim, list)
    assert [(d["result"], d["algorithm"], d["selector"], d["domain"]) for d in dkim] == [
        ("pass", "ed25519-sha256", "ed1", "sender.example"),
        ("pass", "rsa-sha256", "rsa1", "sender.example"),
    ]
    assert verdict["spf"] == {
        "result": "fail",
        "domain": "sender.example",
        "identity": "bob@sender.example",
        "explanation": verdict["spf"]["explanation"],
    }  # type: ignore[index]
    dmarc = verdict["dmarc"]
    assert isinstance(dmarc, dict)
    assert (dmarc["result"], dmarc["dkim_aligned"], dmarc["spf_aligned"]) == ("pass", True, False)
    assert (dmarc["policy"], dmarc["disposition"], dmarc["from_domain"]) == (
        "reject",
        "none",
        "sender.example",
    )
    assert verdict["action"] == "accept" and verdict["smtp_reply"] is None
    ar = verdict["authentication_results"]
    assert isinstance(ar, str)
    assert "header.a=ed25519-sha256" in ar and "header.a=rsa-sha256" in ar and "dmarc=pass" in ar


def test_spoofed_message_is_rejected_with_550(zones: Path, tmp_path: Path) -> None:
    verdict = check(zones, make_message())
    assert verdict["dkim"] == []
    assert verdict["dmarc"]["result"] == "fail"  # type: ignore[index]
    assert verdict["dmarc"]["disposition"] == "reject"  # type: ignore[index]
    assert verdict["action"] == "reject"
    reply = verdict["smtp_reply"]
    assert isinstance(reply, dict)
    assert reply["code"] == "550" and reply["enhanced_code"].startswith("5.7.")
    assert "sender.example" in reply["text"]


def test_tampered_body_fails_dkim_and_dmarc(zones: Path, keys: dict[str, SigningKey], tmp_path: Path) -> None:
    message = sign(make_message(), keys["rsa"], "sender.example", "rsa1").replace(b"tomorrow", b"today!!!")
    verdict = check(zones, message)
    assert verdict["dkim"][0]["result"] == "fail"  # type: ignore[index]
    assert verdict["action"] == "reject"


def test_quarantine_policy(zones: Path) -> None:
    verdict = check(zones, make_message(from_header="q@quarantine.example"), mail_from="q@quarantine.example")
    assert verdict["dmarc"]["disposition"] == "quarantine" and verdict["action"] == "quarantine"  # type: ignore[index]


def test_config_policy_applies(zones: Path, tmp_path: Path) -> None:
    config = tmp_path / "trial.toml"
    config.write_text("[policy]\nenforce = false\n")
    verdict = check(zones, make_message(), "--config", str(config))
    assert verdict["dmarc"]["result"] == "fail" and verdict["action"] == "accept"  # type: ignore[index]


def test_no_from_header_is_permerror_and_rejected(zones: Path, tmp_path: Path) -> None:
    message = b"To: alice@receiver.example\r\nSubject: x\r\n\r\nbody\r\n"
    verdict = check(zones, message, client_ip="192.0.2.10")
    assert verdict["dmarc"]["result"] == "permerror"  # type: ignore[index]
    assert verdict["action"] == "reject"
    assert verdict["smtp_reply"]["code"] == "550"  # type: ignore[index]


def test_stdin_and_text_output(zones: Path, keys: dict[str, SigningKey], tmp_path: Path) -> None:
    message = sign(make_message(), keys["ed"], "sender.example", "ed1")
    path = tmp_path / "signed.eml"
    path.write_bytes(message)
    from_file = run_cli(
        *envelope("192.0.2.10", mail_from="<>"), "--zone", str(zones / "sender.example.zone"), str(path)
    )
    from_stdin = run_cli(
        *envelope("192.0.2.10", mail_from="<>"),
        "--zone",
        str(zones / "sender.example.zone"),
        "-",
        stdin=message,
    )
    assert from_file == from_stdin
    # Null sender: the MAIL FROM identity is postmaster@<helo> (RFC 7208 §2.4).
    assert "smtp.mailfrom=postmaster@mx.sender.example" in from_stdin
    assert "dkim=pass" in from_stdin and "header.s=ed1" in from_stdin


def test_json_verdict_has_the_documented_keys(zones: Path, tmp_path: Path) -> None:
    verdict = check(zones, make_message())
    assert set(verdict) >= {
        "version",
        "spf",
        "helo",
        "dkim",
        "dmarc",
        "action",
        "smtp_reply",
        "authentication_results",
    }
    assert set(verdict["spf"]) >= {"result", "domain"}  # type: ignore[arg-type]
    assert set(verdict["helo"]) >= {"result", "domain"}  # type: ignore[arg-type]
    assert set(verdict["dmarc"]) >= {
        "result",
        "policy",
        "disposition",
        "from_domain",
        "policy_domain",  # type: ignore[arg-type]
        "org_domain",
        "spf_aligned",
        "dkim_aligned",
    }
    documented = (ROOT / "docs" / "verdict-json.md").read_text()
    for key in verdict:
        assert f"`{key}`" in documented, f"{key} is not documented in docs/verdict-json.md"


EXAMPLE_MESSAGE = str(ROOT / "tests" / "zones" / "message.eml")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--zone", "/nonexistent/x.zone", EXAMPLE_MESSAGE], "/nonexistent/x.zone: cannot read zone file"),
        (
            ["--config", "/nonexistent/a.toml", EXAMPLE_MESSAGE],
            "/nonexistent/a.toml: cannot read config file",
        ),
        (["/nonexistent/nope.eml"], "/nonexistent/nope.eml: cannot read the message"),
    ],
)
def test_file_errors_exit_1_with_a_clear_message(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*envelope("192.0.2.1"), *extra]) == 1
    assert message in capsys.readouterr().err


def test_broken_zone_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zone = tmp_path / "broken.example.zone"
    zone.write_text("$TTL 300\n@ IN SOA ns hostmaster 1 2 3 4 5\n@ IN MX ten mx\n")
    assert main([*envelope("192.0.2.1"), "--zone", str(zone), EXAMPLE_MESSAGE]) == 1
    assert f"{zone}:3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["--zone", "z", "--nameserver", "127.0.0.1"],
        ["--nameserver", "ns.example"],
    ],
)
def test_usage_errors(extra: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args([*envelope("192.0.2.1"), *extra, "m"])
    assert info.value.code == 2


def test_client_ip_must_be_an_address() -> None:
    with pytest.raises(SystemExit) as info:
        parse_args([*envelope("999.1.1.1"), "m"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1", ("127.0.0.1", None)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", None)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:db8::1]", ("2001:db8::1", None)),
    ],
)
def test_parse_nameserver(text: str, parsed: tuple[str, int | None]) -> None:
    assert parse_nameserver(text) == parsed


@pytest.mark.parametrize("text", ["127.0.0.1:0", "127.0.0.1:70000", "[::1", "[::1]x", "host:53"])
def test_parse_nameserver_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


@pytest.fixture(scope="module")
def published(dns_server: AuthoritativeDns, keys: dict[str, SigningKey]) -> AuthoritativeDns:
    """cli.example published on the real authoritative server."""
    dns_server.add_zone(
        "cli.example",
        '@ IN TXT "v=spf1 ip4:192.0.2.0/24 -all"\n'
        '_dmarc IN TXT "v=DMARC1; p=reject"\n'
        f"ed1._domainkey IN TXT {zone_txt(keys['ed'].txt_record())}\n",
    )
    dns_server.reload()
    return dns_server


def check_with_nameserver(nameserver: str, message: bytes, *extra: str) -> dict[str, object]:
    output = run_cli(
        *envelope(helo="mx.cli.example", mail_from="bob@cli.example"),
        "--nameserver",
        nameserver,
        "--json",
        *extra,
        "-",
        stdin=message,
    )
    verdict: dict[str, object] = json.loads(output)
    return verdict


def test_nameserver_asks_real_dns(published: AuthoritativeDns, keys: dict[str, SigningKey]) -> None:
    message = sign(make_message(from_header="bob@cli.example"), keys["ed"], "cli.example", "ed1")
    verdict = check_with_nameserver(f"{published.host}:{published.port}", message)
    assert verdict["spf"]["result"] == "fail"  # type: ignore[index]
    assert verdict["dkim"][0]["result"] == "pass"  # type: ignore[index]
    assert verdict["dmarc"]["result"] == "pass" and verdict["action"] == "accept"  # type: ignore[index]
    unsigned = check_with_nameserver(
        f"{published.host}:{published.port}", make_message(from_header="bob@cli.example")
    )
    assert unsigned["action"] == "reject"


def test_dns_outage_tempfails(tmp_path: Path) -> None:
    config = tmp_path / "fast.toml"
    config.write_text("[dns]\ntimeout = 1.0\n")
    silent = f"127.0.0.1:{free_port('127.0.0.1')}"  # nothing answers there
    verdict = check_with_nameserver(
        silent, make_message(from_header="bob@cli.example"), "--config", str(config)
    )
    assert verdict["spf"]["result"] == "temperror"  # type: ignore[index]
    assert verdict["dmarc"]["result"] == "temperror"  # type: ignore[index]
    assert verdict["action"] == "tempfail"
    assert verdict["smtp_reply"]["code"] == "451"  # type: ignore[index]


def test_checkconf_prints_the_effective_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkconf", "--config", str(ROOT / "conf" / "authmilter.toml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{ROOT / 'conf' / 'authmilter.toml'}: OK")
    settings = json.loads(out.split("\n", 1)[1])
    assert settings["dmarc"]["org_domain"] == "treewalk" and settings["milter"]["authserv_id"]


def test_checkconf_names_file_and_line_of_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dkim]\nmax_signatures = 0\n")
    assert main(["checkconf", "--config", str(bad)]) == 1
    assert f"{bad}:2: [dkim] max_signatures" in capsys.readouterr().err


def test_the_default_config_is_packaged_and_printed(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = (ROOT / "conf" / "authmilter.toml").read_text()
    # One copy: the package's file is conf/authmilter.toml (a symlink in the source tree), and the
    # wheel carries it as package data.
    assert packaged_config_path().read_text() == shipped
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert PACKAGED_CONFIG in package_data["authmilter"]
    with pytest.raises(SystemExit) as info:
        parse_args(["--print-default-config"])
    assert info.value.code == 0
    assert capsys.readouterr().out == shipped


def test_checkconf_defaults_to_the_daemons_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import authmilter.cli

    monkeypatch.setattr(authmilter.cli, "DEFAULT_CONFIG", tmp_path / "missing.toml")
    assert parse_args(["checkconf"]).config == packaged_config_path()  # what `run` would use
    (tmp_path / "present.toml").write_text("")
    monkeypatch.setattr(authmilter.cli, "DEFAULT_CONFIG", tmp_path / "present.toml")
    assert parse_args(["checkconf"]).config == tmp_path / "present.toml"

"""`authmilter sign`: what the daemon would add, checked by `authmilter check` and dkimpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from authmilter.cli import main
from authmilter.keys import PrivateKey, dns_record, generate_key
from signing import make_message, zone_txt

OUTSIDE_IP = "203.0.113.5"  # not in sender.example's SPF record: DMARC passes through DKIM alone
SOA = "$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config with an RSA and an Ed25519 key for sender.example (relative paths), and its zone."""
    folder = tmp_path_factory.mktemp("site")
    keys: dict[str, PrivateKey] = {}
    for name, kind in (("rsa", "rsa"), ("ed", "ed25519")):
        pem, keys[name] = generate_key(kind)
        (folder / f"{name}.private").write_bytes(pem)
        os.chmod(folder / f"{name}.private", 0o600)
    (folder / "KeyTable").write_text(
        "rsa sender.example:rsa:./rsa.private\ned sender.example:ed:./ed.private\n"
    )
    (folder / "SigningTable").write_text("*@sender.example rsa\n*@sender.example ed\n")
    (folder / "EdOnly").write_text("*@sender.example ed\n")
    (folder / "authmilter.toml").write_text(
        '[signing]\nkey_table = "KeyTable"\nsigning_table = "refile:SigningTable"\n'
        "multiple_signatures = true\n"
    )
    records = "".join(f"{n}._domainkey IN TXT {zone_txt(dns_record(k))}\n" for n, k in keys.items())
    (folder / "sender.example.zone").write_text(
        SOA + '@ IN TXT "v=spf1 ip4:192.0.2.0/24 -all"\n_dmarc IN TXT "v=DMARC1; p=reject"\n' + records
    )
    return folder


def run_cli(*argv: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [sys.executable, "-m", "authmilter", *argv], input=stdin, capture_output=True, timeout=60, check=False
    )
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    return result


def checked(site: Path, message: bytes) -> dict[str, object]:
    envelope = ["--client-ip", OUTSIDE_IP, "--helo", "mx.sender.example", "--mail-from", "bob@sender.example"]
    result = run_cli(
        "check", *envelope, "--zone", str(site / "sender.example.zone"), "--json", "-", stdin=message
    )
    assert result.returncode == 0, result.stderr.decode()
    verdict: dict[str, object] = json.loads(result.stdout)
    return verdict


def test_signed_message_passes_check_with_both_signatures(site: Path) -> None:
    message = make_message()
    result = run_cli("sign", "--config", str(site / "authmilter.toml"), "-", stdin=message)
    assert result.returncode == 0, result.stderr.decode()
    signed = result.stdout
    assert signed.endswith(message) and signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert b"authmilter: signed for bob@sender.example: d=sender.example s=rsa (" in result.stderr
    verdict = checked(site, signed)
    assert [(d["result"], d["selector"]) for d in verdict["dkim"]] == [  # type: ignore[attr-defined]
        ("pass", "rsa"),
        ("pass", "ed"),
    ]
    assert verdict["dmarc"]["result"] == "pass"  # type: ignore[index]
    assert verdict["action"] == "accept"


def test_flags_override_the_config_tables(site: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    message = site / "message.eml"
    message.write_bytes(make_message())
    status = main(
        ["sign", "--config", str(site / "authmilter.toml"), "--key-table", str(site / "KeyTable"),
         "--signing-table", f"refile:{site / 'EdOnly'}", str(message)]
    )  # fmt: skip
    assert status == 0
    signed = capsysbinary.readouterr().out
    assert signed.count(b"DKIM-Signature:") == 1 and b"a=ed25519-sha256" in signed
    assert [d["result"] for d in checked(site, signed)["dkim"]] == ["pass"]  # type: ignore[attr-defined]


def test_bare_lf_message_stays_bare_lf_and_verifies(
    site: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    message = site / "lf.eml"
    message.write_bytes(make_message().replace(b"\r\n", b"\n"))
    assert main(["sign", "--config", str(site / "authmilter.toml"), str(message)]) == 0
    signed = capsysbinary.readouterr().out
    assert b"\r" not in signed and signed.count(b"DKIM-Signature:") == 2
    assert [d["result"] for d in checked(site, signed)["dkim"]] == ["pass", "pass"]  # type: ignore[attr-defined]


def test_unmatched_sender_is_printed_unsigned_saying_why(
    site: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    message = site / "other.eml"
    message.write_bytes(make_message(from_header="olga@other.example"))
    assert main(["sign", "--config", str(site / "authmilter.toml"), str(message)]) == 0
    out, err = capsysbinary.readouterr()
    assert out == message.read_bytes()
    assert b"not signed: no SigningTable entry for olga@other.example (tried 2 patterns" in err


def test_envelope_signing_domain_uses_mail_from(
    site: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    config = site / "envelope.toml"
    config.write_text((site / "authmilter.toml").read_text() + 'signing_domain = "envelope"\n')
    message = site / "env.eml"
    message.write_bytes(make_message(from_header="olga@other.example"))
    assert main(["sign", "--config", str(config), "--mail-from", "<bob@sender.example>", str(message)]) == 0
    assert capsysbinary.readouterr().out.count(b"DKIM-Signature:") == 2


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        (
            "*@sender.example rsa\n*@sender.example nosuchkey\n",
            "SigningTable:2: key name 'nosuchkey' is not in",
        ),
        ("*@sender.example rsa\n*@sender.example rsa\n", "SigningTable:2: '*@sender.example' already names"),
    ],
)
def test_bad_tables_exit_1_naming_file_and_line(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, problem: str
) -> None:
    (tmp_path / "SigningTable").write_text(table)
    tables = ["--key-table", str(site / "KeyTable"), "--signing-table", f"refile:{tmp_path / 'SigningTable'}"]
    status = main(["sign", *tables, "-"])
    assert status == 1
    assert problem in capsys.readouterr().err


def test_config_without_tables_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.toml").write_text("")
    assert main(["sign", "--config", str(tmp_path / "empty.toml"), "-"]) == 1
    assert "no [signing] key_table and signing_table" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-"], "give --config FILE, or --key-table FILE and --signing-table FILE"),
        (["--key-table", "kt", "-"], "give --key-table and --signing-table together"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sign", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err

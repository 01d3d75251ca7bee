"""`authmilter genkey` and `authmilter keys test` end to end: real files, a real DNS server, zone files."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import dns.rdatatype
import dns.zone
import pytest

from authmilter.cli import main, parse_args
from authmilter.keys import dns_record, load_private_key
from dnsserver import AuthoritativeDns, free_port

DOMAIN = "keystest.example"
SENDER_ZONE = Path(__file__).resolve().parent / "zones" / "sender.example.zone"


def genkey(capsys: pytest.CaptureFixture[str], directory: Path, selector: str, *extra: str) -> str:
    """Run genkey; it must succeed. Returns what it printed."""
    status = main(["genkey", "--domain", DOMAIN, "--selector", selector, "--dir", str(directory), *extra])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An RSA key `rsa1` and an Ed25519 key `ed1`, made by genkey once for the module."""
    folder = tmp_path_factory.mktemp("genkey")
    for argv in (["--selector", "rsa1", "--bits", "1024"], ["--selector", "ed1", "--type", "ed25519"]):
        assert main(["genkey", "--domain", DOMAIN, "--dir", str(folder), *argv]) == 0
    return folder


def records_of(folder: Path, *selectors: str) -> str:
    return "".join((folder / f"{s}.txt").read_text() for s in selectors)


def write_key_table(folder: Path, lines: list[str]) -> Path:
    path = folder / "KeyTable"
    path.write_text("# written by test_keys_cli\n" + "\n".join(lines) + "\n")
    return path


def entry(folder: Path, selector: str, key_file: str = "") -> str:
    """A KeyTable line as genkey prints it."""
    return f"{selector}._domainkey.{DOMAIN} {DOMAIN}:{selector}:{folder / (key_file or selector)}.private"


def keys_test(capsys: pytest.CaptureFixture[str], key_table: Path, *dns_args: str) -> tuple[int, list[str]]:
    status = main(["keys", "test", "--key-table", str(key_table), *dns_args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out.splitlines()


# --- genkey ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "algorithm", "bits", "k_tag"),
    [
        ([], "rsa-sha256", 2048, "k=rsa"),
        (["--type", "ed25519", "--testing"], "ed25519-sha256", 256, "k=ed25519; t=y"),
    ],
)
def test_genkey_writes_key_and_record_and_prints_table_lines(
    argv: list[str],
    algorithm: str,
    bits: int,
    k_tag: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old_umask = os.umask(0o277)  # the modes must not depend on the umask
    try:
        out = genkey(capsys, tmp_path, "s2026", *argv)
    finally:
        os.umask(old_umask)
    private, record = tmp_path / "s2026.private", tmp_path / "s2026.txt"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(record.stat().st_mode) == 0o644
    key = load_private_key(str(private))  # refuses any other mode
    assert (key.algorithm, key.bits) == (algorithm, bits)
    zone = dns.zone.from_text(
        "$TTL 300\n" + record.read_text(), origin=f"{DOMAIN}.", relativize=False, check_origin=False
    )
    (rdata,) = zone.find_rdataset(f"s2026._domainkey.{DOMAIN}.", dns.rdatatype.TXT)
    joined = b"".join(rdata.strings).decode()
    assert joined == dns_record(key, testing="--testing" in argv)
    assert f"v=DKIM1; {k_tag}; p=" in joined
    lines = out.splitlines()
    assert f"s2026._domainkey.{DOMAIN} {DOMAIN}:s2026:{private}" in lines
    assert f"*@{DOMAIN} s2026._domainkey.{DOMAIN}" in lines


def test_genkey_normalises_the_domain_and_makes_the_path_absolute(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    status = main(["genkey", "--domain", "KeysTest.Example.", "--selector", "a1", "--type", "ed25519"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert f"a1._domainkey.{DOMAIN} {DOMAIN}:a1:{tmp_path.resolve()}/a1.private" in out.splitlines()


@pytest.mark.parametrize("existing", ["x.private", "x.txt"])
def test_genkey_never_overwrites(existing: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / existing).write_text("keep me")
    status = main(
        ["genkey", "--domain", DOMAIN, "--selector", "x", "--dir", str(tmp_path), "--type", "ed25519"]
    )
    _, err = capsys.readouterr()
    assert status == 1
    assert f"{tmp_path / existing}: already exists" in err
    assert (tmp_path / existing).read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # nothing half-written


def test_genkey_into_a_missing_directory_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["genkey", "--domain", DOMAIN, "--selector", "x", "--dir", str(tmp_path / "no"), "--type", "ed25519"]
    )
    assert status == 1
    assert "cannot create: No such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--type", "ed25519", "--bits", "2048"], "--bits applies to RSA keys only"),
        (["--bits", "512"], "--bits must be 1024 to 4096"),
        (["--bits", "8192"], "--bits must be 1024 to 4096"),
        (["--selector", "bad_selector"], "selector 'bad_selector'"),
        (["--domain", "localhost"], "at least two labels"),
        (["--dir", "/tmp/with space"], "cannot hold spaces or ':'"),
    ],
)
def test_genkey_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--domain": DOMAIN, "--selector": "s1"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    with pytest.raises(SystemExit) as e:
        parse_args(["genkey", *[x for pair in base.items() for x in pair]])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# --- keys test -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--key-table FILE is required"),
        (["--key-table", "kt", "--zone", "z", "--nameserver", "127.0.0.1"], "exclude each other"),
        (["--key-table", "kt", "--nameserver", "not-an-ip"], "--nameserver"),
    ],
)
def test_keys_test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["keys", "test", *argv])
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def published(dns_server: AuthoritativeDns, generated: Path) -> tuple[str, ...]:
    """Serve both generated records from the real DNS server; return the --nameserver arguments."""
    dns_server.add_zone(DOMAIN, records_of(generated, "rsa1", "ed1"))
    dns_server.reload()
    return ("--nameserver", f"{dns_server.host}:{dns_server.port}")


def test_keys_test_ok_against_a_real_dns_server(
    generated: Path, published: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    key_table = write_key_table(generated, [entry(generated, "rsa1"), entry(generated, "ed1")])
    status, lines = keys_test(capsys, key_table, *published)
    assert status == 0, lines
    assert len(lines) == 2
    assert re.fullmatch(rf".*rsa1\._domainkey\.{DOMAIN}: OK \(key size 1024 bits \(RFC 8301 .*\)\)", lines[0])
    assert re.fullmatch(rf".*ed1\._domainkey\.{DOMAIN}: OK \(Ed25519: .*\)", lines[1])
    assert str(key_table) in lines[0]  # where the entry is


def test_keys_test_ok_against_a_zone_file(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zone = tmp_path / f"{DOMAIN}.zone"
    zone.write_text("$TTL 300\n" + records_of(generated, "rsa1", "ed1"))
    key_table = write_key_table(tmp_path, [entry(generated, "rsa1"), entry(generated, "ed1")])
    status, lines = keys_test(capsys, key_table, "--zone", str(zone))
    assert status == 0, lines
    assert len(lines) == 2
    assert all(re.search(rf"\._domainkey\.{DOMAIN}: OK ", line) for line in lines), lines


def test_keys_test_reports_a_mismatched_and_a_missing_record(
    generated: Path, published: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_table = write_key_table(
        tmp_path,
        [
            entry(generated, "rsa1"),
            # rsa1's record, but the key file of ed1: the wrong key.
            f"wrong {DOMAIN}:rsa1:{generated / 'ed1.private'}",
            entry(generated, "absent", key_file="rsa1"),
        ],
    )
    status, lines = keys_test(capsys, key_table, *published)
    assert status == 1
    ok, wrong, absent = lines
    assert ": OK" in ok
    assert f"rsa1._domainkey.{DOMAIN} (key wrong): FAIL: k=rsa but the private key is ed25519" in wrong
    assert f"absent._domainkey.{DOMAIN}: FAIL: no key record is published" in absent


def test_keys_test_reports_a_key_of_another_key_pair(
    generated: Path, published: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["genkey", "--domain", DOMAIN, "--selector", "other", "--dir", str(tmp_path), "--bits", "1024"])
        == 0
    )
    key_table = write_key_table(
        tmp_path, [f"rsa1._domainkey.{DOMAIN} {DOMAIN}:rsa1:{tmp_path / 'other.private'}"]
    )
    capsys.readouterr()
    status, (line,) = keys_test(capsys, key_table, *published)
    assert status == 1
    assert (
        f"FAIL: p= (another RSA key, 1024 bits) is not the public half of {tmp_path / 'other.private'}"
        in line
    )


def test_keys_test_reports_key_file_problems_and_skips_percent(
    generated: Path, published: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readable = tmp_path / "rsa1.private"
    readable.write_bytes((generated / "rsa1.private").read_bytes())
    readable.chmod(0o644)
    key_table = write_key_table(
        tmp_path,
        [
            f"any %:rsa1:{generated / 'rsa1.private'}",
            f"rsa1._domainkey.{DOMAIN} {DOMAIN}:rsa1:{readable}",
            f"gone._domainkey.{DOMAIN} {DOMAIN}:gone:{tmp_path / 'gone.private'}",
        ],
    )
    status, (skipped, loose, gone) = keys_test(capsys, key_table, *published)
    assert status == 1
    assert skipped.endswith("any: skipped: the domain is %, each message's own")
    # The permission problem is reported, and the record (which matches) was still checked.
    assert re.search(r": FAIL: .*\(mode 0644\); let only the milter's user read it.*\(key size 1024", loose)
    assert "FAIL: " in gone and "cannot read the key file: No such file or directory" in gone


def test_keys_test_reports_a_dns_failure(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_table = write_key_table(tmp_path, [entry(generated, "ed1")])
    config = tmp_path / "authmilter.toml"
    config.write_text("[dns]\ntimeout = 0.5\n")  # --config's DNS settings apply under --nameserver
    nobody = f"127.0.0.1:{free_port('127.0.0.1')}"
    status, (line,) = keys_test(capsys, key_table, "--config", str(config), "--nameserver", nobody)
    assert status == 1
    assert "FAIL: the DNS lookup failed (" in line


def test_keys_test_with_an_unreadable_key_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["keys", "test", "--key-table", str(tmp_path / "missing"), "--zone", str(SENDER_ZONE)])
    assert status == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_keys_test_with_an_empty_key_table_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_table = write_key_table(tmp_path, [])
    status, lines = keys_test(capsys, key_table, "--zone", str(SENDER_ZONE))
    assert (status, lines) == (1, [f"{key_table}: no keys to test"])

"""`authmilter migrate`: Debian's packaged opendkim.conf and opendmarc.conf (copied into
tests/migrate/ from Debian 12's packages opendkim 2.11 and opendmarc 1.4.2), a pair of configs using
every setting issue 12 lists, OpenDKIM's single-key mode, and the file syntax.

The Postfix round trip (migrate, checkconf, then mail through the migrated daemon) is
tests/integration/test_migrate_postfix.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from authmilter.cli import main
from authmilter.config import load_config, parse_config
from authmilter.keys import generate_key
from authmilter.migrate import Verdict, migrate, parse_boolean, parse_conf, parse_dataset, render_toml
from signing import make_message

FIXTURES = Path(__file__).resolve().parent / "migrate"
DEBIAN_OPENDKIM = FIXTURES / "debian-opendkim.conf"
DEBIAN_OPENDMARC = FIXTURES / "debian-opendmarc.conf"
def run_migrate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    status = main(["migrate", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


# --- Debian's packaged configs --------------------------------------------------------------------


def test_debians_packaged_configs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, notes = run_migrate(
        capsys, "--opendkim", str(DEBIAN_OPENDKIM), "--opendmarc", str(DEBIAN_OPENDMARC)
    )
    assert status == 0, notes
    data = tomllib.loads(out)
    # The old pair's behaviour, where authmilter's defaults differ: OpenDMARC only reported.
    assert data["policy"] == {
        "enforce": False,
        "dmarc_temperror": "accept",
        "from_error": "accept",
        "from_multiple_domains": "evaluate",
    }
    assert data["milter"]["quarantine"] == "header"
    assert data["milter"]["internal_hosts"] == ["127.0.0.1"]
    assert data["milter"]["socket"] == "unix:/run/opendkim/opendkim.sock", "OpenDKIM's socket, read first"
    assert data["signing"] == {"canonicalization": "relaxed/simple", "oversign_headers": ["from"]}
    assert data["log"] == {"destination": "syslog"}
    assert data["dmarc"]["org_domain"] == "psl"
    assert "history" not in data and "key_table" not in data["signing"]
    # Every setting line of both files gets a verdict.
    for path in (DEBIAN_OPENDKIM, DEBIAN_OPENDMARC):
        for setting in parse_conf(path.read_text(), str(path)):
            assert any(note.startswith(f"authmilter: {setting.source}: {setting.name}") for note in notes), (
                setting
            )
    assert any("TrustAnchorFile /usr/share/dns/root.key: not supported: authmilter does not validate" in n
               for n in notes)  # fmt: skip
    assert any("RejectFailures (not set: false): default kept: [policy] enforce = false" in n for n in notes)
    config = tmp_path / "authmilter.toml"
    config.write_text(out)
    loaded = load_config(config)
    assert loaded.policy.enforce is False and loaded.milter.quarantine == "header"


def test_the_debian_fixtures_are_the_packaged_files() -> None:
    """Installed by `make deps` (opendkim); opendmarc's copy came from its Debian 12 package."""
    installed = Path("/etc/opendkim.conf")
    if installed.is_file():
        assert installed.read_text() == DEBIAN_OPENDKIM.read_text()
    assert "PublicSuffixList /usr/share/publicsuffix/public_suffix_list.dat" in DEBIAN_OPENDMARC.read_text()


# --- every setting of the issue ------------------------------------------------------------------


def old_pair(tmp_path: Path) -> tuple[Path, Path]:
    """opendkim.conf and opendmarc.conf using every setting issue 12 lists, with real tables."""
    key = tmp_path / "k1.private"
    key.write_bytes(generate_key("rsa", 1024)[0])
    key.chmod(0o600)
    (tmp_path / "KeyTable").write_text(f"k1 example.com:s1:{key}\n")
    (tmp_path / "SigningTable").write_text("*@example.com k1\n")
    (tmp_path / "PeerList").write_text("10.9.0.0/16\n")
    (tmp_path / "IgnoreHosts").write_text("192.0.2.0/24\n")
    dkim = tmp_path / "opendkim.conf"
    dkim.write_text(
        f"""# every setting
Socket\t\t\tinet:8891@localhost
Mode\t\t\tsv
Domain\t\t\texample.com
KeyFile\t\t\t{key}
Selector\t\ts1
SubDomains\t\tno
KeyTable\t\trefile:{tmp_path}/KeyTable   # a trailing comment
signingtable\t\trefile:{tmp_path}/SigningTable
InternalHosts\t\t127.0.0.1, 10.0.0.0/8
ExternalIgnoreList\t{tmp_path}/PeerList
PeerList\t\t{tmp_path}/PeerList
Canonicalization\trelaxed
SignatureAlgorithm\trsa-sha256
OversignHeaders\t\tFrom,Subject
SignHeaders\t\tTo,Subject,Date
MacroList\t\tdaemon_name=submission|smtps
AuthservID\t\tdkim.example.com
AlwaysAddARHeader\tyes
RemoveOldSignatures\tyes
RemoveARFrom\t\tmx2.example.com,.example.net
RequireSafeKeys\t\tno
UserID\t\t\topendkim:opendkim
UMask\t\t\t007
Syslog\t\t\tyes
SyslogSuccess\t\tyes
LogWhy\t\t\tyes
Nameservers\t\t127.0.0.1,::1
TrustAnchorFile\t\t/usr/share/dns/root.key
"""
    )
    dmarc = tmp_path / "opendmarc.conf"
    dmarc.write_text(
        f"""AuthservID mx.example.com
AuthservIDWithJobID true
TrustedAuthservIDs mx.example.com
IgnoreHosts {tmp_path}/IgnoreHosts
IgnoreMailFrom lists.example.org, Partner.example
IgnoreAuthenticatedClients true
RejectFailures true
RejectMultiValueFrom true
RequiredHeaders true
SPFSelfValidate true
SPFIgnoreResults true
HistoryFile /var/run/opendmarc/opendmarc.dat
HoldQuarantinedMessages true
PublicSuffixList {tmp_path}/no-such-psl.dat
FailureReports true
FailureReportsSentBy postmaster@example.com
FailureReportsBcc dmarc@example.com
CopyFailuresTo dmarc-copies@example.com
RejectString DMARC says no for %s
SoftwareHeader true
RecordAllMessages true
"""
    )
    return dkim, dmarc


EXPECTED = {
    "Socket": (Verdict.CARRIED, '[milter] socket = "inet:8891@localhost"'),
    "Mode": (Verdict.CARRIED, "outbound mail"),
    "Domain": (Verdict.NOT_NEEDED, "OpenDKIM ignores it when a KeyTable is set"),
    "KeyFile": (Verdict.NOT_NEEDED, "OpenDKIM ignores it when a KeyTable is set"),
    "Selector": (Verdict.NOT_NEEDED, "OpenDKIM ignores it when a KeyTable is set"),
    "SubDomains": (Verdict.NOT_NEEDED, "OpenDKIM ignores it when a KeyTable is set"),
    "KeyTable": (Verdict.CARRIED, "[signing] key_table = "),
    "signingtable": (Verdict.CARRIED, '[signing] signing_table = "refile:'),
    "InternalHosts": (Verdict.CARRIED, '[milter] internal_hosts = ["127.0.0.1", "10.0.0.0/8"]'),
    "ExternalIgnoreList": (Verdict.NOT_NEEDED, "still verified, not skipped"),
    "PeerList": (Verdict.CARRIED, "[milter] ignore_hosts = "),
    "Canonicalization": (Verdict.CARRIED, '[signing] canonicalization = "relaxed/relaxed"'),
    "SignatureAlgorithm": (Verdict.NOT_NEEDED, "each key signs with its own algorithm"),
    "OversignHeaders": (Verdict.CARRIED, '[signing] oversign_headers = ["from", "subject"]'),
    "SignHeaders": (Verdict.CARRIED, '[signing] headers = ["from", "to", "subject", "date"]'),
    "MacroList": (Verdict.CARRIED, '[signing] sign_daemon_names = ["submission", "smtps"]'),
    "AlwaysAddARHeader": (Verdict.NOT_NEEDED, "always adds"),
    "RemoveOldSignatures": (Verdict.UNSUPPORTED, "existing DKIM-Signature fields are kept"),
    "RemoveARFrom": (Verdict.CARRIED, '[milter] remove_authserv_ids = ["mx2.example.com"]'),
    "RequireSafeKeys": (Verdict.CARRIED, '[signing] key_permissions = "warn"'),
    "UserID": (Verdict.NOT_NEEDED, "User=authmilter"),
    "UMask": (Verdict.NOT_NEEDED, "UMask=0007"),
    "Syslog": (Verdict.CARRIED, '[log] destination = "syslog"'),
    "SyslogSuccess": (Verdict.NOT_NEEDED, "one line per message"),
    "LogWhy": (Verdict.CARRIED, '[log] level = "debug"'),
    "Nameservers": (Verdict.CARRIED, '[dns] nameservers = ["127.0.0.1", "::1"]'),
    "TrustAnchorFile": (Verdict.UNSUPPORTED, "validating resolver"),
    "AuthservIDWithJobID": (Verdict.UNSUPPORTED, "without the queue id"),
    "TrustedAuthservIDs": (Verdict.NOT_NEEDED, "trusts no incoming Authentication-Results"),
    "IgnoreHosts": (Verdict.PROBLEM, "it takes one dataset"),
    "IgnoreMailFrom": (
        Verdict.CARRIED,
        '[policy] never_reject_domains = ["lists.example.org", "partner.example"]',
    ),
    "IgnoreAuthenticatedClients": (Verdict.CARRIED, "[milter] skip_authenticated = true"),
    "RejectFailures": (Verdict.CARRIED, "[policy] enforce = true"),
    "RejectMultiValueFrom": (Verdict.CARRIED, '[policy] from_multiple_domains = "reject"'),
    "RequiredHeaders": (Verdict.CARRIED, '[policy] from_error = "reject"'),
    "SPFSelfValidate": (Verdict.NOT_NEEDED, "always checks SPF itself"),
    "SPFIgnoreResults": (Verdict.NOT_NEEDED, "never takes SPF results from incoming headers"),
    "HistoryFile": (Verdict.CARRIED, '[history] path = "/var/lib/authmilter/history.jsonl"; differs'),
    "HoldQuarantinedMessages": (Verdict.CARRIED, '[milter] quarantine = "hold"'),
    "PublicSuffixList": (Verdict.CARRIED, '[dmarc] org_domain = "psl"'),
    "FailureReports": (Verdict.UNSUPPORTED, "no failure reports"),
    "FailureReportsSentBy": (Verdict.UNSUPPORTED, "no failure reports"),
    "FailureReportsBcc": (Verdict.UNSUPPORTED, "no failure reports"),
    "CopyFailuresTo": (Verdict.UNSUPPORTED, "no longer copied"),
    "RejectString": (Verdict.UNSUPPORTED, "550 5.7.26"),
    "SoftwareHeader": (Verdict.UNSUPPORTED, "DMARC-Filter header"),
    "RecordAllMessages": (Verdict.NOT_NEEDED, "every message DMARC evaluated"),
}


def test_every_setting_gets_its_verdict(tmp_path: Path) -> None:
    dkim, dmarc = old_pair(tmp_path)
    migration = migrate((str(dkim), dkim.read_text()), (str(dmarc), dmarc.read_text()))
    by_name: dict[str, list[str]] = {}
    for note in migration.notes:
        by_name.setdefault(note.setting.split()[0], []).append(f"{note.verdict}: {note.detail}")
    for name, (verdict, detail) in EXPECTED.items():
        assert any(n.startswith(f"{verdict}: ") and detail in n for n in by_name.get(name, [])), (
            name,
            by_name.get(name),
        )
    # AuthservID: OpenDKIM's, then OpenDMARC's, which carries the DMARC result, replaces it.
    assert migration.sections["milter"]["authserv_id"] == "mx.example.com"
    assert any('replaces "dkim.example.com"' in n for n in by_name["AuthservID"])
    assert any(".example.net" in n and str(Verdict.UNSUPPORTED) in n for n in by_name["RemoveARFrom"])


def test_every_setting_writes_a_config_that_loads_and_names_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dkim, dmarc = old_pair(tmp_path)
    output = tmp_path / "authmilter.toml"
    status, out, notes = run_migrate(
        capsys, "--opendkim", str(dkim), "--opendmarc", str(dmarc), "--output", str(output)
    )
    assert status == 1, "IgnoreHosts and PeerList are two files for one setting"
    assert out == ""
    assert notes[-1] == "authmilter: 1 problem(s) above: fix them, then run checkconf"
    assert any(f"{dmarc}:4: IgnoreHosts" in n and "problem" in n for n in notes)
    text = output.read_text()
    assert 'ignore_hosts = "' in text and 'from_multiple_domains = "reject"' in text
    assert 'remove_authserv_ids = ["mx2.example.com"]' in text
    assert "psl_file" not in text, "the missing list is left out: the bundled one serves"
    config = load_config(_write(tmp_path / "loadable.toml", text))
    assert config.signing_table is not None and config.signing.key_permissions == "warn"
    # PeerList (10.9.0.0/16) inside InternalHosts (10.0.0.0/8): the old pair left those clients
    # alone (its ignore list comes first); authmilter refuses a client in both, so it is excluded.
    assert config.milter.internal_hosts == ("127.0.0.1", "10.0.0.0/8", "!10.9.0.0/16")
    assert any("internal_hosts: carried over: !10.9.0.0/16: clients in both lists" in n for n in notes)
    assert config.policy.enforce and config.milter.quarantine == "hold"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- single-key mode ------------------------------------------------------------------------------


def single_key_conf(tmp_path: Path) -> Path:
    key = tmp_path / "keys" / "example.private"
    key.parent.mkdir()
    key.write_bytes(generate_key("rsa", 1024)[0])
    key.chmod(0o600)
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Domain example.com,example.org\nSelector 2020\nKeyFile {key}\nSubDomains yes\n")
    return conf


def test_single_key_mode_writes_equivalent_tables_next_to_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = single_key_conf(tmp_path)
    output = tmp_path / "etc" / "authmilter.toml"
    output.parent.mkdir()
    status, _, notes = run_migrate(capsys, "--opendkim", str(conf), "--output", str(output))
    assert status == 0, notes
    key_table = (output.parent / "KeyTable").read_text().splitlines()
    assert key_table[1:] == [
        f"example.com example.com:2020:{tmp_path}/keys/example.private",
        f"example.org example.org:2020:{tmp_path}/keys/example.private",
    ]
    assert (output.parent / "SigningTable").read_text().splitlines()[1:] == [
        "*@example.com example.com",
        "*@*.example.com example.com",
        "*@example.org example.org",
        "*@*.example.org example.org",
    ]
    assert any("KeyTable and SigningTable written next to the output" in n for n in notes)
    # The migrated config signs as OpenDKIM did: d= the listed domain, also for a subdomain's mail.
    message = tmp_path / "message.eml"
    message.write_bytes(make_message("Bob <bob@news.example.org>"))
    assert main(["sign", "--config", str(output), str(message)]) == 0
    signed = capsys.readouterr().out
    assert "d=example.org" in signed and "s=2020" in signed


def test_single_key_mode_needs_an_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, notes = run_migrate(capsys, "--opendkim", str(single_key_conf(tmp_path)))
    assert status == 1 and out == ""
    assert "single-key mode (Domain, KeyFile, Selector): give --output FILE" in notes[0]


# --- smaller cases -------------------------------------------------------------------------------


def test_only_opendkim_reports_dmarc_without_applying_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = _write(tmp_path / "opendkim.conf", "Socket inet:8891@127.0.0.1\n")
    status, out, notes = run_migrate(capsys, "--opendkim", str(conf))
    assert status == 0
    policy = parse_config(out, tmp_path / "a.toml").policy
    assert (
        not policy.enforce
        and policy.dmarc_temperror.value == "accept"
        and policy.from_error.value == "accept"
    )
    assert any("no opendmarc.conf" in n for n in notes)


def test_unusable_tables_and_databases_are_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = _write(
        tmp_path / "opendkim.conf",
        f"KeyTable {tmp_path}/missing\nSigningTable refile:{tmp_path}/missing-too\n"
        "InternalHosts db:/etc/hosts.db\nBogusSetting 1\nMode q\nPeerList 10.0.0.0/33\n",
    )
    status, _, notes = run_migrate(capsys, "--opendkim", str(conf))
    assert status == 1
    text = "\n".join(notes)
    assert f"{conf}:1: KeyTable: problem: {tmp_path}/missing: cannot read the table" in text
    assert f"{conf}:3: InternalHosts db:/etc/hosts.db: problem: a db: dataset" in text
    assert f"{conf}:4: BogusSetting 1: not supported: authmilter has no such setting" in text
    assert f"{conf}:5: Mode q: problem: not a mode" in text
    assert f"{conf}:6: PeerList 10.0.0.0/33: problem: " in text


def test_mode_v_signs_nothing(tmp_path: Path) -> None:
    text = "Mode v\nKeyTable /etc/opendkim/KeyTable\nSigningTable refile:/etc/opendkim/SigningTable\n"
    migration = migrate(("opendkim.conf", text), None)
    assert "signing" not in migration.sections
    assert "key_table" not in render_toml(migration, "x")


def test_parse_conf_follows_opendkim_conf_5() -> None:
    text = "# comment\n  Syslog\tyes # trailing\n\nSOCKET inet:8891@localhost\nUMask\n"
    settings = parse_conf(text, "f.conf")
    assert [(s.name, s.value, s.source) for s in settings] == [
        ("Syslog", "yes", "f.conf:2"),
        ("SOCKET", "inet:8891@localhost", "f.conf:4"),
        ("UMask", "", "f.conf:5"),
    ]
    assert [parse_boolean(v) for v in ("Yes", "true", "1", "no", "False", "0", "maybe", "")] == [
        True, True, True, False, False, False, None, None,
    ]  # fmt: skip
    assert parse_dataset("refile:/etc/x").spec == "refile:/etc/x"
    assert parse_dataset("/etc/x").spec == "/etc/x"
    assert parse_dataset("csl:a, b").items == ("a", "b")
    assert parse_dataset("a,b").items == ("a", "b")
    assert parse_dataset("ldap://x").database == "ldap"
    assert parse_dataset("/etc/x.db").database == "db"


def test_later_settings_win_and_the_earlier_is_named(tmp_path: Path) -> None:
    migration = migrate(("d.conf", "Canonicalization simple\ncanonicalization relaxed/relaxed\n"), None)
    assert migration.sections["signing"]["canonicalization"] == "relaxed/relaxed"
    assert any(n.source == "d.conf:1" and "given again at d.conf:2" in n.detail for n in migration.notes)


def test_output_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = _write(tmp_path / "authmilter.toml", "# mine\n")
    status, _, notes = run_migrate(capsys, "--opendmarc", str(DEBIAN_OPENDMARC), "--output", str(output))
    assert status == 1 and "already exists" in notes[-1]
    assert output.read_text() == "# mine\n"

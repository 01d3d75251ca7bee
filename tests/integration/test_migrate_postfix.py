"""`authmilter migrate` round trip through the real Postfix (issue 12): an OpenDKIM + OpenDMARC pair's
configs become an authmilter config that `checkconf` accepts and that signs, rejects, holds and
delivers what the old pair did.

The old pair's configs are written here the way a Debian site has them: OpenDKIM signs with a
KeyTable and a ``refile:`` SigningTable (a key from ``authmilter genkey``, published on the session's
Knot server), OpenDMARC does the DMARC part. Two OpenDMARC set-ups are tried, each against the
session's authmilter (reloaded with the migrated config, then restored):

- enforcing (``RejectFailures true``, ``HoldQuarantinedMessages true``): p=reject spoofs get a 550,
  p=quarantine ones go to the hold queue;
- Debian's defaults (neither set): OpenDMARC only reported, so the same spoofs are delivered, each
  with a dmarc=fail result, and nothing is held.

In both, loopback mail (OpenDKIM's default InternalHosts) is signed and inbound mail verified.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest
from postfix import SPOOFING_CLIENT, Authmilter, Mta, Senders
from sink import DeliveredMessage
from test_postfix import Clause, message_id, result_of, results_of, signed, unsigned
from test_signing import knot_dnsfunc, line_after, run_cli

from dnsserver import AuthoritativeDns
from signing import make_message, zone_txt

DOMAIN = "pf-migrate.example"
SENDER = f"bob@{DOMAIN}"
SELECTOR = "mig2026"
SESSION_AUTHSERV_ID = "mx.receiver.example"
RELOAD_TIMEOUT = 20.0
@dataclass(frozen=True)
class OldSite:
    """The folder holding the old pair's tables and key."""

    folder: Path


@pytest.fixture(scope="module")
def old_site(
    dns_server: AuthoritativeDns, tmp_path_factory: pytest.TempPathFactory
) -> OldSite:
    """OpenDKIM's tables and key as a Debian site has them, the key's record published."""
    if os.environ.get("AUTHMILTER_SMTP"):
        pytest.skip(
            "AUTHMILTER_SMTP is set (containers): the migrated config names this test's KeyTable, "
            "SigningTable and key, which the containerised authmilter cannot read"
        )
    folder = tmp_path_factory.mktemp("old-pair")
    output = run_cli("genkey", "--domain", DOMAIN, "--selector", SELECTOR, "--dir", str(folder))
    (folder / "KeyTable").write_text(line_after(output, "# add to the KeyTable") + "\n")
    (folder / "SigningTable").write_text(line_after(output, "# add to the SigningTable") + "\n")
    dns_server.add_zone(
        DOMAIN,
        f'@ TXT {zone_txt("v=spf1 ip4:203.0.113.5 -all")}\n_dmarc TXT "v=DMARC1; p=reject"\n'
        + (folder / f"{SELECTOR}.txt").read_text(),
    )
    dns_server.reload()
    return OldSite(folder)


def opendkim_conf(site: OldSite, milter_port: int) -> Path:
    """Debian's /etc/opendkim.conf with signing set up, on the port of the MTA's authmilter."""
    folder = site.folder
    path = folder / f"opendkim-{milter_port}.conf"
    path.write_text(
        f"""# as Debian's /etc/opendkim.conf, with signing set up
SyslogSuccess\t\tyes
Canonicalization\trelaxed/simple
Mode\t\t\tsv
OversignHeaders\t\tFrom
KeyTable\t\tfile:{folder}/KeyTable
SigningTable\t\trefile:{folder}/SigningTable
UserID\t\t\topendkim
UMask\t\t\t007
Socket\t\t\tinet:{milter_port}@127.0.0.1
PidFile\t\t\t/run/opendkim/opendkim.pid
TrustAnchorFile\t\t/usr/share/dns/root.key
"""
    )
    return path


def opendmarc_conf(site: OldSite, authserv_id: str, enforcing: bool) -> Path:
    path = site.folder / f"opendmarc-{authserv_id}.conf"
    enforcement = "RejectFailures true\nHoldQuarantinedMessages true\n" if enforcing else ""
    path.write_text(
        f"""AuthservID {authserv_id}
PidFile /run/opendmarc/opendmarc.pid
Socket local:/run/opendmarc/opendmarc.sock
Syslog false
UMask 0002
UserID opendmarc
SPFSelfValidate true
TrustedAuthservIDs {authserv_id}
{enforcement}"""
    )
    return path


def migrated_config(site: OldSite, dmarc: Path, process: Authmilter) -> Path:
    """`authmilter migrate` to a file, checked by `authmilter checkconf`; DNS pointed at Knot."""
    output = site.folder / f"{dmarc.stem}-{process.milter_port}.toml"
    dkim = opendkim_conf(site, process.milter_port)
    done = subprocess.run(
        [sys.executable, "-m", "authmilter", "migrate", "--opendkim", str(dkim),
         "--opendmarc", str(dmarc), "--output", str(output)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == "", "with --output the config goes to the file only"
    kept = output.read_text().splitlines()
    # The test's resolver: the Knot server (OpenDKIM's Nameservers takes no port).
    output.write_text("\n".join(kept) + f'\n\n[dns]\nnameservers = ["127.0.0.1:{process.dns_port}"]\n')
    # As the user the test's daemon runs as (as root, checkconf would otherwise take the unit's).
    run_cli("checkconf", "--config", str(output), "--user", pwd.getpwuid(os.geteuid()).pw_name)
    return output


def _eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.3)
    return False


def inbound_authserv_id(mta: Mta, senders: Senders, subject: str) -> str:
    """The authserv-id on a passing inbound message: which configuration served it."""
    message = signed(senders.reject, subject)
    assert mta.send(message, mail_from=senders.reject.address).accepted
    values = mta.delivered(message_id(message)).header_values("Authentication-Results")
    return values[0].split(";")[0].strip() if values else ""


@contextmanager
def serving(
    process: Authmilter, config: Path, authserv_id: str, mta: Mta, senders: Senders
) -> Iterator[None]:
    """The session's authmilter on ``config`` while the block runs, then on its own again."""
    process.config_path.write_text(config.read_text())
    process.signal(signal.SIGHUP)
    try:
        assert _eventually(lambda: inbound_authserv_id(mta, senders, "migrated?") == authserv_id), (
            "the migrated config was not taken"
        )
        yield
    finally:
        process.write_config()
        process.signal(signal.SIGHUP)
        assert _eventually(lambda: inbound_authserv_id(mta, senders, "restored?") == SESSION_AUTHSERV_ID)


def assert_loopback_mail_is_signed(mta: Mta, dns_server: AuthoritativeDns, authserv_id: str) -> None:
    message = make_message(f"Bob <{SENDER}>", subject="outbound after migration")
    assert mta.send(message, mail_from=SENDER, client=None).accepted
    delivered = mta.delivered(message_id(message))
    signatures = delivered.header_values("DKIM-Signature")
    assert len(signatures) == 1 and f"s={SELECTOR}" in signatures[0].replace(" ", ""), signatures
    assert "c=relaxed/simple" in signatures[0].replace(" ", ""), "OpenDKIM's Canonicalization is kept"
    assert dkim.DKIM(delivered.data).verify(dnsfunc=knot_dnsfunc(dns_server))
    assert not [v for v in delivered.header_values("Authentication-Results") if v.startswith(authserv_id)]


def clauses_of(delivered: DeliveredMessage, authserv_id: str) -> list[Clause]:
    """The clauses of the one A-R field carrying ``authserv_id``."""
    ours = [v for v in delivered.header_values("Authentication-Results") if v.startswith(f"{authserv_id};")]
    assert len(ours) == 1, ours
    return results_of(ours[0])[1]


def test_an_enforcing_pair_migrates_to_a_config_that_signs_rejects_and_holds_as_it_did(
    old_site: OldSite,
    milter_process: Authmilter,
    mta: Mta,
    senders: Senders,
    dns_server: AuthoritativeDns,
) -> None:
    authserv_id = "mx-enforcing.receiver.example"
    config = migrated_config(old_site, opendmarc_conf(old_site, authserv_id, enforcing=True), milter_process)
    text = config.read_text()
    assert "enforce = true" in text and 'quarantine = "hold"' in text
    with serving(milter_process, config, authserv_id, mta, senders):
        assert_loopback_mail_is_signed(mta, dns_server, authserv_id)

        passing = signed(senders.reject, "inbound, authenticated")
        assert mta.send(passing, mail_from=senders.reject.address).accepted
        clauses = clauses_of(mta.delivered(message_id(passing)), authserv_id)
        assert result_of(clauses, "dmarc", header_from=senders.reject.domain) == ["pass"], clauses

        spoofed = unsigned(senders.reject, "spoofed p=reject")
        outcome = mta.send(spoofed, mail_from=senders.reject.address, client=SPOOFING_CLIENT)
        assert outcome.code == 550, outcome

        quarantined = unsigned(senders.quarantine, "spoofed p=quarantine")
        outcome = mta.send(quarantined, mail_from=senders.quarantine.address, client=SPOOFING_CLIENT)
        assert outcome.accepted, outcome
        try:
            assert outcome.queue_id in mta.hold.queue_ids(), "HoldQuarantinedMessages true: held"
        finally:
            if outcome.queue_id in mta.hold.queue_ids():
                mta.hold.delete(outcome.queue_id)


def test_debians_default_opendmarc_migrates_to_a_config_that_only_reports(
    old_site: OldSite,
    milter_process: Authmilter,
    mta: Mta,
    senders: Senders,
    dns_server: AuthoritativeDns,
) -> None:
    """RejectFailures and HoldQuarantinedMessages default to false: nothing was rejected or held."""
    authserv_id = "mx-reporting.receiver.example"
    config = migrated_config(
        old_site, opendmarc_conf(old_site, authserv_id, enforcing=False), milter_process
    )
    text = config.read_text()
    assert "enforce = false" in text and 'quarantine = "header"' in text
    with serving(milter_process, config, authserv_id, mta, senders):
        assert_loopback_mail_is_signed(mta, dns_server, authserv_id)
        for sender in (senders.reject, senders.quarantine):
            spoofed = unsigned(sender, f"spoofed {sender.domain}, delivered as before")
            outcome = mta.send(spoofed, mail_from=sender.address, client=SPOOFING_CLIENT)
            assert outcome.accepted, outcome
            delivered = mta.delivered(message_id(spoofed))
            clauses = clauses_of(delivered, authserv_id)
            assert result_of(clauses, "dmarc", header_from=sender.domain) == ["fail"], clauses
            assert outcome.queue_id not in mta.hold.queue_ids()

"""Signing through the real MTAs (issue 4, issue 14): outbound mail gets RSA and Ed25519 signatures.

Each MTA's authmilter is switched to a config with ``[signing]`` (keys from ``authmilter genkey``,
its KeyTable and SigningTable lines, ``multiple_signatures = true``) by SIGHUP for this module and
switched back at its end. Its ``internal_hosts`` is the default, 127.0.0.1 and ::1, so:

- a message the MTA receives from 127.0.0.1 itself is outbound: signed, not verified;
- a message from an outside client (XCLIENT for Postfix, another loopback address for Sendmail)
  is inbound: verified, not signed;
- a message to the MTA's submission port, whose ``{daemon_name}`` is in ``sign_daemon_names``, is
  outbound whoever sends it;
- a client that logged in with AUTH (the MTA then sends ``{auth_type}``, ``{auth_authen}``) is
  outbound too. Both MTAs offer the ANONYMOUS mechanism for it (postfix.SASL_MECHANISM), which
  needs no password database: the private instances need no SASL files outside their own folders.

Delivered signatures are checked by dkimpy (key records from the Knot server through our resolver)
and by OpenDKIM (tests/opendkim.py), so they must survive the MTA's delivery byte for byte.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import authres
import dkim
import pytest
from postfix import (
    SENDING_CLIENT,
    SPOOFING_CLIENT,
    SUBMISSION_DAEMON,
    Authmilter,
    Client,
    Mta,
    spf_record,
)
from sink import DeliveredMessage

from authmilter.resolver import NameserverSource, Resolver
from dnsserver import AuthoritativeDns
from opendkim import DkimResult, OpenDkim, OpenDkimError, key_records
from signing import make_message, zone_txt

DOMAIN = "pf-outbound.example"
SENDER = f"bob@{DOMAIN}"
RSA_SELECTOR = "rsa2026"
ED_SELECTOR = "ed2026"
OUR_AUTHSERV_ID = "mx.receiver.example"
RELOAD_TIMEOUT = 20.0
# What survives an SMTP round trip only if nothing rewrites the message: a folded header, trailing
# whitespace, a lone dot (dot-stuffed on the wire, RFC 5321 §4.5.2) and "From " at a line start.
BODY = "Hi Alice,  \r\n\r\n.\r\nFrom the outbound side\r\n\twith a tab\t\r\n"
FOLDED = "Cc: Carol <carol@receiver.example>,\r\n\tDave <dave@receiver.example>\r\n"


@dataclass(frozen=True)
class SigningSite:
    """The signing domain: its zone on the Knot server, and the config text that signs for it."""

    zone: Path
    config: str


def run_cli(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "authmilter", *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout


def line_after(output: str, comment: str) -> str:
    lines = output.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith(comment)) + 1]


def outbound_message(subject: str) -> bytes:
    return make_message(f"Bob <{SENDER}>", subject=subject, body=BODY, extra_headers=FOLDED)


def message_id(message: bytes) -> str:
    found = re.search(rb"^Message-ID: *(<[^>]+>)", message, re.MULTILINE | re.IGNORECASE)
    assert found is not None
    return found.group(1).decode()


def send_from_loopback(mta: Mta, subject: str) -> DeliveredMessage:
    """Send as 127.0.0.1 itself (no XCLIENT) and return the delivered copy."""
    message = outbound_message(subject)
    outcome = mta.send(message, mail_from=SENDER, client=None)
    assert outcome.accepted, outcome
    return mta.delivered(message_id(message))


def _eventually(condition: Callable[[], bool], timeout: float = RELOAD_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.3)
    return False


@pytest.fixture(scope="module")
def site(mta: Mta, dns_server: AuthoritativeDns) -> SigningSite:
    """Keys made by genkey, its table lines, its zone-file records published on the Knot server."""
    if mta.milter is None:
        pytest.skip("AUTHMILTER_SMTP is set without AUTHMILTER_PID: the authmilter process is not ours")
    # One folder per MTA: in make test-docker both MTAs ask one authmilter (genkey never overwrites).
    folder = mta.milter.folder_for_files(f"signing-keys-{mta.name}")
    key_lines, signing_lines, records = [], [], []
    for kind, selector in (("rsa", RSA_SELECTOR), ("ed25519", ED_SELECTOR)):
        output = run_cli(
            "genkey", "--domain", DOMAIN, "--selector", selector, "--type", kind, "--dir", str(folder)
        )
        key_lines.append(line_after(output, "# add to the KeyTable"))
        signing_lines.append(line_after(output, "# add to the SigningTable"))
        records.append((folder / f"{selector}.txt").read_text())
    (folder / "KeyTable").write_text("\n".join(key_lines) + "\n")
    (folder / "SigningTable").write_text("\n".join(signing_lines) + "\n")
    mta.milter.hand_over(folder)
    # SPF allows the harness's claimed outside client, so inbound mail from it passes DMARC by SPF.
    zone = dns_server.add_zone(
        DOMAIN,
        f'@ TXT {zone_txt(spf_record(SENDING_CLIENT))}\n_dmarc TXT "v=DMARC1; p=reject"\n'
        + "".join(records),
    )
    dns_server.reload()
    config = (
        "[signing]\n"
        f'key_table = "{folder / "KeyTable"}"\n'
        f'signing_table = "refile:{folder / "SigningTable"}"\n'
        "multiple_signatures = true\n"
        f'sign_daemon_names = ["{SUBMISSION_DAEMON}"]\n'
    )
    return SigningSite(zone, config)


@pytest.fixture(scope="module")
def signing_milter(mta: Mta, site: SigningSite) -> Iterator[Authmilter]:
    """The MTA's authmilter, reloaded with the signing config for this module, then restored."""
    assert mta.milter is not None  # the site fixture skipped otherwise
    process = mta.milter
    process.write_config(extra=site.config)
    process.signal(signal.SIGHUP)
    try:
        assert _eventually(
            lambda: bool(send_from_loopback(mta, "reloaded?").header_values("DKIM-Signature"))
        ), "loopback mail was never signed after the reload"
        yield process
    finally:
        process.write_config()
        process.signal(signal.SIGHUP)
        assert _eventually(
            lambda: not send_from_loopback(mta, "restored?").header_values("DKIM-Signature")
        ), "the config without [signing] did not come back"


@pytest.fixture(scope="module")
def opendkim(site: SigningSite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenDkim]:
    try:
        with OpenDkim(tmp_path_factory.mktemp("opendkim"), public_keys=key_records([site.zone])) as verifier:
            yield verifier
    except OpenDkimError as e:
        raise pytest.fail.Exception(str(e), pytrace=False) from None


def knot_dnsfunc(dns_server: AuthoritativeDns) -> Callable[..., bytes]:
    """dkimpy's ``dnsfunc`` through our resolver, asking the session's Knot server."""
    resolver = Resolver(NameserverSource(["127.0.0.1"], port=dns_server.port, timeout=2.0))

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        texts = resolver.txt(name.decode()).texts
        return texts[0].encode() if texts else b""

    return lookup


def dkimpy_verdicts(message: bytes, dns_server: AuthoritativeDns, count: int) -> list[bool]:
    verdicts = []
    for index in range(count):
        try:
            verdicts.append(bool(dkim.DKIM(message).verify(idx=index, dnsfunc=knot_dnsfunc(dns_server))))
        except dkim.DKIMException:
            verdicts.append(False)
    return verdicts


def signature_summary(values: list[str]) -> list[tuple[str, str, str]]:
    """(a=, s=, d=) of each unfolded DKIM-Signature value, sorted."""
    summary = []
    for value in values:
        tags = dict(part.strip().split("=", 1) for part in value.split(";") if "=" in part)
        summary.append((tags["a"], tags["s"].replace(" ", ""), tags["d"]))
    return sorted(summary)


BOTH_SIGNATURES = [("ed25519-sha256", ED_SELECTOR, DOMAIN), ("rsa-sha256", RSA_SELECTOR, DOMAIN)]


def both_pass() -> list[DkimResult]:
    return [
        DkimResult("pass", DOMAIN, ED_SELECTOR, "ed25519-sha256"),
        DkimResult("pass", DOMAIN, RSA_SELECTOR, "rsa-sha256"),
    ]


def our_results(delivered: DeliveredMessage) -> list[str]:
    return [
        v for v in delivered.header_values("Authentication-Results") if v.startswith(f"{OUR_AUTHSERV_ID};")
    ]


# --- through the MTA ----------------------------------------------------------------------------------


def test_loopback_mail_is_delivered_with_rsa_and_ed25519_signatures_that_verify(
    signing_milter: Authmilter, mta: Mta, dns_server: AuthoritativeDns, opendkim: OpenDkim
) -> None:
    delivered = send_from_loopback(mta, "outbound from loopback")
    signatures = delivered.header_values("DKIM-Signature")
    assert signature_summary(signatures) == BOTH_SIGNATURES, signatures
    # Outbound mail is signed, not verified: no Authentication-Results of ours.
    assert our_results(delivered) == [], delivered.header_values("Authentication-Results")
    assert dkimpy_verdicts(delivered.data, dns_server, 2) == [True, True]
    assert sorted(opendkim.verify(delivered.data)) == both_pass()


def test_mail_from_an_outside_address_is_verified_not_signed(
    signing_milter: Authmilter, mta: Mta
) -> None:
    """From the signing domain, but over XCLIENT from outside: inbound, so checked and left unsigned."""
    message = outbound_message("inbound from outside")
    outcome = mta.send(message, mail_from=SENDER)
    assert outcome.accepted, outcome
    delivered = mta.delivered(message_id(message))
    assert delivered.header_values("DKIM-Signature") == []
    ours = our_results(delivered)
    assert len(ours) == 1, ours
    results = {(r.method, r.result) for r in authres.AuthenticationResultsHeader.parse_value(ours[0]).results}
    assert {("spf", "pass"), ("dkim", "none"), ("dmarc", "pass")} <= results, ours[0]


def test_spoofed_outside_mail_from_the_signing_domain_is_still_rejected(
    signing_milter: Authmilter, mta: Mta
) -> None:
    """Being in the SigningTable does not make a domain's inbound mail outbound."""
    message = outbound_message("spoofed from outside")
    outcome = mta.send(message, mail_from=SENDER, client=SPOOFING_CLIENT)
    assert outcome.code == 550, outcome
    assert mta.sink.find(message_id(message)) == []


# Each with an XCLIENT address (Postfix) and a loopback one to connect from (Sendmail).
IGNORED_CLIENT = Client("192.0.2.9", "peer.relay.example", "peer.relay.example", "127.0.0.9")
INTERNAL_CLIENT = Client("192.0.2.200", "app.internal.example", "app.internal.example", "127.0.0.20")
HOST_LISTS = (
    'internal_hosts = ["127.0.0.1", "::1", "192.0.2.128/25", "127.0.0.20"]\n'
    'ignore_hosts = ["192.0.2.0/25", "127.0.0.9"]\n'
)


@pytest.fixture
def ignoring_milter(signing_milter: Authmilter, mta: Mta, site: SigningSite) -> Iterator[Path]:
    """The signing config plus ignore_hosts, for one test; then back. Yields the history file."""

    def ignored_mail_accepted() -> bool:
        return mta.send(outbound_message("ignored?"), mail_from=SENDER, client=IGNORED_CLIENT).accepted

    signing_milter.write_config(milter=HOST_LISTS, extra=site.config)
    signing_milter.signal(signal.SIGHUP)
    try:
        assert _eventually(ignored_mail_accepted), "mail from the ignored client was never accepted"
        yield signing_milter.history_path
    finally:
        signing_milter.write_config(extra=site.config)
        signing_milter.signal(signal.SIGHUP)
        restored = _eventually(lambda: not ignored_mail_accepted())
        assert restored, "the config without ignore_hosts did not come back"


def history_lines(history: Path) -> list[str]:
    return history.read_text().splitlines() if history.exists() else []


def test_ignored_client_gets_no_processing_while_an_internal_one_is_signed(
    ignoring_milter: Path, mta: Mta
) -> None:
    """ignore_hosts (PeerList, IgnoreHosts): accepted at connect, so Postfix leaves the milter out:
    no verification (a spoof of a p=reject domain passes), no A-R removed or added, no signature,
    no history line; the same message from an internal host is signed."""
    forged = f"Authentication-Results: {OUR_AUTHSERV_ID}; dmarc=pass header.from={DOMAIN}\r\n"
    before = len(history_lines(ignoring_milter))
    ignored = make_message(f"Bob <{SENDER}>", subject="from a peer", extra_headers=forged)
    outcome = mta.send(ignored, mail_from=SENDER, client=IGNORED_CLIENT)
    assert outcome.accepted, outcome
    delivered = mta.delivered(message_id(ignored))
    assert delivered.header_values("DKIM-Signature") == []
    assert [v.split(";")[0] for v in delivered.header_values("Authentication-Results")] == [OUR_AUTHSERV_ID]
    assert our_results(delivered) == [f"{OUR_AUTHSERV_ID}; dmarc=pass header.from={DOMAIN}"]  # untouched
    assert len(history_lines(ignoring_milter)) == before
    internal = outbound_message("from an internal host")
    assert mta.send(internal, mail_from=SENDER, client=INTERNAL_CLIENT).accepted
    signed = mta.delivered(message_id(internal))
    assert signature_summary(signed.header_values("DKIM-Signature")) == BOTH_SIGNATURES
    # Inbound mail is still verified and recorded.
    inbound = outbound_message("inbound beside them")
    assert mta.send(inbound, mail_from=SENDER).accepted
    assert len(our_results(mta.delivered(message_id(inbound)))) == 1
    assert _eventually(lambda: len(history_lines(ignoring_milter)) == before + 1)


@pytest.mark.parametrize("route", ["submission-port", "sasl-auth"])
def test_outside_mail_through_the_submission_port_or_after_auth_is_signed_not_verified(
    signing_milter: Authmilter, mta: Mta, dns_server: AuthoritativeDns, opendkim: OpenDkim, route: str
) -> None:
    """What makes mail from outside outbound, as each MTA tells authmilter:

    - ``{daemon_name}`` at connect: Postfix's ``milter_macro_daemon_name`` (master.cf ``-o``),
      Sendmail's ``DaemonPortOptions`` ``Name=`` (in its default confMILTER_MACROS_CONNECT);
    - ``{auth_type}`` and ``{auth_authen}`` with MAIL FROM after AUTH (postfix.SASL_MECHANISM):
      Postfix's milter_mail_macros and Sendmail's confMILTER_MACROS_ENVFROM carry them by default.
    """
    message = outbound_message(f"outbound by {route}")
    # From an address SPF fails and p=reject: verified, this message would be rejected.
    if route == "submission-port":
        if not mta.submission_port:
            pytest.skip("the set-up started elsewhere has no submission port")
        outcome = mta.send(message, mail_from=SENDER, client=SPOOFING_CLIENT, port=mta.submission_port)
    else:
        outcome = mta.send(message, mail_from=SENDER, client=SPOOFING_CLIENT, authenticate=True)
    assert outcome.accepted, outcome
    delivered = mta.delivered(message_id(message))
    signatures = delivered.header_values("DKIM-Signature")
    assert signature_summary(signatures) == BOTH_SIGNATURES, signatures
    assert our_results(delivered) == [], delivered.header_values("Authentication-Results")
    assert dkimpy_verdicts(delivered.data, dns_server, 2) == [True, True]
    assert sorted(opendkim.verify(delivered.data)) == both_pass()

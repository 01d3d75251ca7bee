"""authmilter in front of a real Postfix and a real Sendmail (Debian's packages) on loopback: issue 3's
end-to-end cases, run against each MTA (issue 14: the ``mta`` fixture is parametrised).

Each message comes in over SMTP from an outside client (claimed with XCLIENT for Postfix; for
Sendmail, which has no XCLIENT, the client connects from its own loopback address), passes the MTA
and authmilter, and is relayed to the sink (sink.py), whose copy the tests read. DNS is the
session's Knot server (tests/dnsserver.py) serving the zones of the ``senders`` fixture.

Where the MTAs differ, the test says so. What turned out the same for both: our A-R inserted at
index 0 lands above the MTA's own Received (neither shows its Received to the milter), header
values keep their leading space (both negotiate SMFIP_HDR_LEADSPC), and the reply authmilter sets
(550 5.7.26, 451 4.4.3) reaches the client as set.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import authres
import pytest
from postfix import (
    SENDING_CLIENT,
    SPOOFING_CLIENT,
    Authmilter,
    Mta,
    Outcome,
    Sender,
    Senders,
    milter_answers,
)
from sink import DeliveredMessage

from authmilter.history import read_history
from dnsserver import AuthoritativeDns
from signing import make_message, sign, with_tight_fields

OUR_AUTHSERV_ID = "mx.receiver.example"
# Long enough for a loaded CI machine; a milter that missed a reload or respawn fails after it.
RECOVERY_TIMEOUT = 20.0
BURST_MESSAGES = 40
BURST_SESSIONS = 6
# Messages of the burst that complete before a worker is killed (so the kill lands mid-burst).
KILL_AFTER = 8


@dataclass(frozen=True)
class Clause:
    """One resinfo of an Authentication-Results field: method=result plus its properties."""

    method: str
    result: str
    properties: dict[str, str]


def results_of(value: str) -> tuple[str, list[Clause]]:
    """An A-R field value as (authserv-id, clauses), parsed by the authres library (RFC 8601 §2.2)."""
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    clauses = [
        Clause(r.method, r.result, {f"{p.type}.{p.name}": str(p.value) for p in r.properties})
        for r in parsed.results
    ]
    return str(parsed.authserv_id), clauses


def our_results(message: DeliveredMessage) -> list[Clause]:
    """The clauses of the one A-R field with our authserv-id (fails if there is not exactly one)."""
    ours = [v for v in message.header_values("Authentication-Results") if v.startswith(f"{OUR_AUTHSERV_ID};")]
    assert len(ours) == 1, f"expected one A-R of ours, got {ours}"
    return results_of(ours[0])[1]


def result_of(clauses: list[Clause], method: str, **properties: str) -> list[str]:
    """The results of ``method`` clauses having these properties (``smtp_mailfrom`` = smtp.mailfrom)."""
    wanted = {key.replace("_", ".", 1): value for key, value in properties.items()}
    return [
        c.result
        for c in clauses
        if c.method == method and all(c.properties.get(k) == v for k, v in wanted.items())
    ]


def message_id(message: bytes) -> str:
    found = re.search(rb"^Message-ID: *(<[^>]+>)", message, re.MULTILINE | re.IGNORECASE)
    assert found is not None
    return found.group(1).decode()


def signed(sender: Sender, subject: str, extra_headers: str = "") -> bytes:
    """A message from ``sender`` signed with its RSA key (selector rsa) and its Ed25519 key (ed)."""
    message = make_message(f"Bob <{sender.address}>", subject=subject, extra_headers=extra_headers)
    message = sign(message, sender.rsa, sender.domain, "rsa")
    return sign(message, sender.ed25519, sender.domain, "ed")


def unsigned(sender: Sender, subject: str) -> bytes:
    return make_message(f"Bob <{sender.address}>", subject=subject)


def assert_authenticated(delivered: DeliveredMessage, sender: Sender) -> None:
    clauses = our_results(delivered)
    assert result_of(clauses, "spf", smtp_mailfrom=sender.address) == ["pass"], clauses
    assert result_of(clauses, "dkim", header_d=sender.domain, header_s="rsa") == ["pass"], clauses
    assert result_of(clauses, "dkim", header_d=sender.domain, header_s="ed") == ["pass"], clauses
    assert result_of(clauses, "dmarc", header_from=sender.domain) == ["pass"], clauses


# --- the harness itself ---------------------------------------------------------------------------


def test_postfix_relays_to_the_sink_without_milter(bare_postfix: Mta) -> None:
    """The bare smtpd port (no milter) delivers: Postfix, XCLIENT and the sink work on their own."""
    message = make_message("Bob <bob@bare.example>", subject="bare path")
    outcome = bare_postfix.send(message, mail_from="bob@bare.example")
    assert outcome.accepted, outcome
    delivered = bare_postfix.delivered(message_id(message))
    assert delivered.rcpt_to == ("alice@receiver.example",)
    received = delivered.header_values("Received")
    # XCLIENT took effect: Postfix recorded the claimed client, not 127.0.0.1.
    assert "mx.sender.example [203.0.113.5]" in received[0], received
    assert delivered.header_values("Authentication-Results") == []


# --- verdicts -------------------------------------------------------------------------------------


def test_signed_message_from_reject_domain_is_delivered_with_passing_results(
    mta: Mta, senders: Senders
) -> None:
    sender = senders.reject
    message = signed(sender, "signed and aligned")
    outcome = mta.send(message, mail_from=sender.address)
    assert outcome.accepted, outcome
    delivered = mta.delivered(message_id(message))
    assert_authenticated(delivered, sender)
    # RFC 8601 §4: our A-R goes above the MTA's own Received (the adapter inserts at index 0).
    assert delivered.header_names()[0] == "Authentication-Results", delivered.header_names()
    assert "mx.receiver.example" in delivered.header_values("Received")[0]


def test_header_fields_reach_the_dkim_check_as_sent(mta: Mta, senders: Senders) -> None:
    """``simple`` header canonicalization (RFC 6376 §3.4.1) needs every field byte for byte.

    Without SMFIP_HDR_LEADSPC Postfix drops one space after each colon and the milter must guess it
    back: "Subject:tight" and "To:<TAB>..." would come back as "Subject: tight" and "To: <TAB>...",
    and the signature over them would fail. Our own fields keep their one space after the colon.
    """
    sender = senders.reject
    message = with_tight_fields(make_message(f"Bob <{sender.address}>", subject="tight"))
    message = sign(message, sender.rsa, sender.domain, "rsa", canonicalize=(b"simple", b"simple"))
    outcome = mta.send(message, mail_from=sender.address)
    assert outcome.accepted, outcome
    delivered = mta.delivered(message_id(message))
    clauses = our_results(delivered)
    assert result_of(clauses, "dkim", header_d=sender.domain, header_s="rsa") == ["pass"], clauses
    ours = f"Authentication-Results: {OUR_AUTHSERV_ID};".encode()
    assert delivered.data.startswith(ours), delivered.data[:80]
    assert re.search(rb"^Subject:tight\r?$", delivered.data, re.MULTILINE), delivered.data[:600]


def test_spoofed_message_from_reject_domain_gets_550_at_end_of_data(mta: Mta, senders: Senders) -> None:
    sender = senders.reject
    message = unsigned(sender, "spoofed")
    outcome = mta.send(message, mail_from=sender.address, client=SPOOFING_CLIENT)
    assert outcome.code == 550, outcome
    assert outcome.text.startswith("5.7."), outcome
    assert sender.domain in outcome.text, outcome
    assert outcome.queue_id == ""
    assert mta.sink.find(message_id(message)) == []


def test_quarantined_message_lands_in_the_hold_queue(mta: Mta, senders: Senders) -> None:
    """Postfix's hold queue (``postqueue -j``); Sendmail's quarantine (``sendmail -bp -qQ``: smfi_quarantine
    renames the control file qfID to hfID, which no queue run delivers)."""
    sender = senders.quarantine
    message = unsigned(sender, "quarantined")
    outcome = mta.send(message, mail_from=sender.address, client=SPOOFING_CLIENT)
    # Quarantine accepts the message: the client must not retry or bounce it.
    assert outcome.accepted, outcome
    assert outcome.queue_id, outcome
    try:
        assert outcome.queue_id in mta.hold.queue_ids()
        assert mta.sink.find(message_id(message)) == []
    finally:
        if outcome.queue_id in mta.hold.queue_ids():
            mta.hold.delete(outcome.queue_id)


def test_forged_results_with_our_authserv_id_are_removed_and_foreign_ones_kept(
    mta: Mta, senders: Senders
) -> None:
    sender = senders.reject
    # Two forged fields in a row, then a foreign one, then another forged one: deleting by index
    # front to back (OpenDKIM bug #148) would keep a forged field and delete the foreign one.
    forged = (
        f"Authentication-Results: {OUR_AUTHSERV_ID}; dkim=pass header.d=forged-one.example\r\n"
        f"Authentication-Results: {OUR_AUTHSERV_ID}; dmarc=pass header.from=forged-two.example\r\n"
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=kept@foreign.example\r\n"
        f"Authentication-Results: {OUR_AUTHSERV_ID.upper()}; dkim=pass header.d=forged-three.example\r\n"
    )
    message = signed(sender, "forged results", extra_headers=forged)
    outcome = mta.send(message, mail_from=sender.address)
    assert outcome.accepted, outcome
    delivered = mta.delivered(message_id(message))
    values = delivered.header_values("Authentication-Results")
    assert not [v for v in values if "forged-" in v], values
    assert [v for v in values if v.startswith("other.example;")] == [
        "other.example; spf=pass smtp.mailfrom=kept@foreign.example"
    ], values
    assert_authenticated(delivered, sender)
    assert len(values) == 2, values


def test_history_lines_name_the_queue_id_the_client_was_given(
    mta: Mta, senders: Senders, milter_process: Authmilter
) -> None:
    """The queue id (macro ``i``) comes at different times: Sendmail sends it with MAIL FROM; Postfix
    sends none then (its queue file is opened at the first accepted RCPT, smtpd_delay_open_until_valid_rcpt),
    so authmilter reads it again at end of message. Either way the history line names the id in the 250."""
    passing = signed(senders.reject, "history: pass")
    quarantined = unsigned(senders.quarantine, "history: quarantine")
    accepted = mta.send(passing, mail_from=senders.reject.address)
    held = mta.send(quarantined, mail_from=senders.quarantine.address, client=SPOOFING_CLIENT)
    try:
        assert accepted.queue_id and held.queue_id, (accepted, held)
        records = {r["queue_id"]: r for r in read_history(str(milter_process.history_path))}
        for outcome, sender, client, action in (
            (accepted, senders.reject, SENDING_CLIENT, "accept"),
            (held, senders.quarantine, SPOOFING_CLIENT, "quarantine"),
        ):
            assert outcome.queue_id in records, (outcome, sorted(records))
            record = records[outcome.queue_id]
            assert record["action"] == action, record
            assert record["reporting_host"] == OUR_AUTHSERV_ID, record
            # What the MTA saw: XCLIENT's claimed address (Postfix) or the loopback one (Sendmail).
            assert (record["source_ip"], record["helo"]) == (mta.client_address(client), client.helo), record
            assert (record["header_from"], record["envelope_from"]) == (sender.domain, sender.domain), record
            assert record["envelope_to"] == ["receiver.example"], record
    finally:
        if held.queue_id in mta.hold.queue_ids():
            mta.hold.delete(held.queue_id)


# --- failures -------------------------------------------------------------------------------------


def test_dns_outage_tempfails_and_the_retry_is_delivered(
    mta: Mta, senders: Senders, dns_server: AuthoritativeDns
) -> None:
    sender = senders.outage[mta.name]
    message = signed(sender, "sent during a DNS outage")
    dns_server.stop()
    try:
        outcome = mta.send(message, mail_from=sender.address)
    finally:
        dns_server.start()
    # RFC 9989: DMARC could not be evaluated; the default dmarc_temperror is tempfail (451 4.x.x).
    assert outcome.code == 451, outcome
    assert outcome.text.startswith("4."), outcome
    assert mta.sink.find(message_id(message)) == []
    # The sending MTA retries the same message once DNS is back: no failure may have been cached.
    retry = mta.send(message, mail_from=sender.address)
    assert retry.accepted, retry
    assert_authenticated(mta.delivered(message_id(message)), sender)


def test_killing_a_worker_during_a_burst_loses_no_message(
    mta: Mta, senders: Senders, milter_process: Authmilter
) -> None:
    sender = senders.reject
    workers_before = milter_process.worker_pids()
    assert len(workers_before) >= 2, workers_before
    messages = [signed(sender, f"burst {n}") for n in range(BURST_MESSAGES)]
    done = threading.Semaphore(0)

    def deliver(message: bytes) -> Outcome:
        try:
            return mta.send(message, mail_from=sender.address)
        finally:
            done.release()

    with ThreadPoolExecutor(BURST_SESSIONS) as pool:
        futures = [pool.submit(deliver, m) for m in messages]
        for _ in range(KILL_AFTER):
            assert done.acquire(timeout=60), "the burst stalled before the kill"
        victim = workers_before[0]
        milter_process.kill_worker(victim)
        outcomes = [f.result() for f in futures]

    # Every message either reached Postfix's queue (250) or was tempfailed for the client to retry.
    refused = [o for o in outcomes if not (o.accepted or o.temporary)]
    assert refused == [], refused
    for message, outcome in zip(messages, outcomes, strict=True):
        if outcome.accepted:
            assert_authenticated(mta.delivered(message_id(message)), sender)
    # The supervisor replaces the worker; the tempfailed messages' retries then go through.
    assert _eventually(lambda: len(milter_process.worker_pids()) >= len(workers_before)), (
        f"worker {victim} was not replaced: {milter_process.worker_pids()}"
    )
    assert victim not in milter_process.worker_pids()
    for message, outcome in zip(messages, outcomes, strict=True):
        if not outcome.accepted:
            retry = mta.send(message, mail_from=sender.address)
            assert retry.accepted, retry
            assert_authenticated(mta.delivered(message_id(message)), sender)


def test_sighup_with_a_broken_config_keeps_serving_the_old_one(
    mta: Mta, senders: Senders, milter_process: Authmilter
) -> None:
    sender = senders.reject
    log_start = milter_process.log_size()
    # Valid TOML, invalid value: a daemon that applied part of it would show the new authserv-id.
    milter_process.write_config(authserv_id="broken.receiver.example", extra='[policy]\nenforce = "maybe"\n')
    try:
        milter_process.signal(signal.SIGHUP)
        assert _eventually(lambda: milter_process.log_size() > log_start), "SIGHUP left no log line"
        time.sleep(1.0)
        assert milter_process.running, "the supervisor exited on a broken config"
        assert milter_answers(milter_process.host, milter_process.milter_port)
        message = signed(sender, "after a broken reload")
        outcome = mta.send(message, mail_from=sender.address)
        assert outcome.accepted, outcome
        assert_authenticated(mta.delivered(message_id(message)), sender)
    finally:
        milter_process.write_config()


def test_sighup_with_a_valid_config_is_taken_up_without_dropping_mail(
    mta: Mta, senders: Senders, milter_process: Authmilter
) -> None:
    sender = senders.reject
    milter_process.write_config(authserv_id="reloaded.receiver.example")
    try:
        milter_process.signal(signal.SIGHUP)

        def serves_new_config() -> bool:
            message = signed(sender, "after a valid reload")
            outcome = mta.send(message, mail_from=sender.address)
            assert outcome.accepted or outcome.temporary, outcome
            if not outcome.accepted:
                return False
            values = mta.delivered(message_id(message)).header_values("Authentication-Results")
            return any(v.startswith("reloaded.receiver.example;") for v in values)

        assert _eventually(serves_new_config, interval=0.5), (
            f"the new authserv-id never appeared (supervisor running: {milter_process.running})"
        )
    finally:
        milter_process.write_config()
        milter_process.signal(signal.SIGHUP)
    assert _eventually(lambda: _serves_our_id(mta, sender), interval=0.5), "the first config did not return"


def _serves_our_id(mta: Mta, sender: Sender) -> bool:
    message = signed(sender, "after restoring the config")
    outcome = mta.send(message, mail_from=sender.address)
    if not outcome.accepted:
        return False
    values = mta.delivered(message_id(message)).header_values("Authentication-Results")
    return any(v.startswith(f"{OUR_AUTHSERV_ID};") for v in values)


def _eventually(
    condition: Callable[[], bool], timeout: float = RECOVERY_TIMEOUT, interval: float = 0.1
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


@pytest.fixture(autouse=True)
def _dns_is_back(dns_server: AuthoritativeDns) -> None:
    """Every test starts with the DNS server up (an outage test restarts it in its finally)."""
    if not dns_server.running:
        dns_server.start()

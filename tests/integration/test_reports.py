"""The history file the real daemon wrote behind the MTA, taken end to end by ``authmilter report``.

Mail goes through the MTA and ``authmilter run`` (the session's, writing ``[history] path``); then
``authmilter report import`` and ``report show`` run as commands, and the store's reports are
compared with the file read by the reference reader (history.read_history); ``report send`` mails
them through the same MTA to the sink, where parsedmarc, an independent reader, reads them back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import parsedmarc
import pytest
from postfix import DELIVERY_TIMEOUT, SPOOFING_CLIENT, Authmilter, Mta, Senders
from sink import DeliveredMessage, MessageStore

from authmilter.history import read_history
from authmilter.reports.store import open_store
from signing import make_message, sign

WRITE_TIMEOUT = 20.0


def authmilter(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authmilter", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_for_records(path: Path, queue_ids: set[str]) -> None:
    deadline = time.monotonic() + WRITE_TIMEOUT
    while time.monotonic() < deadline:
        if path.exists() and queue_ids <= {r["queue_id"] for r in read_history(str(path))}:
            return
        time.sleep(0.1)
    pytest.fail(f"the daemon did not record {sorted(queue_ids)} in {path} within {WRITE_TIMEOUT} s")


def wait_for_new_copy(sink: MessageStore, message_id: str, seen: set[Path]) -> DeliveredMessage:
    """A copy of the message that was not in the sink as ``seen``: each MTA's run sends a report
    with the same Report-ID (made from reporter, domain and period) to the one shared sink."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while time.monotonic() < deadline:
        fresh = [m for m in sink.find(message_id) if m.path not in seen]
        if fresh:
            return fresh[0]
        time.sleep(0.1)
    pytest.fail(f"no new copy of {message_id} reached the sink within {DELIVERY_TIMEOUT} s")


def test_the_daemons_history_imports_into_reports(
    mta: Mta, senders: Senders, milter_process: Authmilter, tmp_path: Path
) -> None:
    sender = senders.reject
    good = make_message(f"Bob <{sender.address}>", subject="report me")
    good = sign(sign(good, sender.rsa, sender.domain, "rsa"), sender.ed25519, sender.domain, "ed")
    accepted = mta.send(good, mail_from=sender.address)
    spoofed = mta.send(
        make_message(f"Bob <{sender.address}>", subject="spoofed, for the report"),
        mail_from=sender.address,
        client=SPOOFING_CLIENT,
    )
    assert accepted.accepted and spoofed.permanent, (accepted, spoofed)
    history = milter_process.history_path
    wait_for_records(history, {accepted.queue_id})

    config = tmp_path / "reports.toml"
    database = f"sqlite://{tmp_path}/reports.sqlite"
    config.write_text(
        f'[milter]\nauthserv_id = "mx.receiver.example"\n[history]\npath = "{history}"\n'
        f'[reports]\ndatabase = "{database}"\nsmtp_host = "{mta.host}"\nsmtp_port = {mta.port}\n'
        f'smtp_starttls = "no"\n[dns]\nnameservers = ["127.0.0.1"]\nport = {milter_process.dns_port}\n'
    )
    first = authmilter("report", "import", "--config", str(config))
    assert first.returncode == 0, first.stderr
    again = authmilter("report", "import", "--config", str(config))
    assert again.returncode == 0 and "imported 0 record(s)" in again.stdout, again.stdout + again.stderr

    # What the reference reader sees in the file is what the store counts, domain by domain.
    expected: Counter[str] = Counter(
        r["policy_published"]["domain"]
        for r in read_history(str(history))
        if r["policy_published"] is not None and r["action"] != "tempfail"
    )
    shown = authmilter("report", "show", "--config", str(config), "--json")
    assert shown.returncode == 0, shown.stderr
    assert {d["policy_domain"]: d["messages"] for d in json.loads(shown.stdout)} == dict(expected)

    with open_store(database) as store:
        reports = [
            r for r in store.due_reports(int(time.time()) + 2 * 86400) if r.policy_domain == sender.domain
        ]
    assert len(reports) == 1
    (report,) = reports
    # Other tests of the session reload authmilter with other authserv-ids: the hosts are the file's.
    hosts = {r["reporting_host"] for r in read_history(str(history)) if r["header_from"] == sender.domain}
    assert "mx.receiver.example" in report.reporting_hosts and set(report.reporting_hosts) <= hosts
    assert report.policy.p == "reject" and report.policy.rua == (f"mailto:dmarc@{sender.domain}",)
    assert sum(row.count for row in report.rows) == expected[sender.domain]
    passing = [row.key for row in report.rows if row.key.disposition == "pass"]
    assert passing and {(d.selector, d.result) for d in passing[0].dkim_results} == {
        ("rsa", "pass"),
        ("ed", "pass"),
    }
    spoofer = mta.client_address(SPOOFING_CLIENT)  # Sendmail sees its loopback address
    rejected = [row.key for row in report.rows if row.key.source_ip == spoofer]
    assert rejected and rejected[0].disposition == "reject"
    assert (rejected[0].spf, rejected[0].dkim) == ("fail", "fail")

    # report send: the day is over by --until; the report goes through the MTA to the sink.
    until = str(int(time.time()) + 2 * 86400)
    seen = {m.path for m in mta.sink.messages()}
    sent = authmilter("report", "send", "--config", str(config), "--until", until)
    line = next((x for x in sent.stdout.splitlines() if x.startswith(f"{sender.domain} ")), "")
    assert f": sent to dmarc@{sender.domain} " in line, sent.stdout + sent.stderr
    unique_id = line.rsplit("!", 1)[1].removesuffix(".xml.gz")
    delivered = wait_for_new_copy(mta.sink, f"<{unique_id}@mx.receiver.example>", seen)
    parsed = parsedmarc.parse_report_email(delivered.data, offline=True, always_use_local_files=True)
    records = parsed["report"]["records"]
    assert sum(r["count"] for r in records) == expected[sender.domain]
    assert {r["policy_evaluated"]["disposition"] for r in records} >= {"pass", "reject"}
    again = authmilter("report", "send", "--config", str(config), "--until", until)
    assert again.returncode == 0 and f"{sender.domain} " not in again.stdout, "sent once only"

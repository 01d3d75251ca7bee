"""The Prometheus endpoint of the session's authmilter after mail went through the real Postfix.

The session daemon serves other tests too, so each test compares a scrape after its mail with
one before it.
"""

from __future__ import annotations

import time

from postfix import SPOOFING_CLIENT, AuthmilterProcess, Mta, Senders
from test_postfix import RECOVERY_TIMEOUT, message_id, signed, unsigned

from scrape import Samples, scrape, value


def increase(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_mail_through_postfix_is_counted_by_method_result_action_and_check(
    mta: Mta, senders: Senders, milter_process: AuthmilterProcess
) -> None:
    sender = senders.reject
    before = scrape(milter_process.metrics_port)
    for number in range(3):
        message = signed(sender, f"counted {number}")
        assert mta.send(message, mail_from=sender.address).accepted
        mta.delivered(message_id(message))
    spoofed = mta.send(unsigned(sender, "counted spoof"), mail_from=sender.address, client=SPOOFING_CLIENT)
    assert spoofed.code == 550, spoofed
    after = scrape(milter_process.metrics_port)

    assert increase(before, after, "authmilter_actions_total", action="accept", direction="inbound") == 3
    assert increase(before, after, "authmilter_actions_total", action="reject", direction="inbound") == 1
    assert increase(before, after, "authmilter_auth_results_total", method="spf", result="pass") == 3
    assert increase(before, after, "authmilter_auth_results_total", method="spf", result="fail") == 1
    # Two signatures each (rsa and ed25519).
    assert increase(before, after, "authmilter_auth_results_total", method="dkim", result="pass") == 6
    assert increase(before, after, "authmilter_auth_results_total", method="dkim", result="none") == 1
    assert increase(before, after, "authmilter_auth_results_total", method="dmarc", result="pass") == 3
    assert increase(before, after, "authmilter_auth_results_total", method="dmarc", result="fail") == 1
    assert increase(before, after, "authmilter_auth_results_total", method="arc", result="none") == 4
    for check in ("spf", "helo", "dkim", "arc", "dmarc"):
        assert increase(before, after, "authmilter_check_duration_seconds_count", check=check) == 4
    misses = increase(before, after, "authmilter_dns_cache_lookups_total", result="miss")
    sent = sum(
        sample - before.get(key, 0.0)
        for key, sample in after.items()
        if key[0] == "authmilter_dns_queries_total"
    )
    assert sent == misses, "every cache miss is one query sent, counted by type and outcome"
    # Postfix holds no milter connection between SMTP sessions; the last close may still be on its way.
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while value(scrape(milter_process.metrics_port), "authmilter_connections_in_flight") != 0:
        assert time.monotonic() < deadline, "connections in flight never went back to 0"
        time.sleep(0.1)


def test_a_killed_worker_is_counted_and_replaced(mta: Mta, milter_process: AuthmilterProcess) -> None:
    before = scrape(milter_process.metrics_port)
    victim = milter_process.worker_pids()[0]
    milter_process.kill_worker(victim)
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while (
        increase(before, after := scrape(milter_process.metrics_port), "authmilter_worker_starts_total") < 1
    ):
        assert time.monotonic() < deadline, "no replacement worker was counted"
        time.sleep(0.1)
    assert increase(before, after, "authmilter_worker_exits_total", reason="died") == 1

"""metrics.py: what a verdict, a DNS lookup and a worker's life count, in the exposition a
Prometheus server reads (multiprocess mode, as in the daemon), and the supervisor's endpoint."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.rdatatype
import pytest

from authmilter.metrics import (
    CLIENT_TIMEOUT,
    MAX_REQUEST_BYTES,
    MULTIPROCESS_ENV,
    Metrics,
    MetricsEndpoint,
    enable,
)
from authmilter.model import (
    Action,
    AuthResult,
    CheckTiming,
    DkimResult,
    DmarcVerdict,
    SpfResult,
    SpfScope,
    Verdict,
)
from authmilter.resolver import DnsBudget, NameserverSource, Resolver, ZoneFileSource
from scrape import Samples, parse, value

ZONE = Path(__file__).resolve().parent / "zones" / "sender.example.zone"
DASHBOARD = Path(__file__).resolve().parents[1] / "conf" / "grafana-authmilter.json"


@pytest.fixture
def metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Metrics]:
    monkeypatch.delenv(MULTIPROCESS_ENV, raising=False)  # restored afterwards
    enabled = enable(str(tmp_path))
    yield enabled
    enabled.close()


def exposition(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    return parse(body.decode("utf-8"))


def inbound_verdict() -> Verdict:
    return Verdict(
        spf=SpfResult(AuthResult.PASS, "sender.example", SpfScope.MFROM),
        helo=SpfResult(AuthResult.NONE, "mx.sender.example", SpfScope.HELO),
        dkim=(
            DkimResult(AuthResult.PASS, "sender.example", "rsa1", "rsa-sha256"),
            DkimResult(AuthResult.FAIL, "list.example", "s", "rsa-sha256"),
        ),
        dmarc=DmarcVerdict(AuthResult.PASS, "sender.example"),
        action=Action.ACCEPT,
        reply=None,
        reason="",
        authentication_results="",
        timings=(
            CheckTiming("spf", 2),
            CheckTiming("helo", 0.4),
            CheckTiming("dkim", 30),
            CheckTiming("dmarc", 300),
        ),
    )


def test_enable_makes_a_private_directory_and_close_removes_it(tmp_path: Path, metrics: Metrics) -> None:
    directory = Path(metrics.directory)
    assert directory.parent == tmp_path and os.environ[MULTIPROCESS_ENV] == str(directory)
    assert directory.stat().st_mode & 0o777 == 0o700
    metrics.close()
    assert not directory.exists()


def test_a_verdict_counts_each_method_result_the_action_and_each_check(metrics: Metrics) -> None:
    metrics.message(inbound_verdict())
    metrics.message(inbound_verdict())
    samples = exposition(metrics)
    assert value(samples, "authmilter_auth_results_total", method="spf", result="pass") == 2
    assert value(samples, "authmilter_auth_results_total", method="helo", result="none") == 2
    assert value(samples, "authmilter_auth_results_total", method="dkim", result="pass") == 2
    assert value(samples, "authmilter_auth_results_total", method="dkim", result="fail") == 2
    assert value(samples, "authmilter_auth_results_total", method="dmarc", result="pass") == 2
    assert value(samples, "authmilter_actions_total", action="accept", direction="inbound") == 2
    assert value(samples, "authmilter_check_duration_seconds_count", check="dmarc") == 2
    assert value(samples, "authmilter_check_duration_seconds_sum", check="dkim") == pytest.approx(0.06)
    # 0.3 s falls in the 0.5 s bucket, not in the 0.25 s one.
    assert value(samples, "authmilter_check_duration_seconds_bucket", check="dmarc", le="0.25") == 0
    assert value(samples, "authmilter_check_duration_seconds_bucket", check="dmarc", le="0.5") == 2


def test_an_unsigned_message_counts_dkim_none_and_outbound_mail_its_signing_keys(metrics: Metrics) -> None:
    unsigned = Verdict(None, None, (), None, Action.REJECT, None, "", "", timings=(CheckTiming("dkim", 1),))
    signed = Verdict(
        None,
        None,
        (),
        None,
        Action.ACCEPT,
        None,
        "outbound",
        "",
        outbound=True,
        signatures=(
            "v=1; a=rsa-sha256; d=example.org; s=2026a; c=relaxed/relaxed; h=from; bh=x; b=y",
            "v=1; a=ed25519-sha256; d=example.org;\r\n\ts=ed; h=from; bh=x; b=y",
        ),
    )
    metrics.message(unsigned)
    metrics.message(signed)
    samples = exposition(metrics)
    assert value(samples, "authmilter_auth_results_total", method="dkim", result="none") == 1
    assert value(samples, "authmilter_actions_total", action="reject", direction="inbound") == 1
    assert value(samples, "authmilter_actions_total", action="accept", direction="outbound") == 1
    assert value(samples, "authmilter_signatures_total", domain="example.org", selector="2026a") == 1
    assert value(samples, "authmilter_signatures_total", domain="example.org", selector="ed") == 1


def test_dns_lookups_count_hits_misses_outcomes_and_budget_refusals(metrics: Metrics) -> None:
    resolver = Resolver(ZoneFileSource([ZONE]), observer=metrics)
    resolver.txt("sender.example")
    resolver.txt("sender.example")  # from the cache
    resolver.txt("nothing-here.sender.example")
    spent = resolver.for_message(DnsBudget(seconds=60, queries=0))
    spent.txt("other.sender.example")
    # Hits are added up in memory and written with the message's counts (one write, not one per hit).
    assert value(exposition(metrics), "authmilter_dns_cache_lookups_total", result="hit") == 0
    metrics.message(inbound_verdict())
    samples = exposition(metrics)
    assert value(samples, "authmilter_dns_cache_lookups_total", result="hit") == 1
    assert value(samples, "authmilter_dns_cache_lookups_total", result="miss") == 2
    assert value(samples, "authmilter_dns_queries_total", type="TXT", status="ok") == 1
    assert value(samples, "authmilter_dns_queries_total", type="TXT", status="nxdomain") == 1
    assert value(samples, "authmilter_dns_errors_total", kind="budget") == 1
    assert value(samples, "authmilter_dns_query_duration_seconds_count") == 2


def test_a_nameserver_that_never_answers_counts_as_a_timeout(metrics: Metrics) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        source = NameserverSource(["127.0.0.1"], port=silent.getsockname()[1], timeout=0.3)
        answer = Resolver(source, observer=metrics).query("example.org", dns.rdatatype.TXT)
    assert answer.timed_out
    samples = exposition(metrics)
    assert value(samples, "authmilter_dns_errors_total", kind="timeout") == 1
    assert value(samples, "authmilter_dns_queries_total", type="TXT", status="tempfail") == 1


def test_prefetched_queries_closed_unread_are_counted(metrics: Metrics) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        source = NameserverSource(["127.0.0.1"], port=silent.getsockname()[1], timeout=0.3)
        resolver = Resolver(source, observer=metrics)
        lookups = resolver.prefetch(8)
        lookups.start([("read.example.org", dns.rdatatype.TXT), ("unread.example.org", dns.rdatatype.TXT)])
        assert lookups.sent == 2
        resolver.query("read.example.org", dns.rdatatype.TXT)  # claimed (and timed out): read
        lookups.cancel()  # the message ends: the other one is closed unread
    samples = exposition(metrics)
    assert value(samples, "authmilter_dns_prefetches_unread_total") == 1
    assert value(samples, "authmilter_dns_queries_total", type="TXT", status="tempfail") == 1


def test_a_dead_workers_counters_stay_and_its_connections_go(metrics: Metrics) -> None:
    metrics.worker_started()
    pid = os.fork()
    if pid == 0:  # a worker: one open connection, one message
        try:
            metrics.connection_opened()
            metrics.message(inbound_verdict())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    before = exposition(metrics)
    assert value(before, "authmilter_connections_in_flight") == 1
    metrics.worker_exited(pid, stopped=False)
    after = exposition(metrics)
    assert value(after, "authmilter_connections_in_flight") == 0
    assert value(after, "authmilter_actions_total", action="accept", direction="inbound") == 1
    assert value(after, "authmilter_worker_starts_total") == 1
    assert value(after, "authmilter_worker_exits_total", reason="died") == 1
    assert value(after, "authmilter_worker_exits_total", reason="stopped") == 0


def test_reloads_and_history_errors_are_counted(metrics: Metrics) -> None:
    for outcome in ("succeeded", "refused", "refused"):
        metrics.reload(outcome)
    metrics.history_write_error()
    samples = exposition(metrics)
    assert value(samples, "authmilter_reloads_total", outcome="refused") == 2
    assert value(samples, "authmilter_reloads_total", outcome="failed") == 0
    assert value(samples, "authmilter_history_write_errors_total") == 1


# --- the endpoint, driven by a poll loop like the supervisor's -----------------------------------


class Loop:
    """A poll loop around one endpoint, as Supervisor._wait_and_handle runs it."""

    def __init__(self, render: Callable[[], tuple[bytes, str]], clock: Callable[[], float] = time.monotonic):
        self.endpoint = MetricsEndpoint(("127.0.0.1", 0), render, clock)
        self.poller = select.poll()
        self.endpoint.watch(self.poller)

    def turn(self, timeout: float = 0.05) -> None:
        for fd, _ in self.poller.poll(timeout * 1000):
            assert self.endpoint.owns(fd)
            self.endpoint.handle(fd)

    def connect(self) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.endpoint.port), timeout=5)
        self.turn()
        return client

    def response(self, client: socket.socket) -> bytes:
        received = b""
        client.setblocking(False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.turn()
            try:
                chunk = client.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                return received
            received += chunk
        raise AssertionError(f"no complete response: {received!r}")


@pytest.fixture
def loop() -> Iterator[Loop]:
    served = Loop(lambda: (b"# exposition\nauthmilter_x 1.0\n" * 5000, "text/plain; version=0.0.4"))
    yield served
    served.endpoint.close()


def test_get_metrics_returns_the_exposition_and_closes(loop: Loop) -> None:
    client = loop.connect()
    client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    response = loop.response(client)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert body == b"# exposition\nauthmilter_x 1.0\n" * 5000
    assert loop.endpoint.deadline() is None, "the connection is gone"


def test_a_request_in_pieces_is_answered_once_whole(loop: Loop) -> None:
    client = loop.connect()
    for piece in (b"GET /met", b"rics?x=1 HTTP/1.0\r\n", b"\r\n"):
        client.sendall(piece)
        loop.turn()
    assert loop.response(client).startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /other HTTP/1.1\r\n\r\n", b"404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405 Method Not Allowed"),
        (b"\r\n\r\n", b"405 Method Not Allowed"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"y" * MAX_REQUEST_BYTES, b"431 Request Header Fields Too Large"),
    ],
)
def test_other_requests_get_an_error_status(loop: Loop, request_head: bytes, status: bytes) -> None:
    client = loop.connect()
    client.sendall(request_head)
    assert loop.response(client).startswith(b"HTTP/1.1 " + status)


def test_a_silent_client_is_dropped_at_its_deadline() -> None:
    now = [1000.0]
    loop = Loop(lambda: (b"", "text/plain"), clock=lambda: now[0])
    try:
        client = loop.connect()
        assert loop.endpoint.deadline() == 1000.0 + CLIENT_TIMEOUT
        loop.endpoint.expire(1000.0 + CLIENT_TIMEOUT - 1)
        assert loop.endpoint.deadline() is not None
        loop.endpoint.expire(1000.0 + CLIENT_TIMEOUT)
        assert loop.endpoint.deadline() is None
        assert client.recv(10) == b"", "closed without an answer"
    finally:
        loop.endpoint.close()


def test_a_failing_render_is_a_500_and_the_loop_goes_on() -> None:
    def broken() -> tuple[bytes, str]:
        raise ValueError("corrupt value file")

    loop = Loop(broken)
    try:
        client = loop.connect()
        client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert loop.response(client).startswith(b"HTTP/1.1 500 Internal Server Error")
    finally:
        loop.endpoint.close()


def test_a_busy_address_is_an_oserror(loop: Loop) -> None:
    with pytest.raises(OSError):
        MetricsEndpoint(("127.0.0.1", loop.endpoint.port), lambda: (b"", ""))


def _family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count|total)$", "", name)


def test_the_grafana_dashboard_uses_every_metric_and_only_those(metrics: Metrics) -> None:
    metrics.message(inbound_verdict())
    metrics.answered(dns.rdatatype.TXT, Resolver(ZoneFileSource([ZONE])).txt("sender.example"), 0.01)
    metrics.budget_refused()
    metrics.connection_opened()
    outbound = Verdict(
        None, None, (), None, Action.ACCEPT, None, "", "", outbound=True, signatures=("d=a; s=b",)
    )
    metrics.message(outbound)  # every labelled metric has a sample from here on
    exposed = {name for name, _ in exposition(metrics)}
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expression in expressions for name in re.findall(r"authmilter_\w+", expression)}
    assert used <= exposed, f"the dashboard names metrics that do not exist: {sorted(used - exposed)}"
    missing = {_family(n) for n in exposed} - {_family(n) for n in used}
    assert not missing, f"metrics without a panel in {DASHBOARD.name}: {sorted(missing)}"


def test_with_metrics_off_prometheus_client_is_never_imported() -> None:
    # A fresh interpreter: this one has imported prometheus_client for the tests above.
    code = (
        "import sys\n"
        "from authmilter import supervisor\n"
        "from authmilter.config import default_config\n"
        "from authmilter.milter_app import build_runtime\n"
        "runtime = build_runtime(default_config())\n"
        "assert runtime.metrics is None and supervisor.start_metrics(runtime.config) == (None, None)\n"
        "sys.exit('prometheus_client' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

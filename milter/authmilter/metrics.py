"""Prometheus metrics (``[metrics] listen``): what is counted, and the endpoint that serves it.

Off by default. When ``listen`` is empty nothing here is imported on the message path:
:class:`~authmilter.milter_app.Runtime` holds no :class:`Metrics`, the resolver has no observer,
and prometheus_client is never imported.

When on, the daemon runs prometheus_client in multiprocess mode: the supervisor creates a private
directory (:func:`enable`, under ``$RUNTIME_DIRECTORY`` when systemd gives one) and sets
``PROMETHEUS_MULTIPROC_DIR`` before it imports prometheus_client and forks any worker; every process
then writes its own values to memory-mapped files there, and a scrape sums them
(``MultiProcessCollector``). The supervisor marks a reaped worker dead (its connection gauge goes)
and removes the directory when it stops.

The endpoint is served by the supervisor itself, from its ``poll()`` loop: the supervisor runs no
threads (it forks), so prometheus_client's threaded HTTP server is out, and a child process of its
own would be one more process to start, watch and restart, holding copies of the workers' control
sockets. :class:`MetricsEndpoint` is a small non-blocking HTTP/1.0-style responder: one request per
connection, bounded in size, time and number of clients, so a slow or hostile client never holds
the loop.

Metric names and labels are listed in docs/deploy.md ("Metrics").
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Generic, TypeVar

import dns.rdatatype

from authmilter.model import Verdict
from authmilter.resolver import DnsAnswer, DnsStatus

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

M = TypeVar("M", "Counter", "Histogram")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Check latencies: from a cached SPF pass (~0.1 ms) to a DKIM verification waiting on DNS (seconds).
CHECK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DNS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Our own DKIM-Signature values: d= and s= name the key (bounded by the KeyTable).
_SIGNATURE_TAG = re.compile(r"(?:^|;)\s*([ds])\s*=\s*([^;\s]+)")


class _Labelled(Generic[M]):
    """A labelled metric whose children are looked up once: ``labels()`` costs more than ``inc()``."""

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:  # two threads may both ask: labels() gives both the same child
            child = self._children[labels] = self.metric.labels(*labels)
        return child


class Metrics:
    """Every metric of the daemon; built once in the supervisor, before the workers fork.

    Each increment writes to a memory-mapped file (a few µs), so what happens many times per
    message is gathered first: DNS cache hits are added up in memory and written once, with the
    message's other counts, by :meth:`message`.

    Args:
        directory: the multiprocess directory (:func:`enable` made it and set the environment).
    """

    def __init__(self, directory: str) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # only when metrics are on

        self.directory = directory
        self.results = _Labelled(
            Counter(
                "authmilter_auth_results",
                "Authentication results written, by method and result (one per DKIM signature)",
                ["method", "result"],
                registry=None,
            )
        )
        self.actions = _Labelled(
            Counter(
                "authmilter_actions",
                "Messages by action taken and direction",
                ["action", "direction"],
                registry=None,
            )
        )
        self.check_seconds = _Labelled(
            Histogram(
                "authmilter_check_duration_seconds",
                "Wall time of each check of a message",
                ["check"],
                buckets=CHECK_BUCKETS,
                registry=None,
            )
        )
        self.signatures = _Labelled(
            Counter(
                "authmilter_signatures",
                "DKIM signatures added, by key",
                ["domain", "selector"],
                registry=None,
            )
        )
        self.dns_queries = _Labelled(
            Counter(
                "authmilter_dns_queries",
                "DNS queries sent (cache misses), by type and outcome",
                ["type", "status"],
                registry=None,
            )
        )
        self.dns_errors = _Labelled(
            Counter(
                "authmilter_dns_errors",
                "DNS lookups that failed temporarily: timeout, error (SERVFAIL, refused...) or budget",
                ["kind"],
                registry=None,
            )
        )
        self.dns_cache = _Labelled(
            Counter("authmilter_dns_cache_lookups", "DNS lookups by cache outcome", ["result"], registry=None)
        )
        self.dns_prefetches_unread: Counter = Counter(
            "authmilter_dns_prefetches_unread",
            "Prefetched DNS queries closed unread (the message ended before a check asked the name, or "
            "the same name was already on its way)",
            registry=None,
        )
        self.dns_seconds: Histogram = Histogram(
            "authmilter_dns_query_duration_seconds",
            "Wall time of DNS queries sent",
            buckets=DNS_BUCKETS,
            registry=None,
        )
        self.connections: Gauge = Gauge(
            "authmilter_connections_in_flight",
            "Milter connections open (an MTA holds one per SMTP session)",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.history_errors: Counter = Counter(
            "authmilter_history_write_errors", "History records that could not be written", registry=None
        )
        self.worker_starts: Counter = Counter(
            "authmilter_worker_starts", "Worker processes started", registry=None
        )
        self.worker_exits = _Labelled(
            Counter(
                "authmilter_worker_exits",
                "Worker processes ended: stopped (asked to) or died (crashed, killed)",
                ["reason"],
                registry=None,
            )
        )
        self.reloads = _Labelled(
            Counter(
                "authmilter_reloads",
                "Reloads (SIGHUP): succeeded, refused (invalid config) or failed (workers did not start)",
                ["outcome"],
                registry=None,
            )
        )
        for reason in ("stopped", "died"):
            self.worker_exits(reason)
        for outcome in ("succeeded", "refused", "failed"):
            self.reloads(outcome)
        self._cache_hits = 0  # not yet written (see above)
        self._cache_hits_lock = threading.Lock()

    # --- a worker: messages and connections (milter_app.py) ---

    def message(self, verdict: Verdict) -> None:
        """Count one verdict: its results, action, check times and signatures (and the DNS cache
        hits gathered since the last message)."""
        with self._cache_hits_lock:
            hits, self._cache_hits = self._cache_hits, 0
        if hits:
            self.dns_cache("hit").inc(hits)
        direction = "outbound" if verdict.outbound else "inbound"
        self.actions(verdict.action.value, direction).inc()
        for timing in verdict.timings:
            self.check_seconds(timing.check).observe(timing.ms / 1000)
        for method, result in _results(verdict):
            self.results(method, result).inc()
        for signature in verdict.signatures:
            tags = dict(_SIGNATURE_TAG.findall(signature))
            self.signatures(tags.get("d", "-"), tags.get("s", "-")).inc()

    def connection_opened(self) -> None:
        self.connections.inc()

    def connection_closed(self) -> None:
        self.connections.dec()

    def history_write_error(self) -> None:
        self.history_errors.inc()

    # --- a worker: DNS (resolver.DnsObserver) ---

    def cache_hit(self) -> None:
        with self._cache_hits_lock:
            self._cache_hits += 1

    def budget_refused(self) -> None:
        self.dns_errors("budget").inc()

    def answered(self, rdtype: dns.rdatatype.RdataType, answer: DnsAnswer, seconds: float) -> None:
        self.dns_cache("miss").inc()
        self.dns_queries(dns.rdatatype.to_text(rdtype), answer.status.value).inc()
        self.dns_seconds.observe(seconds)
        if answer.status is DnsStatus.TEMPFAIL:
            self.dns_errors("timeout" if answer.timed_out else "error").inc()

    def prefetch_unread(self) -> None:
        self.dns_prefetches_unread.inc()

    # --- the supervisor ---

    def worker_started(self) -> None:
        self.worker_starts.inc()

    def worker_exited(self, pid: int, stopped: bool) -> None:
        """Count a reaped worker and drop its live values (the connection gauge)."""
        from prometheus_client import multiprocess

        self.worker_exits("stopped" if stopped else "died").inc()
        multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def reload(self, outcome: str) -> None:
        """Count a reload: "succeeded", "refused" or "failed"."""
        self.reloads(outcome).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition of every process's values, and its Content-Type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """Remove the multiprocess directory (the daemon stops)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _results(verdict: Verdict) -> list[tuple[str, str]]:
    results = []
    if verdict.spf is not None:
        results.append(("spf", verdict.spf.result.value))
    if verdict.helo is not None:
        results.append(("helo", verdict.helo.result.value))
    if any(timing.check == "dkim" for timing in verdict.timings):  # DKIM was verified
        results.extend(("dkim", d.result.value) for d in verdict.dkim)
        if not verdict.dkim:
            results.append(("dkim", "none"))  # what the A-R says for an unsigned message
    if verdict.arc is not None:
        results.append(("arc", verdict.arc.result.value))
    if verdict.dmarc is not None:
        results.append(("dmarc", verdict.dmarc.result.value))
    return results


def enable(parent: str | None = None) -> Metrics:
    """Create the private multiprocess directory, point prometheus_client at it, build the metrics.

    Call before any worker forks (they inherit the environment and the metrics).

    Args:
        parent: where the directory goes; None: ``$RUNTIME_DIRECTORY`` (systemd's
            RuntimeDirectory=) if set, else the system's temporary directory.
    """
    parent = parent or os.environ.get("RUNTIME_DIRECTORY") or None
    directory = tempfile.mkdtemp(prefix="authmilter-metrics-", dir=parent)
    os.environ[MULTIPROCESS_ENV] = directory
    from prometheus_client import values

    # prometheus_client picks its value class from the environment when first imported; pick again
    # now, whatever imported it before.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return Metrics(directory)


# --- the HTTP endpoint -----------------------------------------------------------------------

# One request per connection, its head at most this long, within this many seconds; at most this
# many clients at once (a Prometheus server scrapes with one).
MAX_REQUEST_BYTES = 8192
CLIENT_TIMEOUT = 10.0
MAX_CLIENTS = 16
METRICS_PATHS = ("/metrics", "/")


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    response: memoryview | None = None  # set once the request is read: what is left to send


class MetricsEndpoint:
    """``GET /metrics`` served from a ``poll()`` loop without blocking it.

    Args:
        address: (host, port) to listen on (config.MetricsSettings.address).
        render: the exposition and its Content-Type (:meth:`Metrics.render`).
        clock: monotonic seconds.

    Raises:
        OSError: the address cannot be bound (in use, not local...).
    """

    def __init__(
        self,
        address: tuple[str, int],
        render: Callable[[], tuple[bytes, str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(MAX_CLIENTS)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._render = render
        self._clock = clock
        self._clients: dict[int, _Client] = {}
        self._poller: select.poll | None = None

    @property
    def port(self) -> int:
        """The port bound (useful when 0 was asked)."""
        return int(self._listener.getsockname()[1])

    def watch(self, poller: select.poll) -> None:
        """Have ``poller`` report the endpoint's sockets; then pass their events to :meth:`handle`."""
        self._poller = poller
        poller.register(self._listener.fileno(), select.POLLIN)

    def owns(self, fd: int) -> bool:
        return fd == self._listener.fileno() or fd in self._clients

    def deadline(self) -> float | None:
        """When the slowest client must be done (for the poll timeout); None without clients."""
        return min((c.deadline for c in self._clients.values()), default=None)

    def handle(self, fd: int) -> None:
        """Act on a poll event of one of the endpoint's sockets."""
        if fd == self._listener.fileno():
            self._accept()
            return
        client = self._clients.get(fd)
        if client is None:
            return
        try:
            if client.response is None:
                self._read(client)
            else:
                self._send(client)
        except OSError:
            self._drop(client)

    def expire(self, now: float) -> None:
        """Close the connections of clients past their deadline."""
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._drop(client)

    def close(self) -> None:
        """Close every socket (at the supervisor's stop, and in a worker after the fork)."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self._poller is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(self._listener.fileno())
        self._listener.close()

    def _accept(self) -> None:
        while len(self._clients) < MAX_CLIENTS:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors: the next poll reports the listener again
                log.warning("metrics endpoint: cannot accept a connection: %s", e.strerror)
                return
            sock.setblocking(False)
            client = _Client(sock, self._clock() + CLIENT_TIMEOUT)
            self._clients[sock.fileno()] = client
            if self._poller is not None:
                self._poller.register(sock.fileno(), select.POLLIN)

    def _read(self, client: _Client) -> None:
        chunk = client.sock.recv(MAX_REQUEST_BYTES)
        if not chunk:
            self._drop(client)
            return
        client.received += chunk
        head, blank, _ = bytes(client.received).partition(b"\r\n\r\n")
        if not blank and b"\n\n" not in client.received:
            if len(client.received) > MAX_REQUEST_BYTES:
                self._respond(client, 431, b"request head too long\n")
            return
        self._respond(client, *self._answer(head))

    def _answer(self, head: bytes) -> tuple[int, bytes, str]:
        request_line = head.split(b"\n", 1)[0].decode("latin-1").split()
        if len(request_line) < 2 or request_line[0] != "GET":
            return 405, b"only GET /metrics\n", "text/plain"
        if request_line[1].split("?", 1)[0] not in METRICS_PATHS:
            return 404, b"not found: the metrics are at /metrics\n", "text/plain"
        try:
            body, content_type = self._render()
        except Exception:  # a broken value file must not take the supervisor down
            log.exception("metrics endpoint: cannot render the metrics")
            return 500, b"cannot render the metrics; see the daemon's log\n", "text/plain"
        return 200, body, content_type

    def _respond(self, client: _Client, status: int, body: bytes, content_type: str = "text/plain") -> None:
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        client.response = memoryview(head.encode("ascii") + body)
        if self._poller is not None:
            self._poller.modify(client.sock.fileno(), select.POLLOUT)
        self._send(client)

    def _send(self, client: _Client) -> None:
        assert client.response is not None
        try:
            sent = client.sock.send(client.response)
        except BlockingIOError:
            return
        client.response = client.response[sent:]
        if not client.response:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        self._clients.pop(fd, None)
        if self._poller is not None and fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(fd)
        client.sock.close()

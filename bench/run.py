"""authmilter's benchmark (issues 3 and 11): messages/s end to end, milter CPU and latency per message.

    sudo .venv/bin/python bench/run.py [--compare] [--senders N] [--dns-delay MS] [--messages N] ...

Brings up the integration harness's private Postfix, the sink, Knot and a caching DNS proxy in front
of Knot (dnsproxy.py: every miss waits ``--dns-delay`` ms, repeats within the TTL are answered at once)
on loopback (see harness.py), then for each set-up sends the same DKIM-signed messages, one per
connection, from the client's own outside address (:data:`CLIENT_ADDRESS`, see :func:`main`):

- no milter (Postfix's own ceiling on this machine);
- authmilter (``authmilter run``, one worker per CPU), over a unix socket and over TCP;
- with ``--compare``: Debian's OpenDKIM (verify) chained with OpenDMARC (SPFSelfValidate), likewise;
- with ``--floor``: a pymilter milter that checks nothing (floor_milter.py), over the unix socket:
  what libmilter and pymilter cost by themselves, below authmilter's figures.

The default workload (workload.py, issue 11) has thousands of sender domains drawn Zipf-like, each
signing with its own selector record, of varied sizes; ``--senders 1`` sends everything from one
sender, as the benchmark did before. Every delivered message's Authentication-Results must match what
its sender's records give; a wrong result or a refused message fails the run. The proxy's cache is
emptied before each measurement, so every set-up meets the same cold names.

With ``--signing`` (issue 4; sign_bench.py) the set-ups are instead authmilter signing with RSA-2048,
OpenDKIM signing with the same key, and authmilter signing with RSA + Ed25519, over unix sockets,
for unsigned messages from an internal client address (127.0.0.1).

Each session sends its next message as soon as the last is done (full load), for the messages a
second and the CPU per message. Then the no-milter and unix set-ups run again with the messages
paced at each of ``--paced-rates`` a second (default 50 and 100), for the end-of-data wait: at full
load that wait is mostly queueing for a saturated machine's cores (see :func:`_paced`). Paced
messages arrive as a Poisson process, as from many independent senders, or evenly spaced
(``--arrivals``; load.arrival_offsets).

messages/s runs from the first connection until the sink holds every accepted message. Milter CPU
is the utime+stime of the milter's process tree (reaped children included) over that interval,
divided by the messages. Each figure is the median of the interleaved rounds, every round listed.
Then 20 concurrent sessions send 10 MB messages through authmilter while its tree's RSS is sampled
every 50 ms, and then one session sends one 200 MB message (issue 9: memory must not grow with the
message). Every run is bounded in messages and time and stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import _paths  # noqa: F401  (puts the harness on sys.path)
from floor_milter import FLOOR_FIELD
from harness import (
    AUTHSERV_ID,
    BenchAuthmilter,
    BenchPostfix,
    DnsProxy,
    FloorMilter,
    MilterAddress,
    SinkProcess,
    listen_port,
    machine_busy_seconds,
    opendkim,
    opendmarc,
    start_dns,
    tree_cpu_seconds,
    tree_rss_bytes,
)
from load import ARRIVALS, LoadResult, arrival_offsets, body_text, run_load, unsigned_messages, wire_form
from postfix import Client
from sign_bench import SigningKeys, make_keys, signing_setups
from workload import Sender, make_envelopes, make_senders, zipf_draws, zone_lines

from dnsserver import free_port
from signing import SigningKey, make_message, rsa_key, sign

DOMAIN = "bench.example"
SELECTOR = "bench"
MAIL_FROM = f"bob@{DOMAIN}"
WARM_UP_MESSAGES = 40
DISTINCT_MESSAGES = 300
DELIVERY_TIMEOUT = 180.0
RSS_SAMPLE_INTERVAL = 0.05
BIG_MESSAGE_BYTES = 10 * 1024 * 1024
LARGE_MESSAGE_MB = 200
# Distinct RSA-2048 keys behind the senders' selector records (generating one per domain takes minutes).
WORKLOAD_KEYS = 4
# Issue 11's targets (realistic workload, 10 sessions, unix; TCP at 60 sessions; one sender).
SPEED_TARGET = 1.15
CPU_TARGET = 0.85
P50_TARGET = 0.6
P90_TARGET = 0.8
COLD_CPU_TARGET = 1.0
ONE_SENDER_SPEED_TARGET = 1.25
ONE_SENDER_CPU_TARGET = 0.65
# Issue 4's: authmilter ÷ OpenDKIM signing with the same RSA key.
SIGNING_SPEED_TARGET = 1.0
SIGNING_CPU_TARGET = 1.0
RSS_TARGET_MB = 250.0
# Issue 9: one 200 MB message raises the peak over idle by at most body_memory_limit (1 MiB by
# default) + 32 MB; the whole tree (supervisor and workers) is measured, which can only add to it.
LARGE_RSS_GROWTH_TARGET_MB = 33.0
# The verification runs' client: an outside address (SPF runs) whose HELO name has an SPF record.
# It connects from that address (on the private network's loopback interface, see main), not with
# XCLIENT: after XCLIENT Postfix starts the session over and connects to every milter again, so each
# message would cost each milter a second connection that real traffic never brings (bench/README.md).
# Not a 127/8 address either: OpenDMARC's SPF (libspf2) passes loopback clients whatever the record.
CLIENT_ADDRESS = "203.0.113.5"
BENCH_CLIENT = Client(
    address=CLIENT_ADDRESS, name=f"mx.{DOMAIN}", helo=f"mx.{DOMAIN}", loopback=CLIENT_ADDRESS
)
# The signing run's client: inside both milters' internal hosts, so they sign (and do not verify).
INTERNAL_CLIENT = Client(
    address="127.0.0.1", name="localhost", helo="client.bench.example", loopback="127.0.0.1"
)
# Set in the benchmark's own process once it runs in its private network namespace.
PRIVATE_NETWORK = "AUTHMILTER_BENCH_PRIVATE_NETWORK"
PAIR = "opendkim+opendmarc"
FLOOR = "pymilter doing nothing"
# Messages a second offered in the paced set-ups: a light load for the pair on this machine (it
# carries 97-149 at full load in its slow phases) and a heavy one, near its limit there.
PACED_RATES = "50,100"
# A paced set-up that delivered under this share of the rate offered did not carry it: its waits
# are then partly queueing again, and the report says so.
CARRIED_SHARE = 0.95


class Pace(NamedTuple):
    """How a set-up's messages are offered: at full load (each session sends its next message at
    once), or at ``rate`` a second with ``arrivals`` (load.arrival_offsets)."""

    rate: float = 0.0
    arrivals: str = ""

    def label(self) -> str:
        return f"{self.rate:g}/s {self.arrivals}" if self.rate else "full"

    def described(self) -> str:
        return f"{self.rate:g} msg/s offered, {self.arrivals} arrivals" if self.rate else "full load"


FULL_LOAD = Pace()
# (set-up, transport, sessions, pace)
SetupKey = tuple[str, str, int, Pace]


class Milter(Protocol):
    @property
    def pids(self) -> list[int]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class WrongResults(Exception):
    """A delivered message's Authentication-Results differ from its sender's, or a message was refused."""


@dataclass(frozen=True)
class Measurement:
    setup: str
    transport: str
    sessions: int
    load: LoadResult
    seconds: float  # first connection until the sink holds every accepted message
    milter_cpu_seconds: float
    results_seen: str  # what the check of the delivered messages found
    machine_busy: float  # share of all cores busy meanwhile (Postfix, sink, client, milter, DNS)
    dns: dict[str, int] = field(default_factory=dict)  # the proxy's counts during the load
    # Messages sent first from their sender in the round: every DNS name they need is a cache miss.
    new_sender_numbers: frozenset[int] = frozenset()
    pace: Pace = FULL_LOAD

    @property
    def key(self) -> SetupKey:
        return self.setup, self.transport, self.sessions, self.pace

    @property
    def rate(self) -> float:
        return self.load.accepted / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        return self.milter_cpu_seconds * 1e3 / self.load.accepted if self.load.accepted else 0.0

    def latency_ms(self, q: float) -> float:
        return self.load.percentile(self.load.data_latencies, q) * 1e3

    def latency_by_sender_ms(self, q: float) -> tuple[float, float]:
        """The end-of-data wait at quantile ``q`` of the messages from a sender new in the round,
        and of the repeats."""
        new: list[float] = []
        repeat: list[float] = []
        for number, wait in zip(self.load.data_latency_numbers, self.load.data_latencies, strict=True):
            (new if number in self.new_sender_numbers else repeat).append(wait)
        return self.load.percentile(new, q) * 1e3, self.load.percentile(repeat, q) * 1e3

    def latency_by_sender_summary(self) -> str:
        new = len(self.new_sender_numbers & set(self.load.data_latency_numbers))
        (new_p50, repeat_p50), (new_p90, repeat_p90) = (self.latency_by_sender_ms(q) for q in (0.5, 0.9))
        return (
            f"end-of-data wait, first message of its sender ({new}): p50 {new_p50:.1f} ms, p90 "
            f"{new_p90:.1f} ms; repeats ({self.load.accepted - new}): p50 {repeat_p50:.1f} ms, "
            f"p90 {repeat_p90:.1f} ms"
        )


@dataclass
class Bench:
    """The running servers and the messages; one :meth:`measure` per set-up."""

    workdir: Path
    postfix: BenchPostfix
    sink: SinkProcess
    proxy: DnsProxy
    key: SigningKey
    messages: list[tuple[str, bytes]]  # (envelope sender, wire form), sent in this order, cycled
    warm_up: list[tuple[str, bytes]]
    count: int  # per measure(): per set-up and round
    client: Client = BENCH_CLIENT
    round_note: str = ""

    def measure(
        self,
        setup: str,
        transport: str,
        sessions: int,
        port: int,
        milters: Sequence[Milter],
        check: Callable[[SinkProcess], str],
        pace: Pace = FULL_LOAD,
    ) -> Measurement:
        """Warm up, empty the DNS proxy's cache, send the load, check it; its rate, CPU and latency.

        Raises:
            WrongResults: ``check`` found a wrong result, or a message was refused.
        """
        print(
            f"-- {setup} over {transport}: {self.count} messages, {sessions} sessions, "
            f"{pace.described()}{self.round_note}",
            flush=True,
        )
        with contextlib.ExitStack() as running:
            for milter in milters:
                milter.start()
                running.callback(milter.stop)
            pids = [pid for milter in milters for pid in milter.pids]
            # Warm-up from the one bench sender (not one of the workload's): workers spawned, their
            # connections to the resolver open; then every set-up starts from the same cold cache.
            self._send(port, self.warm_up, WARM_UP_MESSAGES, sessions)
            self.sink.clear()
            self.proxy.request("flush")
            cpu_before, machine_before = tree_cpu_seconds(pids), machine_busy_seconds()
            started = time.perf_counter()
            load = self._send(port, self.messages, self.count, sessions, pace)
            seconds = time.perf_counter() - started
            cpu = tree_cpu_seconds(pids) - cpu_before
            machine_after = machine_busy_seconds()
            dns = self.proxy.request("flush")
            busy = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
            seen = check(self.sink)
            self.sink.clear()
        new_senders = first_messages_of_senders(self.messages, self.count)
        measurement = Measurement(
            setup, transport, sessions, load, seconds, cpu, seen, busy, dns, new_senders, pace
        )
        summaries = (_line(measurement), load.latency_summary(), measurement.latency_by_sender_summary())
        print("".join(f"   {summary}\n" for summary in summaries), end="", flush=True)
        if load.refused:
            raise WrongResults(f"{setup} over {transport}: refused {dict(load.refused)}")
        return measurement

    def _send(
        self,
        port: int,
        messages: Sequence[tuple[str, bytes]],
        count: int,
        sessions: int,
        pace: Pace = FULL_LOAD,
    ) -> LoadResult:
        """Send and wait until the sink holds every accepted message."""
        before = self.sink.count()
        schedule = arrival_offsets(count, pace.rate, pace.arrivals) if pace.rate else []
        load = run_load(
            self.postfix.host,
            port,
            messages,
            sessions=sessions,
            count=count,
            client=self.client,
            schedule=schedule,
        )
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while self.sink.count() - before < load.accepted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.sink.count() - before} of {load.accepted} messages delivered")
            time.sleep(0.01)
        return load


def first_messages_of_senders(messages: Sequence[tuple[str, bytes]], count: int) -> frozenset[int]:
    """The numbers of the messages, of ``count`` sent cycling through ``messages``, that are the first
    from their envelope sender's domain (the workload's From domain)."""
    seen: set[str] = set()
    first: set[int] = set()
    for number in range(count):
        domain = messages[number % len(messages)][0].rpartition("@")[2].lower()
        if domain not in seen:
            seen.add(domain)
            first.add(number)
    return frozenset(first)


_UNFOLD = re.compile(rb"\r\n[ \t]+")
_FROM_DOMAIN = re.compile(rb"^from:[^\r\n]*@([A-Za-z0-9.-]+)", re.IGNORECASE | re.MULTILINE)
_RESULT = re.compile(r"(?:^|[\s;])(spf|dkim|dmarc)=([a-z]+)")


def reported_results(message: bytes) -> dict[str, str]:
    """method -> result, the first of each, in the A-R fields with our authserv-id (RFC 8601 §2.2)."""
    header = _UNFOLD.sub(b" ", message.partition(b"\r\n\r\n")[0])
    results: dict[str, str] = {}
    for line in header.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() != b"authentication-results":
            continue
        text = value.decode(errors="replace")
        if text.split(";", 1)[0].strip() != AUTHSERV_ID:
            continue
        for method, result in _RESULT.findall(text.split(";", 1)[1] if ";" in text else ""):
            results.setdefault(method, result)
    return results


# OpenDMARC 1.4.2 (SPFSelfValidate, libspf2) reports an SPF softfail as spf=fail (RFC 7208 §8.5 calls
# it softfail; the DMARC verdict is the same, since only pass counts for alignment). Accepted for the pair
# only, and counted.
PAIR_DEVIATIONS = {("spf", "softfail"): "fail"}


def check_every_message(
    expected: dict[str, dict[str, str]],
    sink: SinkProcess,
    deviations: dict[tuple[str, str], str] | None = None,
) -> str:
    """Every delivered message's spf/dkim/dmarc against its From domain's expected results.

    ``deviations`` maps (method, expected result) to a result also accepted (a known quirk).

    Raises:
        WrongResults: with the first few differences.
    """
    deviations = deviations or {}
    checked, wrong, outcomes = 0, [], Counter[str]()
    for message in sink.sample(sink.count()):
        found = _FROM_DOMAIN.search(message.partition(b"\r\n\r\n")[0])
        domain = found.group(1).decode().lower() if found else ""
        want = expected.get(domain)
        got = reported_results(message)
        checked += 1
        if want is None or any(
            got.get(method) not in (result, deviations.get((method, result)))
            for method, result in want.items()
        ):
            wrong.append(f"{domain or 'no From domain'}: expected {want}, got {got}")
            continue
        outcomes[" ".join(f"{m}={r}" for m, r in sorted(got.items()) if m in want)] += 1
    if wrong:
        raise WrongResults(
            f"{len(wrong)} of {checked} delivered messages wrong, e.g.:\n  " + "\n  ".join(wrong[:5])
        )
    return f"all {checked} as expected ({', '.join(f'{n} {o}' for o, n in outcomes.most_common())})"


def check_floor_field(sink: SinkProcess) -> str:
    """Every delivered message passed the floor milter: its header carries the field it adds.

    Raises:
        WrongResults: some do not.
    """
    field = ": ".join(FLOOR_FIELD).encode()
    messages = sink.sample(sink.count())
    missing = sum(1 for message in messages if field not in message.partition(b"\r\n\r\n")[0])
    if missing:
        raise WrongResults(f"{missing} of {len(messages)} delivered messages lack {field.decode()!r}")
    return f"all {len(messages)} carry the floor milter's field (it checks nothing)"


def delivered_count(sink: SinkProcess) -> str:
    return f"{sink.count()} delivered (no milter: nothing to check)"


def _line(m: Measurement) -> str:
    dns = m.dns
    return (
        f"{m.load.accepted} accepted in {m.seconds:.2f} s = {m.rate:.0f} msg/s; milter CPU "
        f"{m.cpu_ms_per_message:.2f} ms/msg; machine {m.machine_busy:.0%} busy; "
        f"client CPU {m.load.client_cpu_seconds / m.seconds:.0%} of a core; DNS proxy: "
        f"{dns.get('queries', 0)} queries ({dns.get('misses', 0)} misses, "
        f"{dns.get('dmarc_queries', 0)} _dmarc, {dns.get('TXT', 0)} TXT{_miss_times(dns)}); "
        f"results: {m.results_seen}{_late(m.load)}"
    )


def _late(load: LoadResult) -> str:
    return f"; started late (every session busy): {load.late_starts}" if load.late_starts else ""


def _miss_times(dns: dict[str, int]) -> str:
    """How long the proxy took to answer a miss (its delay, Knot, its own lag on a busy machine)."""
    if "miss_p50_us" not in dns:
        return ""
    p50, p90 = dns["miss_p50_us"] / 1e3, dns.get("miss_p90_us", 0) / 1e3
    return f"; a miss answered in p50 {p50:.1f} ms, p90 {p90:.1f} ms"


@dataclass(frozen=True)
class RssRun:
    """One peak-RSS run: authmilter's whole tree, idle before the load and at its peak (MB)."""

    what: str
    idle_mb: float
    peak_mb: float
    load: LoadResult


def peak_rss(
    bench: Bench,
    port: int,
    milter: BenchAuthmilter,
    sessions: int,
    rounds: int,
    size: int = BIG_MESSAGE_BYTES,
) -> RssRun:
    """Peak RSS of authmilter's tree while ``sessions`` connections each send ``rounds`` signed
    messages of ``size`` bytes."""
    megabytes = size // 2**20
    big = make_message(f"Bob <{MAIL_FROM}>", subject=f"{megabytes} megabytes", body=_big_body(size))
    payload = wire_form(sign(big, bench.key, DOMAIN, SELECTOR))
    del big
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(milter.pids))
            time.sleep(RSS_SAMPLE_INTERVAL)

    milter.start()
    try:
        idle = tree_rss_bytes(milter.pids)
        sampler = threading.Thread(target=sample, name="rss-sampler")
        sampler.start()
        try:
            load = run_load(
                bench.postfix.host,
                port,
                [(MAIL_FROM, payload)],
                sessions=sessions,
                count=sessions * rounds,
            )
        finally:
            stop.set()
            sampler.join()
    finally:
        milter.stop()
    run = RssRun(f"{sessions} sessions x {rounds} x {megabytes} MB", idle / 2**20, peak / 2**20, load)
    print(
        f"   idle RSS {run.idle_mb:.0f} MB, peak {run.peak_mb:.0f} MB; {load.accepted} accepted, "
        f"refused {dict(load.refused)}; {load.latency_summary()}",
        flush=True,
    )
    return run


def _big_body(size: int) -> str:
    line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n"
    return line * (size // len(line) + 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=3000, help="messages per set-up (default 3000)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of interleaved set-ups sharing the messages (default 3)"
    )
    parser.add_argument("--sessions", type=int, default=10, help="concurrent SMTP sessions (default 10)")
    parser.add_argument(
        "--tcp-sessions", default="10,60", help="sessions of the TCP set-ups, one set-up each (default 10,60)"
    )
    parser.add_argument(
        "--senders", type=int, default=3000, help="sender domains (default 3000; 1: one sender, as before)"
    )
    parser.add_argument(
        "--zipf", type=float, default=1.0, help="the Zipf exponent of the From domains (default 1)"
    )
    parser.add_argument("--cold", action="store_true", help="every message from a sender not seen before")
    parser.add_argument(
        "--dns-delay", type=float, default=20.0, help="ms each DNS cache miss waits (default 20)"
    )
    parser.add_argument("--compare", action="store_true", help="also OpenDKIM + OpenDMARC")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also a pymilter milter that checks nothing (floor_milter.py), over unix sockets",
    )
    parser.add_argument(
        "--paced-rates",
        default=PACED_RATES,
        help="then, each round, the unix set-ups again at each of these messages a second offered, "
        f"for the latency targets (default {PACED_RATES}; empty: none)",
    )
    parser.add_argument(
        "--arrivals",
        default=ARRIVALS[0],
        help=f"how the paced messages arrive: {' and/or '.join(ARRIVALS)}, separated by commas "
        f"(default {ARRIVALS[0]}: as from many independent senders; even: one every 1/rate seconds)",
    )
    parser.add_argument(
        "--prefetch-queries",
        type=int,
        help="authmilter's [dns] prefetch_queries (default: the config's default; 0: no prefetch)",
    )
    parser.add_argument(
        "--signing",
        action="store_true",
        help="the signing run instead: authmilter and OpenDKIM signing (unix)",
    )
    parser.add_argument("--transports", default="unix,tcp", help="unix,tcp (default both)")
    parser.add_argument("--workers", type=int, default=0, help="authmilter workers (default 0: one per CPU)")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 10 MB peak-RSS run")
    parser.add_argument("--rss-sessions", type=int, default=20)
    parser.add_argument("--rss-rounds", type=int, default=2, help="10 MB messages per session (default 2)")
    parser.add_argument(
        "--rss-large-mb",
        type=int,
        default=LARGE_MESSAGE_MB,
        help=f"then one message of this many MB, one session (default {LARGE_MESSAGE_MB}; 0: skip)",
    )
    parser.add_argument("--rss-only", action="store_true", help="only the peak-RSS runs, no throughput")
    parser.add_argument("--log-level", default="warning", help="authmilter's log level (default warning)")
    parser.add_argument("--queue-dir", default="", help="folder for Postfix's queue (e.g. /dev/shm)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return parser


def prefetch_setting(args: argparse.Namespace) -> str:
    """The ``[dns]`` line of ``--prefetch-queries``, or "" for the default."""
    return "" if args.prefetch_queries is None else f"prefetch_queries = {args.prefetch_queries}\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    args.transports = [t for t in args.transports.split(",") if t]
    if any(t not in ("unix", "tcp") for t in args.transports):
        parser.error("--transports takes unix and/or tcp")
    try:
        args.tcp_sessions = [int(n) for n in args.tcp_sessions.split(",") if n]
    except ValueError:
        parser.error("--tcp-sessions takes session counts separated by commas, e.g. 10,60")
    if args.messages < 1 or args.sessions < 1 or args.rounds < 1 or args.senders < 1:
        parser.error("--messages, --sessions, --rounds and --senders must be at least 1")
    if any(n < 1 for n in args.tcp_sessions) or not args.tcp_sessions:
        parser.error("--tcp-sessions must name at least one count, each at least 1")
    if args.cold and args.senders < -(-args.messages // args.rounds):
        parser.error("--cold needs at least as many --senders as messages per round")
    if not 0 <= args.dns_delay <= 1000:
        parser.error("--dns-delay takes 0 to 1000 ms")
    try:
        args.paced_rates = [float(n) for n in args.paced_rates.split(",") if n]
    except ValueError:
        parser.error("--paced-rates takes messages a second separated by commas, e.g. 50,100")
    if any(rate <= 0 for rate in args.paced_rates):
        parser.error("--paced-rates must each be over 0 (leave it empty for no paced set-ups)")
    args.arrivals = [a for a in args.arrivals.split(",") if a]
    if not args.arrivals or any(a not in ARRIVALS for a in args.arrivals):
        parser.error(f"--arrivals takes {' and/or '.join(ARRIVALS)}, separated by commas")
    if args.signing:
        args.skip_rss = True
    if args.rss_only and args.skip_rss:
        parser.error("--rss-only measures what --skip-rss (and --signing) leave out")
    return args


def _verdict(name: str, value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    relation = ">=" if at_least else "<="
    return f"  {name}: {value:.2f} (target {relation} {target}) {'MET' if met else 'NOT MET'}"


@dataclass(frozen=True)
class Medians:
    """One set-up over the rounds: the median of each figure, and the rounds themselves."""

    rounds: list[Measurement]

    def median(self, figure: Callable[[Measurement], float]) -> float:
        return statistics.median(figure(m) for m in self.rounds)

    @property
    def rate(self) -> float:
        return self.median(lambda m: m.rate)

    @property
    def cpu(self) -> float:
        return self.median(lambda m: m.cpu_ms_per_message)

    def latency(self, q: float) -> float:
        return self.median(lambda m: m.latency_ms(q))

    def latency_by_sender(self, q: float) -> tuple[float, float]:
        return (
            self.median(lambda m: m.latency_by_sender_ms(q)[0]),
            self.median(lambda m: m.latency_by_sender_ms(q)[1]),
        )


def _row(m: Measurement | Medians, ceiling: float) -> str:
    if isinstance(m, Medians):
        rate, cpu, p50, p90, p99 = m.rate, m.cpu, m.latency(0.5), m.latency(0.9), m.latency(0.99)
    else:
        rate, cpu = m.rate, m.cpu_ms_per_message
        p50, p90, p99 = m.latency_ms(0.5), m.latency_ms(0.9), m.latency_ms(0.99)
    share = f"{rate / ceiling:.0%}" if ceiling else "-"
    return f"{rate:>8.0f}{share:>9}{cpu:>10.2f}{p50:>9.1f}{p90:>9.1f}{p99:>9.1f}"


# The columns that name a set-up, above _setup_columns' values.
SETUP_HEADER = f"{'set-up':<28}{'transport':<10}{'sess':>5}{'load':>14}"


def _setup_columns(key: SetupKey) -> str:
    setup, transport, sessions, pace = key
    return f"{setup:<28}{transport:<10}{sessions:>5}{pace.label():>14}"


def report(rounds: list[list[Measurement]], rss_runs: Sequence[RssRun], args: argparse.Namespace) -> None:
    by_key = {same[0].key: Medians(list(same)) for same in zip(*rounds, strict=True)} if rounds else {}
    ceilings = {key[2:]: m.rate for key, m in by_key.items() if key[0] == "no milter"}
    header = f"{SETUP_HEADER}{'msg/s':>8}{'ceiling':>9}{'CPU ms':>10}"
    header += f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    if by_key:
        print(
            f"\n== medians of {len(rounds)} interleaved rounds "
            "(load: full, or messages a second offered and how they arrive) =="
        )
        print(header)
        for key, medians in by_key.items():
            print(f"{_setup_columns(key)}{_row(medians, ceilings.get(key[2:], 0.0))}")
        print(f"\n== every round ==\n{'round':<6}{header}")
        for number, measured in enumerate(rounds, 1):
            ceiling = {m.key[2:]: m.rate for m in measured if m.setup == "no milter"}
            for m in measured:
                print(f"{number:<6}{_setup_columns(m.key)}{_row(m, ceiling.get(m.key[2:], 0.0))}")
        _latency_by_sender(by_key)
    _comparison(by_key, args)
    _signing_verdicts(by_key)
    for number, run in enumerate(rss_runs):
        if number == 0:
            print(_verdict(f"authmilter peak RSS (MB), {run.what}", run.peak_mb, RSS_TARGET_MB, False))
        else:
            what = f"authmilter peak RSS over idle (MB), {run.what}"
            growth = run.peak_mb - run.idle_mb
            print(_verdict(what, growth, LARGE_RSS_GROWTH_TARGET_MB, at_least=False))


def _latency_by_sender(by_key: dict[SetupKey, Medians]) -> None:
    """The end-of-data wait split: a sender's first message in the round needs every DNS name
    (waiting for misses), its repeats find the milters' caches warm; each half's own quantiles."""
    columns = "".join(f"{name:>9}" for name in ("new p50", "new p90", "rep p50", "rep p90"))
    print("\n== end-of-data wait by sender, medians: first message of its sender in the round / repeats ==")
    print(f"{SETUP_HEADER}{columns}")
    for key, medians in by_key.items():
        (new_p50, repeat_p50), (new_p90, repeat_p90) = (medians.latency_by_sender(q) for q in (0.5, 0.9))
        print(f"{_setup_columns(key)}{new_p50:>9.1f}{new_p90:>9.1f}{repeat_p50:>9.1f}{repeat_p90:>9.1f}")


def _comparison(by_key: dict[SetupKey, Medians], args: argparse.Namespace) -> None:
    """authmilter ÷ OpenDKIM+OpenDMARC per transport, session count and load, medians; issue 11's
    targets: throughput and CPU at full load, the end-of-data wait at the paced rate (see _paced)."""
    pairs = [
        (key, by_key[key], by_key[(PAIR, *key[1:])])
        for key in by_key
        if key[0] == "authmilter" and (PAIR, *key[1:]) in by_key
    ]
    if not pairs:
        return
    workload = "one sender" if args.senders == 1 else "cold senders only" if args.cold else "realistic"
    print(f"\n== authmilter / OpenDKIM+OpenDMARC, medians ({workload}, DNS miss {args.dns_delay:g} ms) ==")
    for (_, transport, sessions, pace), ours, theirs in pairs:
        ratios = [ours.rate / theirs.rate, ours.cpu / theirs.cpu]
        ratios += [ours.latency(q) / theirs.latency(q) for q in (0.5, 0.9, 0.99)]
        print(
            f"  {transport} {sessions} sessions, {pace.described()}: msg/s {ratios[0]:.2f}x, "
            f"CPU/msg {ratios[1]:.2f}x, p50 {ratios[2]:.2f}x, p90 {ratios[3]:.2f}x, p99 {ratios[4]:.2f}x"
        )
    print("== targets (issue 11) ==")

    def compared(transport: str, sessions: int, pace: Pace) -> tuple[Medians, Medians] | None:
        return next(((o, t) for k, o, t in pairs if k[1:] == (transport, sessions, pace)), None)

    unix, tcp60 = compared("unix", args.sessions, FULL_LOAD), compared("tcp", 60, FULL_LOAD)
    if args.senders == 1 and unix:
        print(_verdict("one sender, unix: msg/s", unix[0].rate / unix[1].rate, ONE_SENDER_SPEED_TARGET, True))
        print(_verdict("one sender, unix: CPU/msg", unix[0].cpu / unix[1].cpu, ONE_SENDER_CPU_TARGET, False))
    elif args.cold and unix:
        print(_verdict("cold senders, unix: CPU/msg", unix[0].cpu / unix[1].cpu, COLD_CPU_TARGET, False))
    elif unix:
        ours, theirs = unix
        print(_verdict("unix: msg/s", ours.rate / theirs.rate, SPEED_TARGET, True))
        print(_verdict("unix: CPU/msg", ours.cpu / theirs.cpu, CPU_TARGET, False))
        for pace in paces(args) or [FULL_LOAD]:
            _latency_verdicts(compared("unix", args.sessions, pace), pace)
    if tcp60 and args.senders > 1 and not args.cold:
        print(_verdict("tcp 60 sessions: msg/s", tcp60[0].rate / tcp60[1].rate, SPEED_TARGET, True))


def _latency_verdicts(compared: tuple[Medians, Medians] | None, pace: Pace) -> None:
    """Issue 11's end-of-data targets at one pace, and whether each side carried its rate."""
    if compared is None:
        return
    ours, theirs = compared
    load = f"at {pace.described()}"
    for q, target in ((0.5, P50_TARGET), (0.9, P90_TARGET)):
        ratio = ours.latency(q) / theirs.latency(q)
        print(_verdict(f"unix {load}: end-of-data p{q * 100:.0f}", ratio, target, False))
    for name, medians in (("authmilter", ours), (PAIR, theirs)):
        if pace.rate and medians.rate < CARRIED_SHARE * pace.rate:
            print(
                f"  ({name} carried {medians.rate:.0f} msg/s of the {pace.rate:g} offered: "
                "its waits include queueing)"
            )


def _signing_verdicts(by_key: dict[SetupKey, Medians]) -> None:
    found = {key[0]: m for key, m in by_key.items() if key[1] == "unix"}
    ours, theirs = found.get("authmilter sign RSA"), found.get("opendkim sign RSA")
    if ours is None or theirs is None or not theirs.rate or not theirs.cpu:
        return
    print("\n== targets (issue 4, signing with the same RSA-2048 key, unix) ==")
    print(
        _verdict("msg/s authmilter / OpenDKIM", ours.rate / theirs.rate, SIGNING_SPEED_TARGET, at_least=True)
    )
    print(_verdict("milter CPU/msg authmilter / OpenDKIM", ours.cpu / theirs.cpu, SIGNING_CPU_TARGET, False))
    dual = found.get("authmilter sign RSA+Ed25519")
    if dual is not None and ours.rate and ours.cpu:
        print(
            f"  RSA+Ed25519 dual / RSA only (authmilter): msg/s {dual.rate / ours.rate:.2f}, "
            f"CPU/msg {dual.cpu / ours.cpu:.2f}; "
            f"dual / OpenDKIM RSA: msg/s {dual.rate / theirs.rate:.2f}, CPU/msg {dual.cpu / theirs.cpu:.2f}"
        )
    for setup, m in found.items():
        if setup.endswith(("RSA", "Ed25519")):
            print(f"  signatures, {setup}: {m.rounds[-1].results_seen}")


def _workload(
    args: argparse.Namespace, key: SigningKey, per_round: int
) -> tuple[list[tuple[str, bytes]], dict[str, dict[str, str]], str]:
    """The messages of a round, the expected results per From domain, and the zone lines they need."""
    rng = random.Random(11)
    if args.senders == 1:
        sender = Sender(0, "reject", DOMAIN, SELECTOR, 0, {"spf": "pass", "dkim": "pass", "dmarc": "pass"})
        senders, keys, draws = [sender], [key], [0] * per_round
    else:
        print(
            f"generating {WORKLOAD_KEYS} keys and {per_round} messages from {args.senders} senders",
            flush=True,
        )
        senders, keys = (
            make_senders(args.senders, WORKLOAD_KEYS),
            [rsa_key(2048) for _ in range(WORKLOAD_KEYS)],
        )
        draws = list(range(per_round)) if args.cold else zipf_draws(per_round, args.senders, args.zipf, rng)
    envelopes = make_envelopes(draws, senders, keys, rng)
    kinds = Counter(envelope.sender.kind for envelope in envelopes)
    print(
        f"workload: {per_round} messages per round from {len(set(draws))} distinct senders "
        f"({', '.join(f'{n} {kind}' for kind, n in kinds.most_common())}), "
        f"{statistics.mean(len(e.payload) for e in envelopes) / 1024:.1f} KB mean size",
        flush=True,
    )
    expected = {sender.domain: sender.expected for sender in senders}
    records = "" if args.senders == 1 else zone_lines(senders, keys, BENCH_CLIENT.address)
    return [(e.mail_from, e.payload) for e in envelopes], expected, records


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get(PRIVATE_NETWORK) != "1":
        return _in_private_network(sys.argv[1:] if argv is None else list(argv))
    _bring_up_private_network()
    if args.queue_dir:
        # PostfixInstance makes its ROOT (queue included) under the default temporary folder.
        tempfile.tempdir = args.queue_dir
    workdir = Path(tempfile.mkdtemp(prefix="authmilter-bench-"))
    workdir.chmod(0o755)
    print(f"work directory {workdir}", flush=True)
    rounds: list[list[Measurement]] = []
    rss_runs: list[RssRun] = []
    try:
        with contextlib.ExitStack() as servers:
            key = rsa_key(2048)
            per_round = -(-args.messages // args.rounds)
            signing_keys = make_keys(workdir / "keys", DOMAIN) if args.signing else None
            extra_records = signing_keys.zone_lines(DOMAIN) if signing_keys else ""
            if args.signing:
                messages = [
                    (MAIL_FROM, p)
                    for p in unsigned_messages(
                        min(args.messages, DISTINCT_MESSAGES), DOMAIN, (5 * 1024, 10 * 1024)
                    )
                ]
                expected: dict[str, dict[str, str]] = {}
                parent_records = ""
            else:
                messages, expected, parent_records = _workload(args, key, per_round)
            dns = start_dns(
                workdir / "dns", DOMAIN, BENCH_CLIENT.address, key, SELECTOR, extra_records, parent_records
            )
            servers.callback(dns.stop)
            proxy = DnsProxy(workdir / "dnsproxy", args.dns_delay)
            proxy.start()
            servers.callback(proxy.stop)
            sink = SinkProcess(workdir / "sink", free_port("127.0.0.1"), workdir / "sink.log")
            sink.start()
            servers.callback(sink.stop)
            postfix, plans = _postfix(workdir, sink.port, args, signing_keys, expected)
            servers.callback(postfix.remove)
            servers.callback(postfix.stop)  # first: the stack unwinds last in, first out
            postfix.start()
            warm_up = messages if args.signing else _one_sender_messages(key)
            client = INTERNAL_CLIENT if args.signing else BENCH_CLIENT
            bench = Bench(workdir, postfix, sink, proxy, key, messages, warm_up, per_round, client)
            # Rounds interleave the set-ups, so a machine that speeds up or slows down during the
            # run (shared hosts do) moves every set-up alike and the ratios stay fair.
            for number in range(1, 0 if args.rss_only else args.rounds + 1):
                bench.round_note = f" (round {number} of {args.rounds})" if args.rounds > 1 else ""
                rounds.append(
                    [
                        bench.measure(p.setup, p.transport, p.sessions, p.port, p.milters(), p.check, p.pace)
                        for p in plans
                    ]
                )
            if not args.skip_rss:
                rss_runs = _rss_runs(bench, postfix, args)
    except WrongResults as e:
        print(f"\nFAILED: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(rounds, rss_runs, args)
    return 0


def _in_private_network(argv: Sequence[str]) -> int:
    """Run this benchmark again, with the same options, in a network namespace of its own
    (``unshare --net``): every server and client it starts lives there, on a loopback interface
    nothing else shares, which can carry the client's outside address without touching the
    machine's network."""
    if os.geteuid() != 0:
        print(
            "bench/run.py needs root: it runs in a network namespace of its own (unshare --net) and "
            "starts Postfix and the Debian milters; run it with sudo",
            file=sys.stderr,
        )
        return 2
    command = ["unshare", "--net", "--", sys.executable, str(Path(__file__).resolve()), *argv]
    return subprocess.run(command, env={**os.environ, PRIVATE_NETWORK: "1"}, check=False).returncode


def _bring_up_private_network() -> None:
    """The namespace's loopback interface up, with the client's address on it as well as 127/8."""
    for command in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "address", "add", f"{CLIENT_ADDRESS}/32", "dev", "lo"],
    ):
        subprocess.run(command, check=True)


def _one_sender_messages(key: SigningKey) -> list[tuple[str, bytes]]:
    """A few messages from bob@bench.example (warm-up and the RSS runs: not the workload's senders)."""
    rng = random.Random(3)
    return [
        (
            MAIL_FROM,
            wire_form(
                sign(
                    make_message(f"Bob <{MAIL_FROM}>", subject=f"Warm-up {n}", body=body),
                    key,
                    DOMAIN,
                    SELECTOR,
                )
            ),
        )
        for n, body in enumerate(body_text(6 * 1024, rng) for _ in range(8))
    ]


def _rss_runs(bench: Bench, postfix: BenchPostfix, args: argparse.Namespace) -> list[RssRun]:
    """The 10 MB peak-RSS run, then one message of ``--rss-large-mb``, each on a fresh authmilter."""
    address = MilterAddress(path=bench.workdir / "sockets" / "authmilter-rss.sock")
    port = next(p for p, m in postfix.milter_ports.items() if m.endswith("authmilter-rss.sock"))
    plan = [(args.rss_sessions, args.rss_rounds, BIG_MESSAGE_BYTES)]
    if args.rss_large_mb > 0:
        plan.append((1, 1, args.rss_large_mb * 2**20))
    runs = []
    for number, (sessions, rounds, size) in enumerate(plan):
        print(f"-- authmilter peak RSS: {sessions} sessions x {rounds} x {size // 2**20} MB", flush=True)
        milter = BenchAuthmilter(bench.workdir / f"authmilter-rss-{number}", address, args.workers)
        runs.append(peak_rss(bench, port, milter, sessions, rounds, size))
    return runs


class Plan(NamedTuple):
    """One set-up to measure: its name, milter transport, SMTP sessions, smtpd port, milters, check,
    and how its messages are offered."""

    setup: str
    transport: str
    sessions: int
    port: int
    milters: Callable[[], Sequence[Milter]]
    check: Callable[[SinkProcess], str]
    pace: Pace = FULL_LOAD


def _postfix(
    workdir: Path,
    sink_port: int,
    args: argparse.Namespace,
    signing_keys: SigningKeys | None,
    expected: dict[str, dict[str, str]],
) -> tuple[BenchPostfix, list[Plan]]:
    """The Postfix instance with one smtpd port per set-up, and the set-ups to run in order."""
    postfix = BenchPostfix(
        workdir / "postfix-log",
        sink_port=sink_port,
        smtp_port=free_port("127.0.0.1"),
        bare_smtp_port=free_port("127.0.0.1"),
    )
    sockets = workdir / "sockets"
    sockets.mkdir(mode=0o755)
    sockets.chmod(0o1777)
    ceiling = [Plan("no milter", "-", args.sessions, postfix.bare_smtp_port, list, delivered_count)]
    if signing_keys is not None:
        signers = signing_setups(
            postfix.milter_ports, sockets, workdir, signing_keys, args.workers, args.log_level
        )
        return postfix, ceiling + [Plan(s, t, args.sessions, p, m, c) for s, t, p, m, c in signers]
    check = functools.partial(check_every_message, expected)
    plans: list[Plan] = []

    def address(name: str, transport: str) -> MilterAddress:
        if transport == "unix":
            return MilterAddress(path=sockets / f"{name}-{transport}.sock")
        return MilterAddress(port=listen_port())

    for transport in args.transports:
        ours = address("authmilter", transport)
        ours_port = free_port("127.0.0.1")
        postfix.milter_ports[ours_port] = ours.postfix
        # Over TCP a plain libmilter milter waits on the MTA's delayed ACKs, as the pair does and
        # authmilter does not (supervisor.py, quickack.py): that is no floor for authmilter there.
        floor = args.floor and transport == "unix"
        if floor:
            floor_address, floor_port = address("floor", transport), free_port("127.0.0.1")
            postfix.milter_ports[floor_port] = floor_address.postfix
        if args.compare:
            dkim_address, dmarc_address = address("opendkim", transport), address("opendmarc", transport)
            pair_port = free_port("127.0.0.1")
            postfix.milter_ports[pair_port] = f"{dkim_address.postfix},{dmarc_address.postfix}"
        for sessions in [args.sessions] if transport == "unix" else args.tcp_sessions:
            plans.append(
                Plan(
                    "authmilter",
                    transport,
                    sessions,
                    ours_port,
                    lambda a=ours, t=transport: [
                        BenchAuthmilter(
                            workdir / f"authmilter-{t}",
                            a,
                            args.workers,
                            args.log_level,
                            prefetch_setting(args),
                        )
                    ],
                    check,
                )
            )
            if floor:
                plans.append(
                    Plan(
                        FLOOR,
                        transport,
                        sessions,
                        floor_port,
                        lambda a=floor_address, t=transport: [FloorMilter(workdir / f"floor-{t}", a)],
                        check_floor_field,
                    )
                )
            if args.compare:
                plans.append(
                    Plan(
                        PAIR,
                        transport,
                        sessions,
                        pair_port,
                        lambda d=dkim_address, m=dmarc_address, t=transport: [
                            opendkim(workdir / f"opendkim-{t}", d),
                            opendmarc(workdir / f"opendmarc-{t}", m),
                        ],
                        functools.partial(check_every_message, expected, deviations=PAIR_DEVIATIONS),
                    )
                )
    rss = MilterAddress(path=sockets / "authmilter-rss.sock")
    postfix.milter_ports[free_port("127.0.0.1")] = rss.postfix
    sessions_measured = sorted({plan.sessions for plan in plans})
    ceilings = [ceiling[0]._replace(sessions=n) for n in sessions_measured]
    return postfix, ceilings + plans + _paced(ceilings + plans, args)


def paces(args: argparse.Namespace) -> list[Pace]:
    """Each of ``--paced-rates`` with each of ``--arrivals``."""
    return [Pace(rate, arrivals) for rate in args.paced_rates for arrivals in args.arrivals]


def _paced(plans: list[Plan], args: argparse.Namespace) -> list[Plan]:
    """The no-milter and unix set-ups at ``--sessions`` again, at each of ``--paced-rates`` messages a
    second, arriving as ``--arrivals`` says.

    At full load the sessions never rest, so the machine is always saturated and a message's
    end-of-data wait is mostly its turn for a core: a milter that waits less on DNS leaves more
    messages competing for the cores at once, and its median wait can rise as its rate does
    (bench/README.md). At a rate both milters carry, the wait is what the milter itself adds: its
    work and its DNS round trips.
    """
    return [
        plan._replace(pace=pace)
        for pace in paces(args)
        for plan in plans
        if plan.transport in ("-", "unix") and plan.sessions == args.sessions
    ]


if __name__ == "__main__":
    sys.exit(main())

"""authmilter's benchmark (issue 3): messages/s end to end and milter CPU per message, in one run.

    sudo .venv/bin/python bench/run.py [--compare] [--messages N] [--sessions N] [--skip-rss] [--rss-only]

Brings up the integration harness's private Postfix, the sink and Knot on loopback (see harness.py),
then for each set-up sends the same DKIM-signed 5-10 KB messages, one per connection with XCLIENT:

- no milter (Postfix's own ceiling on this machine);
- authmilter (``authmilter run``, one worker per CPU), over a unix socket and over TCP;
- with ``--compare``: Debian's OpenDKIM (verify) chained with OpenDMARC (SPFSelfValidate), likewise.

With ``--signing`` (issue 4; sign_bench.py) the set-ups are instead authmilter signing with RSA-2048,
OpenDKIM signing with the same key, and authmilter signing with RSA + Ed25519, over unix sockets,
for unsigned messages from an internal client address (XCLIENT ADDR=127.0.0.1).

messages/s runs from the first connection until the sink holds every accepted message. Milter CPU
is the utime+stime of the milter's process tree (reaped children included) over that interval,
divided by the messages. Then 20 concurrent sessions send 10 MB messages through authmilter while
its tree's RSS is sampled every 50 ms, and then one session sends one 200 MB message (issue 9: memory
must not grow with the message). Every run is bounded in messages and time and stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import _paths  # noqa: F401  (puts the harness on sys.path)
from harness import (
    AUTHSERV_ID,
    BenchAuthmilter,
    BenchPostfix,
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
from load import LoadResult, run_load, signed_messages, unsigned_messages, wire_form
from postfix import SENDING_CLIENT, Client
from sign_bench import SigningKeys, make_keys, signing_setups

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
# Issue 3's targets.
UNIX_SPEED_TARGET = 1.15
TCP_SPEED_TARGET = 4.0
CPU_TARGET = 0.75
# Issue 4's: authmilter ÷ OpenDKIM signing with the same RSA key.
SIGNING_SPEED_TARGET = 1.0
SIGNING_CPU_TARGET = 1.0
RSS_TARGET_MB = 250.0
# Issue 9: one 200 MB message raises the peak over idle by at most body_memory_limit (1 MiB by
# default) + 32 MB; the whole tree (supervisor and workers) is measured, which can only add to it.
LARGE_RSS_GROWTH_TARGET_MB = 33.0
# The signing run's client: inside both milters' internal hosts, so they sign (and do not verify).
INTERNAL_CLIENT = Client(address="127.0.0.1", name="localhost", helo="client.bench.example")


class Milter(Protocol):
    @property
    def pids(self) -> list[int]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Measurement:
    setup: str
    transport: str
    load: LoadResult
    seconds: float  # first connection until the sink holds every accepted message
    milter_cpu_seconds: float
    results_seen: str  # which of spf/dkim/dmarc = pass a delivered message carries
    machine_busy: float  # share of all cores busy meanwhile (Postfix, sink, client, milter, DNS)

    def merged(self, other: Measurement) -> Measurement:
        """Two rounds of the same set-up as one: totals, so the rate is messages over seconds."""
        busy_seconds = self.machine_busy * self.seconds + other.machine_busy * other.seconds
        seconds = self.seconds + other.seconds
        return Measurement(
            self.setup,
            self.transport,
            self.load.merged(other.load),
            seconds,
            self.milter_cpu_seconds + other.milter_cpu_seconds,
            self.results_seen if self.results_seen == other.results_seen else "differs between rounds",
            busy_seconds / seconds if seconds else 0.0,
        )

    @property
    def rate(self) -> float:
        return self.load.accepted / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        return self.milter_cpu_seconds * 1e3 / self.load.accepted if self.load.accepted else 0.0


@dataclass
class Bench:
    """The running servers and the messages; one :meth:`measure` per set-up."""

    workdir: Path
    postfix: BenchPostfix
    sink: SinkProcess
    key: SigningKey
    payloads: list[bytes]
    sessions: int
    messages: int  # per measure(): per set-up and round
    client: Client = SENDING_CLIENT
    round_note: str = ""

    def measure(
        self,
        setup: str,
        transport: str,
        port: int,
        milters: Sequence[Milter],
        check: Callable[[SinkProcess], str] | None = None,
    ) -> Measurement:
        """Warm up, send the load, and return its rate and milter CPU.

        ``check`` says what the delivered messages show (default: which A-R results pass).
        """
        what = f"{self.messages} messages, {self.sessions} sessions{self.round_note}"
        print(f"-- {setup} over {transport}: {what}", flush=True)
        with contextlib.ExitStack() as running:
            for milter in milters:
                milter.start()
                running.callback(milter.stop)
            pids = [pid for milter in milters for pid in milter.pids]
            # Warm-up: workers spawned, DNS answers cached where the milter caches.
            self._send(port, WARM_UP_MESSAGES, self.sessions)
            self.sink.clear()
            cpu_before, machine_before = tree_cpu_seconds(pids), machine_busy_seconds()
            started = time.perf_counter()
            load = self._send(port, self.messages, self.sessions)
            seconds = time.perf_counter() - started
            cpu = tree_cpu_seconds(pids) - cpu_before
            machine_after = machine_busy_seconds()
            busy = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
            seen = check(self.sink) if check else _results_seen(self.sink.any_message())
            self.sink.clear()
        measurement = Measurement(setup, transport, load, seconds, cpu, seen, busy)
        print(f"   {_line(measurement)}\n   {load.latency_summary()}", flush=True)
        return measurement

    def _send(self, port: int, count: int, sessions: int) -> LoadResult:
        """Send and wait until the sink holds every accepted message."""
        before = self.sink.count()
        load = run_load(
            self.postfix.host,
            port,
            self.payloads,
            mail_from=MAIL_FROM,
            sessions=sessions,
            count=count,
            client=self.client,
        )
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while self.sink.count() - before < load.accepted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.sink.count() - before} of {load.accepted} messages delivered")
            time.sleep(0.01)
        return load


def _results_seen(message: bytes) -> str:
    """The passing methods in the A-R fields with our authserv-id (proves the milters did the job)."""
    header = message.partition(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    fields = [
        line
        for line in header.split(b"\r\n")
        if line.lower().startswith(b"authentication-results:") and AUTHSERV_ID.encode() in line
    ]
    text = b" ".join(fields).decode(errors="replace")
    return " ".join(f"{m}=pass" for m in ("spf", "dkim", "dmarc") if f"{m}=pass" in text) or "none"


def _line(m: Measurement) -> str:
    refused = f", refused {dict(m.load.refused)}" if m.load.refused else ""
    return (
        f"{m.load.accepted} accepted in {m.seconds:.2f} s = {m.rate:.0f} msg/s; milter CPU "
        f"{m.cpu_ms_per_message:.2f} ms/msg; machine {m.machine_busy:.0%} busy; "
        f"client CPU {m.load.client_cpu_seconds / m.seconds:.0%} of a core; "
        f"results: {m.results_seen}{refused}"
    )


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
                [payload],
                mail_from=MAIL_FROM,
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
    parser.add_argument("--compare", action="store_true", help="also OpenDKIM + OpenDMARC")
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    args.transports = [t for t in args.transports.split(",") if t]
    if any(t not in ("unix", "tcp") for t in args.transports):
        parser.error("--transports takes unix and/or tcp")
    if args.messages < 1 or args.sessions < 1 or args.rounds < 1:
        parser.error("--messages, --sessions and --rounds must be at least 1")
    if args.signing:
        args.skip_rss = True
    if args.rss_only and args.skip_rss:
        parser.error("--rss-only measures what --skip-rss (and --signing) leave out")
    return args


def _verdict(name: str, value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    relation = ">=" if at_least else "<="
    return f"  {name}: {value:.2f} (target {relation} {target}) {'MET' if met else 'NOT MET'}"


def report(results: list[Measurement], rss_runs: Sequence[RssRun]) -> None:
    by_key = {(m.setup, m.transport): m for m in results}
    ceiling = by_key.get(("no milter", "-"))
    print("\n== results ==")
    print(
        f"{'set-up':<28}{'transport':<10}{'msg/s':>8}{'of ceiling':>12}{'milter CPU ms/msg':>20}"
        f"{'end-of-data p50/p90 ms':>25}"
    )
    for m in results:
        share = f"{m.rate / ceiling.rate:.0%}" if ceiling and ceiling.rate else "-"
        latency = (
            f"{m.load.percentile(m.load.data_latencies, 0.5) * 1e3:.1f}/"
            f"{m.load.percentile(m.load.data_latencies, 0.9) * 1e3:.1f}"
        )
        cpu = f"{m.cpu_ms_per_message:.2f}" if m.setup != "no milter" else "-"
        print(f"{m.setup:<28}{m.transport:<10}{m.rate:>8.0f}{share:>12}{cpu:>20}{latency:>25}")
    if any(m.setup == "opendkim+opendmarc" for m in results):
        print("\n== targets (issue 3) ==")
    for transport, speed_target in (("unix", UNIX_SPEED_TARGET), ("tcp", TCP_SPEED_TARGET)):
        ours, theirs = by_key.get(("authmilter", transport)), by_key.get(("opendkim+opendmarc", transport))
        if ours is None or theirs is None or not theirs.rate or not theirs.cpu_ms_per_message:
            continue
        print(
            _verdict(
                f"msg/s authmilter / OpenDKIM+OpenDMARC over {transport}",
                ours.rate / theirs.rate,
                speed_target,
                at_least=True,
            )
        )
        print(
            _verdict(
                f"milter CPU/msg authmilter / OpenDKIM+OpenDMARC over {transport}",
                ours.cpu_ms_per_message / theirs.cpu_ms_per_message,
                CPU_TARGET,
                at_least=False,
            )
        )
    _signing_verdicts(by_key)
    for number, run in enumerate(rss_runs):
        if number == 0:
            print(_verdict(f"authmilter peak RSS (MB), {run.what}", run.peak_mb, RSS_TARGET_MB, False))
        else:
            what = f"authmilter peak RSS over idle (MB), {run.what}"
            growth = run.peak_mb - run.idle_mb
            print(_verdict(what, growth, LARGE_RSS_GROWTH_TARGET_MB, at_least=False))


def _signing_verdicts(by_key: dict[tuple[str, str], Measurement]) -> None:
    ours, theirs = by_key.get(("authmilter sign RSA", "unix")), by_key.get(("opendkim sign RSA", "unix"))
    if ours is None or theirs is None or not theirs.rate or not theirs.cpu_ms_per_message:
        return
    print("\n== targets (issue 4, signing with the same RSA-2048 key, unix) ==")
    print(
        _verdict("msg/s authmilter / OpenDKIM", ours.rate / theirs.rate, SIGNING_SPEED_TARGET, at_least=True)
    )
    print(
        _verdict(
            "milter CPU/msg authmilter / OpenDKIM",
            ours.cpu_ms_per_message / theirs.cpu_ms_per_message,
            SIGNING_CPU_TARGET,
            at_least=False,
        )
    )
    dual = by_key.get(("authmilter sign RSA+Ed25519", "unix"))
    if dual is not None and ours.rate and ours.cpu_ms_per_message:
        print(
            f"  RSA+Ed25519 dual / RSA only (authmilter): msg/s {dual.rate / ours.rate:.2f}, "
            f"CPU/msg {dual.cpu_ms_per_message / ours.cpu_ms_per_message:.2f}; "
            f"dual / OpenDKIM RSA: msg/s {dual.rate / theirs.rate:.2f}, "
            f"CPU/msg {dual.cpu_ms_per_message / theirs.cpu_ms_per_message:.2f}"
        )
    for m in by_key.values():
        if m.setup.endswith(("RSA", "Ed25519")):
            print(f"  signatures, {m.setup}: {m.results_seen}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.queue_dir:
        # PostfixInstance makes its ROOT (queue included) under the default temporary folder.
        tempfile.tempdir = args.queue_dir
    workdir = Path(tempfile.mkdtemp(prefix="authmilter-bench-"))
    workdir.chmod(0o755)
    print(f"work directory {workdir}", flush=True)
    results: list[Measurement] = []
    rss_runs: list[RssRun] = []
    try:
        with contextlib.ExitStack() as servers:
            key = rsa_key(2048)
            signing_keys = make_keys(workdir / "keys", DOMAIN) if args.signing else None
            extra_records = signing_keys.zone_lines(DOMAIN) if signing_keys else ""
            dns = start_dns(workdir / "dns", DOMAIN, SENDING_CLIENT.address, key, SELECTOR, extra_records)
            servers.callback(dns.stop)
            sink = SinkProcess(workdir / "sink", free_port("127.0.0.1"), workdir / "sink.log")
            sink.start()
            servers.callback(sink.stop)
            postfix, setups = _postfix(workdir, sink.port, args, signing_keys)
            servers.callback(postfix.remove)
            servers.callback(postfix.stop)  # first: the stack unwinds last in, first out
            postfix.start()
            distinct, sizes = min(args.messages, DISTINCT_MESSAGES), (5 * 1024, 10 * 1024)
            if args.signing:
                payloads = unsigned_messages(distinct, DOMAIN, sizes)
            else:
                payloads = signed_messages(distinct, key, DOMAIN, SELECTOR, sizes)
            client = INTERNAL_CLIENT if args.signing else SENDING_CLIENT
            per_round = -(-args.messages // args.rounds)
            bench = Bench(workdir, postfix, sink, key, payloads, args.sessions, per_round, client)
            # Rounds interleave the set-ups, so a machine that speeds up or slows down during the
            # run (shared hosts do) moves every set-up alike and the ratios stay fair.
            rounds: list[list[Measurement]] = []
            for number in range(1, 0 if args.rss_only else args.rounds + 1):
                bench.round_note = f" (round {number} of {args.rounds})" if args.rounds > 1 else ""
                measured = [bench.measure("no milter", "-", postfix.bare_smtp_port, [])]
                for setup, transport, port, milters, check in setups:
                    measured.append(bench.measure(setup, transport, port, milters(), check))
                rounds.append(measured)
            results = [functools.reduce(Measurement.merged, same) for same in zip(*rounds, strict=True)]
            if not args.skip_rss:
                rss_runs = _rss_runs(bench, postfix, args)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, rss_runs)
    return 0


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


Setup = tuple[str, str, int, Callable[[], Sequence[Milter]], Callable[[SinkProcess], str] | None]


def _postfix(
    workdir: Path, sink_port: int, args: argparse.Namespace, signing_keys: SigningKeys | None
) -> tuple[BenchPostfix, list[Setup]]:
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
    if signing_keys is not None:
        signers = signing_setups(
            postfix.milter_ports, sockets, workdir, signing_keys, args.workers, args.log_level
        )
        return postfix, list(signers)
    setups: list[Setup] = []

    def address(name: str, transport: str) -> MilterAddress:
        if transport == "unix":
            return MilterAddress(path=sockets / f"{name}-{transport}.sock")
        return MilterAddress(port=listen_port())

    for transport in args.transports:
        ours = address("authmilter", transport)
        port = free_port("127.0.0.1")
        postfix.milter_ports[port] = ours.postfix
        setups.append(
            (
                "authmilter",
                transport,
                port,
                lambda a=ours, t=transport: [
                    BenchAuthmilter(workdir / f"authmilter-{t}", a, args.workers, args.log_level)
                ],
                None,
            )
        )
        if args.compare:
            dkim_address, dmarc_address = address("opendkim", transport), address("opendmarc", transport)
            port = free_port("127.0.0.1")
            postfix.milter_ports[port] = f"{dkim_address.postfix},{dmarc_address.postfix}"
            setups.append(
                (
                    "opendkim+opendmarc",
                    transport,
                    port,
                    lambda d=dkim_address, m=dmarc_address, t=transport: [
                        opendkim(workdir / f"opendkim-{t}", d),
                        opendmarc(workdir / f"opendmarc-{t}", m),
                    ],
                    None,
                )
            )
    rss = MilterAddress(path=sockets / "authmilter-rss.sock")
    postfix.milter_ports[free_port("127.0.0.1")] = rss.postfix
    return postfix, setups


if __name__ == "__main__":
    sys.exit(main())

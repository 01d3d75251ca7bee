"""The whole Python side of a worker, in process: CPU per message through the milter adapter.

    .venv/bin/python bench/worker_cpu.py [--messages N] [--senders N] [--rounds N] [--idle-ms MS] [--profile]

``bench/micro.py`` times ``pipeline.evaluate``. A worker runs more Python than that per message:
pymilter's Python callbacks, AuthMilter's (milter_app.py), the Session that gathers the message, the
questions sent ahead and the verdict applied. This drives AuthMilter through pymilter's own Python
entry points (``Milter.negotiate_callback``, ``connect_callback``, the methods libmilter's callbacks
reach, ``close_callback``) with a stand-in for libmilter's context, over the benchmark's workload
(workload.py: Zipf-drawn senders, varied sizes, each message signed by its sender's key) against a
real Knot on loopback without delay, with the config bench/run.py gives authmilter, and checks every
message's Authentication-Results against what its sender must get.

What it leaves out is libmilter and the kernel: a bare pymilter milter (every callback a no-op)
behind the same client costs 0.7-1.0 ms of CPU per message on the benchmark's machine, the pair
pays that twice (two milters).

Prints CPU time per message, the median of the rounds and every round: one sender (every name
cached after the first message, as with ``bench/run.py --senders 1``), then the realistic draw
(each round starts from an empty resolver cache, so each sender's first message is cold). The two
workloads alternate round by round, so the machine's drift hits both. ``--profile`` adds cProfile's
top functions over one more round of each.

A tight loop keeps the CPU's caches warm with this code. A worker at light load does not: between two
messages, Postfix, the resolver and the other workers run, and the same Python costs several times
as much (bench/README.md, "Round 6"). ``--idle-ms MS`` adds each workload again with MS of sleep
before each message, the CPU time counted as before (a sleeping thread spends none).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (puts tests/ on sys.path)
import Milter
from workload import PARENT, Envelope, make_envelopes, make_senders, zipf_draws, zone_lines

from authmilter import milter_app
from authmilter.authresults import HEADER_NAME
from authmilter.config import Config, parse_config
from authmilter.message import parse_message
from authmilter.milter_app import AuthMilter, QuickAck, build_runtime
from dnsserver import AuthoritativeDns
from milterclient import ALL_ACTIONS, ALL_PROTOCOL, MAX_BODY_CHUNK
from signing import rsa_key

CLIENT_IP = "203.0.113.5"
WORKLOAD_KEYS = 4
# The macros AuthMilter reads (milter_app: the queue id, CONNECT_MACROS), as Postfix's milter8.c
# sends them; no SASL login, so every message is inbound.
MACROS = {"i": "4FAKE1QID", "j": "mx.receiver.example", "{daemon_name}": "smtpd"}


@dataclass
class _Context:
    """Stands in for libmilter's context (pymilter's ``milter.Context``): what AuthMilter calls."""

    private: object = None
    added: list[tuple[str, str]] = field(default_factory=list)

    def setpriv(self, private: object) -> None:
        self.private = private

    def getpriv(self) -> object:
        return self.private

    def getsymval(self, name: str) -> str | None:
        return MACROS.get(name)

    def addheader(self, name: str, value: str, index: int = -1) -> None:
        self.added.append((name, value))

    def chgheader(self, name: str, index: int, value: str) -> None:
        pass

    def setreply(self, *reply: str) -> None:
        pass

    def quarantine(self, reason: str) -> None:
        pass


@dataclass(frozen=True)
class _Message:
    envelope: Envelope
    # As pymilter hands them to header_bytes: the name as str, the value as bytes with LF line ends
    # and its leading space kept.
    fields: list[tuple[str, bytes]]
    body: bytes


def _message(envelope: Envelope) -> _Message:
    raw = envelope.payload[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")  # undo SMTP's dot-stuffing
    parsed = parse_message(raw)
    fields = [(f.name, f.value.encode("latin-1").replace(b"\r\n", b"\n")) for f in parsed.headers.fields]
    return _Message(envelope, fields, raw[parsed.body_offset :])


def _one(message: _Message) -> list[tuple[str, str]]:
    """One message on its own connection, as bench/run.py's sessions send them; the added fields."""
    context = _Context()
    Milter.negotiate_callback(context, [ALL_ACTIONS, ALL_PROTOCOL, 0, 0])
    Milter.connect_callback(context, "client.example", socket.AF_INET, (CLIENT_IP, 40000))
    milter = context.private
    assert isinstance(milter, AuthMilter)
    milter.hello("mx.sender.example")
    milter.envfrom_bytes(f"<{message.envelope.mail_from}>".encode())
    milter.envrcpt_bytes(b"<postmaster@receiver.example>")
    for name, value in message.fields:
        milter.header_bytes(name, value)
    for start in range(0, len(message.body), MAX_BODY_CHUNK):
        milter.body(message.body[start : start + MAX_BODY_CHUNK])
    milter.eom()
    Milter.close_callback(context)
    return context.added


def _check(message: _Message, added: list[tuple[str, str]]) -> None:
    (results,) = (value for name, value in added if name == HEADER_NAME)
    for method, result in message.envelope.sender.expected.items():
        if f"{method}={result}" not in results:
            raise SystemExit(f"wrong result for {message.envelope.sender.domain}: {results}")


def _round(config: Config, messages: Sequence[_Message], idle: float = 0.0) -> float:
    """CPU seconds per message, from an empty resolver cache, every result checked; ``idle``: seconds
    of sleep before each message."""
    runtime = build_runtime(config)
    Milter.factory = functools.partial(AuthMilter, runtime, QuickAck(None), None)
    started = time.process_time()
    outcomes: list[list[tuple[str, str]]] = []
    for message in messages:
        if idle:
            time.sleep(idle)
        outcomes.append(_one(message))
    spent = (time.process_time() - started) / len(messages)
    for message, added in zip(messages, outcomes, strict=True):
        _check(message, added)
    return spent


def _config(knot: AuthoritativeDns) -> Config:
    text = f"""[milter]
authserv_id = "mx.receiver.example"
quarantine = "hold"
[log]
destination = "stderr"
level = "warning"
[dns]
nameservers = ["{knot.host}"]
port = {knot.port}
"""
    return parse_config(text, "bench/worker_cpu.py")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="messages per round (default 1000)")
    parser.add_argument("--senders", type=int, default=3000, help="sender domains drawn from (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--idle-ms",
        type=float,
        default=0.0,
        help="also each workload with this many ms of sleep before each message (default 0: not)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile's top 40 functions, each workload")
    args = parser.parse_args(argv)
    if min(args.messages, args.senders, args.rounds) < 1:
        parser.error("--messages, --senders and --rounds must be at least 1")
    if args.idle_ms < 0:
        parser.error("--idle-ms must not be negative")
    keys = [rsa_key(2048) for _ in range(WORKLOAD_KEYS)]
    senders = make_senders(args.senders, WORKLOAD_KEYS)
    rng = random.Random(7)
    workloads = {
        "one sender": [_message(e) for e in make_envelopes([0] * args.messages, senders, keys, rng)],
        "realistic": [
            _message(e)
            for e in make_envelopes(zipf_draws(args.messages, args.senders, 1.0, rng), senders, keys, rng)
        ],
    }
    with tempfile.TemporaryDirectory() as directory, AuthoritativeDns(Path(directory)) as knot:
        knot.add_zone(PARENT, zone_lines(senders, keys, CLIENT_IP))
        knot.reload()
        config = _config(knot)
        milter_app._settle_collector()  # as serve() does before libmilter starts
        idles = [0.0, args.idle_ms / 1000] if args.idle_ms else [0.0]
        series = [
            (f"{label}, {idle * 1000:g} ms idle" if args.idle_ms else label, messages, idle)
            for idle in idles
            for label, messages in workloads.items()
        ]
        rounds: dict[str, list[float]] = {label: [] for label, _, _ in series}
        for _ in range(args.rounds):
            for label, messages, idle in series:
                rounds[label].append(_round(config, messages, idle))
        first = len({m.envelope.sender.domain for m in workloads["realistic"]})
        print(f"{args.messages} messages per round; realistic: {first} distinct senders; CPU per message:")
        for label, values in rounds.items():
            listed = ", ".join(f"{v * 1e6:.0f}" for v in values)
            print(f"  {label}: median {statistics.median(values) * 1e6:.0f} µs (rounds: {listed})")
        if args.profile:
            for label, messages in workloads.items():
                print(f"== {label}")
                profiler = cProfile.Profile(time.process_time)
                profiler.runcall(_round, config, messages)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())

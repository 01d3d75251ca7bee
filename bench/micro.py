"""The pure CPU part of one message: ``pipeline.evaluate`` on a typical 8 KB signed message.

    .venv/bin/python bench/micro.py [--calls N] [--profile] [--body-kb K] [--metrics] [--cold N]

The message is built as the milter adapter builds it (header callbacks through ``HeaderCollector``,
header block then body in one buffer), signed with one RSA-2048 DKIM signature, and evaluated
against zone files that mirror the benchmark's zone (SPF ``ip4:203.0.113.5 -all``, the DKIM key,
``_dmarc`` ``p=reject``). The resolver's cache is warm after the first call, as in a worker.
Prints the time per call (the median of five rounds, every round listed) and, with ``--profile``,
cProfile's top functions.
With ``--metrics`` each call also does what a worker does per message when ``[metrics] listen`` is
set: the resolver reports to the metrics, and the connection and the verdict are counted
(prometheus_client in multiprocess mode, in a temporary directory).

With ``--cold N`` (issue 11) every message comes from a sender not seen before: N messages from N
sender domains of the benchmark's workload (workload.py), served by a real Knot on loopback, each
evaluated with an empty resolver cache, so every SPF, DKIM key and DMARC lookup is a query. It times
process CPU per message (Knot's work is in its own process) for authmilter's NameserverSource and,
interleaved round by round, for dnspython's ``Resolver`` as the source was before issue 11, and
prints the median of five rounds and every round. Its ``--profile`` measures CPU time, with prefetch
off so that every lookup runs in the profiled thread.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import _paths  # noqa: F401  (puts tests/ on sys.path)
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from load import body_text
from workload import PARENT, make_senders, zone_lines

from authmilter import dkim_rsa
from authmilter.config import Config, default_config
from authmilter.dnswire import record_value
from authmilter.message import HeaderCollector, ParsedMessage, assemble_message, parse_message
from authmilter.metrics import Metrics
from authmilter.metrics import enable as enable_metrics
from authmilter.model import Verdict
from authmilter.pipeline import Connection, Transaction, evaluate
from authmilter.resolver import DnsAnswer, DnsSource, DnsStatus, NameserverSource, Resolver, ZoneFileSource
from dnsserver import AuthoritativeDns
from signing import make_message, rsa_key, sign, zone_txt

DOMAIN = "bench.example"
SELECTOR = "bench"
CLIENT_IP = "203.0.113.5"


def _zone(directory: Path, public_record: str) -> Path:
    path = directory / f"{DOMAIN}.zone"
    path.write_text(
        f"""$ORIGIN {DOMAIN}.
$TTL 3600
@ IN SOA ns.{DOMAIN}. hostmaster.{DOMAIN}. 1 3600 600 86400 300
@ IN NS ns.{DOMAIN}.
@ IN TXT "v=spf1 ip4:{CLIENT_IP} -all"
{SELECTOR}._domainkey IN TXT {zone_txt(public_record)}
_dmarc IN TXT "v=DMARC1; p=reject"
""",
        encoding="utf-8",
    )
    return path


def _transaction(signed: bytes, mail_from: str = f"bob@{DOMAIN}") -> Transaction:
    """The Transaction the milter adapter would build (Postfix's Received first, as on the wire)."""
    received = (
        b"Received: from client.example (client.example [203.0.113.5])\r\n\tby mx.receiver.example"
        b" (Postfix) with ESMTP id 4ABCDEF123\r\n\tfor <alice@receiver.example>;"
        b" Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    )
    parsed = parse_message(received + signed)
    collector = HeaderCollector()
    for field in parsed.headers.fields:
        # What pymilter hands over from Postfix (SMFIP_HDR_LEADSPC): the value as sent after the
        # colon, continuation lines joined by LF.
        value = field.value.encode("latin-1").replace(b"\r\n", b"\n")
        collector.add(field.name, value, leading_space_included=True)
    headers = collector.result()
    head = assemble_message(headers, b"")
    raw = head + parsed.raw[parsed.body_offset :]
    return Transaction(
        connection=Connection(client_ip=CLIENT_IP, helo="client.example"),
        mail_from=mail_from,
        recipients=("alice@receiver.example",),
        message=ParsedMessage(headers, len(head), raw, has_separator=True),
        queue_id="4ABCDEF123",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (default 2000)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 30 functions")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key (default tottime)")
    parser.add_argument("--top", type=int, default=30, help="functions printed by --profile (default 30)")
    parser.add_argument("--body-kb", type=int, default=8, help="body size in KB (default 8)")
    parser.add_argument("--pure-rsa", action="store_true", help="without dkim_rsa.install()")
    parser.add_argument("--metrics", action="store_true", help="count as a worker does with [metrics] on")
    parser.add_argument("--cold", type=int, default=0, help="N messages from N new senders, real DNS")
    args = parser.parse_args(argv)
    if not args.pure_rsa:
        dkim_rsa.install()
    if args.cold:
        return _cold(args.cold, args.body_kb, args.profile)
    key = rsa_key(2048)
    body = body_text(args.body_kb * 1024, random.Random(1))
    signed = sign(make_message(f"Bob <bob@{DOMAIN}>", subject="Benchmark", body=body), key, DOMAIN, SELECTOR)
    transaction = _transaction(signed)
    config = default_config()
    with tempfile.TemporaryDirectory() as directory:
        metrics = enable_metrics(directory) if args.metrics else None
        resolver = Resolver(ZoneFileSource([_zone(Path(directory), key.txt_record())]), observer=metrics)
        verdict = evaluate(transaction, resolver, config)
        print(verdict.authentication_results.replace("\n\t", " "))
        assert verdict.spf and verdict.dmarc and verdict.dkim, verdict
        assert "dkim=pass" in verdict.authentication_results, verdict
        assert "dmarc=pass" in verdict.authentication_results, verdict
        queries = resolver.queries
        if metrics is None:
            rounds = [_round(transaction, resolver, config, args.calls, None) for _ in range(ROUNDS)]
            print(f"{len(transaction.message.raw)} bytes: {_median_and_rounds(rounds)} per evaluate")
        else:
            _compare_metrics(transaction, resolver, config, args.calls, metrics)
        print(f"DNS source queries after warm-up: {resolver.queries - queries} (cache hits otherwise)")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            _round(transaction, resolver, config, args.calls, metrics)
            profiler.disable()
            pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)
    return 0


def _compare_metrics(
    transaction: Transaction, observed: Resolver, config: Config, calls: int, metrics: Metrics
) -> None:
    """Metrics off and on in the same process, rounds interleaved (the machine's drift hits both),
    in process CPU time (other processes' load does not count); then the counting alone."""
    plain = Resolver(observed.source)
    verdict = evaluate(transaction, plain, config)  # warms its cache
    off, on = [], []
    for _ in range(ROUNDS):
        off.append(_round(transaction, plain, config, calls, None, time.process_time))
        on.append(_round(transaction, observed, config, calls, metrics, time.process_time))
    difference = (statistics.median(on) - statistics.median(off)) * 1e6
    print(f"{len(transaction.message.raw)} bytes, interleaved rounds, CPU per message:")
    print(f"  metrics off {_median_and_rounds(off)}")
    print(f"  metrics on  {_median_and_rounds(on)} ({difference:+.0f} µs)")
    counting = [_count(metrics, verdict, calls) for _ in range(ROUNDS)]
    print(f"the counting alone (what a message adds with metrics on): {_median_and_rounds(counting)}")


def _median_and_rounds(seconds: list[float]) -> str:
    listed = ", ".join(f"{t * 1e6:.0f}" for t in seconds)
    return f"median {statistics.median(seconds) * 1e6:.0f} µs (rounds: {listed})"


def _count(metrics: Metrics, verdict: Verdict, calls: int) -> float:
    # Warm, the checks' results come from the resolver's derived cache: the message makes no DNS
    # lookup to count (a cache hit adds one in-memory increment, written once per message).
    started = time.process_time()
    for _ in range(calls):
        metrics.connection_opened()
        metrics.message(verdict)
        metrics.connection_closed()
    return (time.process_time() - started) / calls


ROUNDS = 5


def _round(
    transaction: Transaction,
    resolver: Resolver,
    config: Config,
    calls: int,
    metrics: Metrics | None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    started = clock()
    if metrics is None:
        for _ in range(calls):
            evaluate(transaction, resolver, config)
    else:  # what milter_app adds per message (one message per connection, as in bench/run.py)
        for _ in range(calls):
            metrics.connection_opened()
            metrics.message(evaluate(transaction, resolver, config))
            metrics.connection_closed()
    return (clock() - started) / calls


class _DnspythonResolverSource:
    """The source as it was before issue 11 (dnspython's stub ``Resolver``), only to measure against."""

    def __init__(self, host: str, port: int) -> None:
        self._resolver = dns.resolver.Resolver(configure=False)
        self._resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
        self._resolver.lifetime, self._resolver.timeout, self._resolver.cache = 5.0, 2.0, None

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        try:
            answer = self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return DnsAnswer(DnsStatus.NXDOMAIN, ttl=300)
        if answer.rrset is None:
            return DnsAnswer(DnsStatus.NODATA, ttl=300)
        return DnsAnswer(DnsStatus.OK, tuple(map(record_value, answer.rrset)), ttl=answer.rrset.ttl)


def _cold(count: int, body_kb: int, profile: bool) -> int:
    """Every message from a new sender, empty cache, real DNS: CPU per message, two sources."""
    keys = [rsa_key(2048) for _ in range(2)]
    senders = make_senders(count, len(keys))
    rng = random.Random(1)
    transactions = []
    for sender in senders:
        text = body_text(body_kb * 1024, rng)
        message = make_message(f"News <{sender.address}>", subject="Benchmark", body=text)
        signed = sign(message, keys[sender.key_index], sender.domain, sender.selector)
        transactions.append((sender, _transaction(signed, sender.address)))
    config = default_config()
    with tempfile.TemporaryDirectory() as directory, AuthoritativeDns(Path(directory)) as knot:
        knot.add_zone(PARENT, zone_lines(senders, keys, CLIENT_IP))
        knot.reload()
        sources: dict[str, DnsSource] = {
            "NameserverSource": NameserverSource([knot.host], port=knot.port),
            "dnspython Resolver (before)": _DnspythonResolverSource(knot.host, knot.port),
        }
        for label, source in sources.items():
            for sender, transaction in transactions:
                results = evaluate(transaction, Resolver(source), config).authentication_results
                for method, result in sender.expected.items():
                    assert f"{method}={result}" in results, (label, sender, results)
        rounds: dict[str, list[float]] = {label: [] for label in sources}
        for _ in range(5):
            for label, source in sources.items():
                started = time.process_time()
                for _, transaction in transactions:
                    evaluate(transaction, Resolver(source), config)
                rounds[label].append((time.process_time() - started) / count)
        print(f"{count} messages from {count} new senders, {body_kb} KB bodies, CPU per message:")
        for label, values in rounds.items():
            listed = ", ".join(f"{v * 1e6:.0f}" for v in values)
            print(f"  {label}: median {statistics.median(values) * 1e6:.0f} µs (rounds: {listed})")
        if profile:
            # CPU time, not wall time (the waits for Knot are not work), and without prefetch:
            # cProfile sees only its own thread, and prefetched lookups run in others.
            serial = dataclasses.replace(config, dns=dataclasses.replace(config.dns, prefetch_queries=0))
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            for _, transaction in transactions:
                evaluate(transaction, Resolver(sources["NameserverSource"]), serial)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU of ARC validation per message (issue 15), in the style of micro.py.

    .venv/bin/python bench/arc_bench.py [--calls N]

Three figures, each the median of interleaved rounds (every round printed), warm DNS cache,
dkim_rsa installed:

1. ``pipeline.evaluate`` on micro.py's signed 8 KB message (no ARC header fields) with ``[arc]
   verify`` on and off, rounds alternated: what ARC costs a message without ARC (one header-name
   lookup per ARC field name, and ``arc=none`` in the header);
2. ``arc_check.verify_arc`` alone on that message;
3. ``pipeline.evaluate`` and ``verify_arc`` on the same message carrying a 3-instance chain (three
   sealers, RSA-2048, sealed by arc_seal.py): three ARC-Seals and three ARC-Message-Signatures
   checked (the newest for the chain, the older two for ``oldest_pass``).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import _paths  # noqa: F401  (puts tests/ on sys.path)
from load import _body
from micro import DOMAIN, SELECTOR, _transaction, _zone

from authmilter import dkim_rsa
from authmilter.arc_check import verify_arc
from authmilter.arc_seal import ARC_SET_FIELDS, Sealer, seal_message
from authmilter.config import default_config
from authmilter.keys import load_private_key
from authmilter.message import parse_message
from authmilter.model import AuthResult
from authmilter.pipeline import evaluate
from authmilter.resolver import Resolver, ZoneFileSource
from signing import make_message, rsa_key, sign, zone_txt

SEALERS = ("fwd.example", "lists.example.org", "relay.example.net")


def _sealer_zone(directory: Path, domain: str, record: str) -> Path:
    path = directory / f"{domain}.zone"
    path.write_text(
        f"$ORIGIN {domain}.\n$TTL 3600\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n"
        f"arc._domainkey IN TXT {zone_txt(record)}\n",
        encoding="utf-8",
    )
    return path


def _chained(message: bytes, directory: Path) -> tuple[bytes, list[Path]]:
    """The message with three ARC Sets, and the zones of their keys."""
    zones = []
    for number, domain in enumerate(SEALERS):
        key = rsa_key(2048)
        key_path = directory / f"{domain}.key"
        key_path.write_bytes(key.private)
        key_path.chmod(0o600)
        sealer = Sealer(domain, "arc", load_private_key(str(key_path), "rsa-sha256"))
        status = AuthResult.NONE if number == 0 else AuthResult.PASS
        results = f"{domain}; dkim=pass header.d={DOMAIN}; arc={status.value}"
        outcome = seal_message(parse_message(message), status, results, sealer, 1_790_000_000.0 + number)
        assert len(outcome.fields) == 3, outcome.reason
        head = "".join(f"{n}: {v}\r\n" for n, v in zip(ARC_SET_FIELDS, outcome.fields, strict=True))
        message = head.replace("\n ", "\r\n ").encode() + message
        zones.append(_sealer_zone(directory, domain, key.txt_record()))
    return message, zones


ROUNDS = 5


def _round(call: Callable[[], object], calls: int) -> float:
    """Seconds per call over one round of ``calls`` calls."""
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def _interleaved(calls: int, **cases: Callable[[], object]) -> dict[str, list[float]]:
    """Rounds of every case, alternated so that the machine's drift hits each case alike."""
    rounds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, call in cases.items():
            rounds[name].append(_round(call, calls))
    return rounds


def _report(label: str, times: list[float], unit: float, suffix: str) -> None:
    listed = ", ".join(f"{t * unit:.0f}" for t in times)
    print(f"{label}: median {statistics.median(times) * unit:.0f} {suffix} (rounds: {listed})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=1000, help="calls per round (default 1000)")
    args = parser.parse_args(argv)
    dkim_rsa.install()
    key = rsa_key(2048)
    body = _body(8 * 1024, random.Random(1))
    signed = sign(make_message(f"Bob <bob@{DOMAIN}>", subject="Benchmark", body=body), key, DOMAIN, SELECTOR)
    on = default_config()
    off = dataclasses.replace(on, arc=dataclasses.replace(on.arc, verify=False))
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        chained, sealer_zones = _chained(signed, directory)
        resolver = Resolver(ZoneFileSource([_zone(directory, key.txt_record()), *sealer_zones]))
        plain = _transaction(signed)
        with_chain = _transaction(chained)
        assert evaluate(plain, resolver, on).arc.result is AuthResult.NONE  # type: ignore[union-attr]
        chain = evaluate(with_chain, resolver, on).arc
        assert chain is not None and chain.result is AuthResult.PASS and chain.instances == 3, chain
        plain_rounds = _interleaved(
            args.calls,
            on=lambda: evaluate(plain, resolver, on),
            off=lambda: evaluate(plain, resolver, off),
        )
        _report("no ARC fields: evaluate with [arc] verify", plain_rounds["on"], 1e6, "µs")
        _report("no ARC fields: evaluate without", plain_rounds["off"], 1e6, "µs")
        alone = _interleaved(args.calls * 10, alone=lambda: verify_arc(plain.message, resolver, on.dkim))
        _report("no ARC fields: verify_arc alone", alone["alone"], 1e9, "ns")
        chain_rounds = _interleaved(
            args.calls // 10 or 1,
            evaluate=lambda: evaluate(with_chain, resolver, on),
            verify_arc=lambda: verify_arc(with_chain.message, resolver, on.dkim),
        )
        _report("3-instance chain: evaluate", chain_rounds["evaluate"], 1e6, "µs")
        _report("3-instance chain: verify_arc alone", chain_rounds["verify_arc"], 1e6, "µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

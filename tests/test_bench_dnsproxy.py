"""The benchmark's caching DNS proxy (bench/dnsproxy.py): the question read from a query's octets,
and a cached answer served for a repeat of the question.

The proxy stands for an MX's caching resolver in every benchmark figure, so a wrong cache key would
serve one milter another question's answer (the benchmark's result check would fail the run) or
send a repeat upstream again, making it wait a modelled internet round trip that a resolver would
not. The upstream here is a small authoritative responder on loopback.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import Iterator

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from benchmodules import load_bench_module

dnsproxy = load_bench_module("dnsproxy")


def _random_name(rng: random.Random) -> dns.name.Name:
    labels = [
        "".join(rng.choice("abcXYZ_-09") for _ in range(rng.randint(1, 20))) for _ in range(rng.randint(0, 6))
    ]
    return dns.name.from_text(".".join(labels) + ".") if labels else dns.name.root


def test_the_question_read_from_the_octets_is_the_one_dnspython_reads() -> None:
    rng = random.Random(5)
    for _ in range(3000):
        name = _random_name(rng)
        rdtype = rng.choice(["TXT", "A", "AAAA", "MX", "TYPE65280"])
        query = dns.message.make_query(name, rdtype, use_edns=rng.random() < 0.5)
        question = query.question[0]
        expected = (name.canonicalize().to_wire(), question.rdtype, question.rdclass)
        assert dnsproxy.question_of(query.to_wire()) == expected


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x00" * 11,
        # two questions
        b"\x00\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01",
        # a compression pointer where the name should be
        b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
        # a label running past the end
        b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc",
    ],
)
def test_a_query_that_is_not_one_plain_question_has_none(wire: bytes) -> None:
    assert dnsproxy.question_of(wire) is None


def test_a_query_cut_anywhere_has_no_question() -> None:
    wire = dns.message.make_query("_dmarc.example.com", "TXT", use_edns=False).to_wire()
    assert dnsproxy.question_of(wire) is not None
    assert [dnsproxy.question_of(wire[:end]) for end in range(len(wire))] == [None] * len(wire)


@pytest.fixture
def upstream() -> Iterator[tuple[tuple[str, int], list[str]]]:
    """An authoritative responder on loopback answering every TXT question with its own name; the
    names it was asked, in order."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.2)
    asked: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, client = server.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            name = query.question[0].name
            asked.append(name.to_text())
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(name, 300, "IN", "TXT", f'"{name.to_text()}"'))
            server.sendto(response.to_wire(), client)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname(), asked
    finally:
        stop.set()
        thread.join()
        server.close()


def test_a_repeat_in_any_case_gets_the_cached_answer_with_its_own_id(
    upstream: tuple[tuple[str, int], list[str]],
) -> None:
    address, asked = upstream
    proxy = dnsproxy.CachingProxy(address, delay=0.0, max_inflight=4, max_entries=100)
    first = dns.message.make_query("_dmarc.s1.example", "TXT")
    repeat = dns.message.make_query("_DMARC.S1.Example", "TXT")
    other = dns.message.make_query("_dmarc.s2.example", "TXT")
    assert first.id != repeat.id

    async def ask(*queries: dns.message.Message) -> list[dns.message.Message]:
        answers = [await proxy.answer(query.to_wire(), "udp") for query in queries]
        return [dns.message.from_wire(answer) for answer in answers]

    answers = asyncio.run(ask(first, repeat, other))
    assert asked == ["_dmarc.s1.example.", "_dmarc.s2.example."]
    assert [answer.id for answer in answers] == [first.id, repeat.id, other.id]
    texts = [answer.answer[0][0].strings[0].decode() for answer in answers]
    assert texts == ["_dmarc.s1.example.", "_dmarc.s1.example.", "_dmarc.s2.example."]
    assert proxy.stats()["queries"] == 3
    assert proxy.stats()["misses"] == 2
    assert proxy.stats()["dmarc_queries"] == 3

"""Tests of how a query's answer is read from its socket (``SentQuery.datagram``): strays and spoofs
are skipped (RFC 5452 §3), an answer already waiting is read even once the try's time is over, and
a flood of strays past that time ends the try.

The "server" is a UDP socket on loopback that the test drives by hand: it reads the query and sends
what the case needs, so each datagram is in the resolver's socket before the resolver reads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from authmilter.resolver import DnsStatus, NameserverSource, SentQuery, wire_name

QNAME = "sender.datagrams.example"


@pytest.fixture
def server() -> Iterator[socket.socket]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(5.0)
    yield udp
    udp.close()


def _source(server: socket.socket, timeout: float = 2.0) -> NameserverSource:
    return NameserverSource(["127.0.0.1"], port=server.getsockname()[1], timeout=timeout)


def _sent(source: NameserverSource, server: socket.socket) -> tuple[SentQuery, bytes, tuple[str, int]]:
    """A TXT query sent by ``source``, and the query and its source as the server received them."""
    sent = source.send(wire_name(QNAME), dns.rdatatype.TXT)
    assert sent is not None
    query, client = server.recvfrom(65535)
    return sent, query, client


def _answer(query: bytes, text: str = "v=spf1 -all", query_id: int | None = None) -> bytes:
    request = dns.message.from_wire(query)
    reply = dns.message.make_response(request)
    reply.answer.append(dns.rrset.from_text(QNAME + ".", 300, "IN", "TXT", f'"{text}"'))
    if query_id is not None:
        reply.id = query_id
    return reply.to_wire()


def test_strays_and_spoofs_before_the_answer_are_skipped(server: socket.socket) -> None:
    source = _source(server)
    sent, query, client = _sent(source, server)
    query_id = int.from_bytes(query[:2], "big")
    server.sendto(_answer(query, "wrong id", query_id=query_id ^ 1), client)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other_port:
        other_port.sendto(_answer(query, "wrong server"), client)
    other_question = dns.message.make_query("other.datagrams.example", "TXT")
    other_question.id = query_id
    server.sendto(_answer(other_question.to_wire(), "wrong question"), client)
    server.sendto(_answer(query), client)
    answer = source.receive(sent)
    assert (answer.status, answer.texts) == (DnsStatus.OK, ("v=spf1 -all",))


def test_an_answer_that_comes_while_the_reader_waits_is_read(server: socket.socket) -> None:
    source = _source(server)
    sent, query, client = _sent(source, server)
    # Sent from another thread a little later, so that the reader usually finds nothing at first
    # and waits; it reads the answer in either case.
    later = threading.Timer(0.05, server.sendto, (_answer(query), client))
    later.start()
    try:
        answer = source.receive(sent)
    finally:
        later.join()
    assert answer.texts == ("v=spf1 -all",)


def test_an_answer_waiting_past_the_lookups_time_is_read(server: socket.socket) -> None:
    # A prefetched answer read after its try's time: it waits in the socket, so it counts.
    source = _source(server, timeout=1e-9)
    sent, query, client = _sent(source, server)
    server.sendto(_answer(query), client)
    assert source.receive(sent).texts == ("v=spf1 -all",)


def test_no_answer_is_a_timeout(server: socket.socket) -> None:
    source = _source(server, timeout=0.2)
    sent, _, _ = _sent(source, server)
    answer = source.receive(sent)
    assert (answer.status, answer.timed_out) == (DnsStatus.TEMPFAIL, True)


def test_strays_past_the_time_end_the_try(server: socket.socket) -> None:
    # Past the try's time at most 64 waiting datagrams are read: a flood cannot hold the reader.
    source = _source(server, timeout=1e-9)
    sent, query, client = _sent(source, server)
    stray = _answer(query, "stray", query_id=int.from_bytes(query[:2], "big") ^ 1)
    for _ in range(100):
        server.sendto(stray, client)
    server.sendto(_answer(query), client)
    assert source.receive(sent).status is DnsStatus.TEMPFAIL

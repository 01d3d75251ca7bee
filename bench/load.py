"""The benchmark's load: pre-rendered DKIM-signed messages sent by threads over raw SMTP sockets.

smtplib would do, but its per-command Python work is a visible share of two cores at several hundred
messages a second, so the client keeps each connection minimal: one write per command, MAIL, RCPT
and DATA pipelined (RFC 2920; Postfix offers PIPELINING), and the message bytes dot-stuffed and
terminated ahead of time. Each message still takes its own connection, from the client's own address
(``Client.loopback``, on the loopback interface): an outside one so SPF really runs, or, for the
signing run, an internal one (127.0.0.1) so the milters sign. Not XCLIENT: Postfix starts the session
over after it and connects to every milter again, so each message would cost each milter a second
connection that real traffic never brings (bench/README.md).
"""

from __future__ import annotations

import itertools
import random
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import _paths  # noqa: F401  (puts the harness on sys.path)
from postfix import SENDING_CLIENT, Client

from signing import SigningKey, make_message, sign

SMTP_TIMEOUT = 120.0
RECIPIENT = "alice@receiver.example"
LATE_START = 0.010  # seconds after it was due that a paced message counts as started late
# How paced messages arrive: arrival_offsets.
ARRIVALS = ("poisson", "even")
_WORDS = [
    "milter",
    "verify",
    "signature",
    "domain",
    "policy",
    "report",
    "message",
    "header",
    "body",
    "alignment",
    "record",
    "mail",
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "this",
    "be",
    "are",
    "from",
    "at",
    "or",
    "an",
    "it",
    "not",
    "which",
    "have",
    "was",
]


def body_text(size: int, rng: random.Random) -> str:
    """Plain text of about ``size`` bytes in lines under 78 characters (RFC 5322 §2.1.1)."""
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(11)).capitalize() + "."
        lines.append(line)
        total += len(line) + 2
    return "\r\n".join(lines) + "\r\n"


def wire_form(message: bytes) -> bytes:
    """The DATA payload: dot-stuffed (RFC 5321 §4.5.2) and ended by CRLF.CRLF."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def signed_messages(
    count: int, key: SigningKey, domain: str, selector: str, sizes: tuple[int, int], seed: int = 1
) -> list[bytes]:
    """``count`` distinct messages from bob@``domain`` with one DKIM signature each, in wire form.

    Args:
        count: how many.
        key: the signing key (its public half is in DNS under ``selector``).
        domain, selector: the d= and s= of the signature.
        sizes: the range of body sizes in bytes; each message draws one.
        seed: for the random text (the same messages on every run).

    Returns:
        the DATA payloads, ready to send.
    """
    return [
        wire_form(sign(message, key, domain, selector)) for message in _messages(count, domain, sizes, seed)
    ]


def unsigned_messages(count: int, domain: str, sizes: tuple[int, int], seed: int = 1) -> list[bytes]:
    """``count`` distinct messages from bob@``domain`` without signature, in wire form (the signing run).

    Args:
        count: how many.
        domain: the From domain (the one the SigningTable names).
        sizes: the range of body sizes in bytes; each message draws one.
        seed: for the random text (the same messages on every run).

    Returns:
        the DATA payloads, ready to send.
    """
    return [wire_form(message) for message in _messages(count, domain, sizes, seed)]


def _messages(count: int, domain: str, sizes: tuple[int, int], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [
        make_message(
            f"Bob <bob@{domain}>",
            subject=f"Benchmark message {number}",
            body=body_text(rng.randint(*sizes), rng),
        )
        for number in range(count)
    ]


@dataclass
class LoadResult:
    """What one load run saw from the client's side."""

    sent: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    # Per accepted message: seconds from the final "." to the 250 (the milters' end-of-message work,
    # Postfix's cleanup and queue-file sync), and from connect to the 250.
    data_latencies: list[float] = field(default_factory=list)
    session_latencies: list[float] = field(default_factory=list)
    # The message number (0 for the first message sent) of each entry in data_latencies.
    data_latency_numbers: list[int] = field(default_factory=list)
    # At an offered rate: messages that started over LATE_START after they were due (every session
    # was still busy), a sign the rate is above what the set-up can take.
    late_starts: int = 0

    def percentile(self, values: Sequence[float], q: float) -> float:
        if not values:
            return 0.0
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def latency_summary(self) -> str:
        """p50/p90/p99 of the end-of-data wait and the share of waits at or over 35 ms, in ms."""
        data = self.data_latencies
        if not data:
            return "no accepted messages"
        slow = sum(1 for d in data if d >= 0.035) / len(data)
        return (
            f"end-of-data wait p50 {self.percentile(data, 0.5) * 1e3:.1f} ms, "
            f"p90 {self.percentile(data, 0.9) * 1e3:.1f} ms, p99 {self.percentile(data, 0.99) * 1e3:.1f} ms, "
            f">=35 ms: {slow:.0%}; whole session mean {statistics.fmean(self.session_latencies) * 1e3:.1f} ms"
        )


class _Replies:
    """Reads SMTP replies (RFC 5321 §4.2: the last line has a space after the code) off a socket."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self._buffer = b""

    def read(self) -> tuple[int, bytes]:
        start = 0
        while True:
            end = self._buffer.find(b"\r\n", start)
            if end < 0:
                chunk = self._connection.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                self._buffer += chunk
                continue
            line = self._buffer[start:end]
            if line[3:4] != b"-":
                reply, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
                return int(line[:3]), reply
            start = end + 2


class Refused(Exception):
    def __init__(self, stage: str, code: int, text: bytes) -> None:
        super().__init__(f"{stage}: {code} {text.decode(errors='replace').strip()}")
        self.stage = stage
        self.code = code


def _expect(replies: _Replies, stage: str, *codes: int) -> None:
    code, text = replies.read()
    if code not in codes:
        raise Refused(stage, code, text)


def send_one(
    host: str, port: int, payload: bytes, mail_from: str, client: Client = SENDING_CLIENT
) -> tuple[float, float]:
    """One message over one connection from ``client.loopback``; returns (end-of-data wait, whole
    session) in seconds.

    Raises:
        Refused: a reply other than the expected one.
        OSError: the connection failed.
    """
    started = time.perf_counter()
    source = (client.loopback, 0)
    with socket.create_connection((host, port), timeout=SMTP_TIMEOUT, source_address=source) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = _Replies(connection)
        _expect(replies, "greeting", 220)
        connection.sendall(f"EHLO {client.helo}\r\n".encode())
        _expect(replies, "EHLO", 250)
        connection.sendall(f"MAIL FROM:<{mail_from}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
        _expect(replies, "MAIL", 250)
        _expect(replies, "RCPT", 250)
        _expect(replies, "DATA", 354)
        connection.sendall(payload[:-3])
        data_sent = time.perf_counter()
        connection.sendall(payload[-3:])
        _expect(replies, "end of data", 250)
        done = time.perf_counter()
        connection.sendall(b"QUIT\r\n")
        _expect(replies, "QUIT", 221)
    return done - data_sent, done - started


def arrival_offsets(count: int, rate: float, arrivals: str, seed: int = 11) -> list[float]:
    """When each of ``count`` messages offered at ``rate`` a second is due, in seconds after the first.

    ``arrivals``:

    - "poisson": a Poisson process's arrivals at that rate. Mail reaches an MX from many senders
      that do not wait for each other, and such a superposition of independent streams is close to a
      Poisson process: gaps of every length, and messages that come together. Given their count,
      its arrivals in a span are uniform order statistics, so they are drawn that way over
      ``count`` / ``rate`` seconds: the rate offered is then exact, not a sample's. From a fixed
      seed, so that every set-up and round gets the same schedule.
    - "even": message n at n / ``rate``. No MX sees that, and the benchmark's own numbers make it
      worse than unrealistic: at 50 msg/s its 20 ms period is the default DNS miss, so a sender's
      first message is evaluated when its answers come, one miss after its MAIL FROM, which is just
      when the next message reaches end of data, in every period (bench/README.md, "Round 8").
    """
    if arrivals == "even":
        return [number / rate for number in range(count)]
    if arrivals != "poisson":
        raise ValueError(f"arrivals must be one of {ARRIVALS}, not {arrivals!r}")
    draw = random.Random(seed)
    span = count / rate
    return [0.0, *sorted(draw.uniform(0.0, span) for _ in range(count - 1))][:count]


def _wait_until(due: float) -> float:
    """Sleep until ``due`` (``time.perf_counter``); how late it already was, in seconds."""
    now = time.perf_counter()
    if now < due:
        time.sleep(due - now)
        return 0.0
    return now - due


def run_load(
    host: str,
    port: int,
    messages: Sequence[tuple[str, bytes]],
    *,
    sessions: int,
    count: int,
    client: Client = SENDING_CLIENT,
    schedule: Sequence[float] = (),
) -> LoadResult:
    """Send ``count`` messages (cycling through ``messages``) over ``sessions`` concurrent connections.

    Args:
        host, port: Postfix's smtpd.
        messages: (envelope sender, message in wire form) pairs.
        sessions: client threads, each with one connection at a time.
        count: messages in total.
        client: who sends, from its own address (an internal one makes the milters sign).
        schedule: when each message is due, in seconds after the first (arrival_offsets): it
            starts then, or as soon as a session is free after that; empty: each session sends its
            next message at once.

    Returns:
        what was accepted and refused, the wall time and the client's own CPU time.
    """
    result = LoadResult()
    numbers = itertools.count()
    lock = threading.Lock()

    def session() -> None:
        while True:
            with lock:
                number = next(numbers)
            if number >= count:
                return
            late = bool(schedule) and _wait_until(started + schedule[number]) > LATE_START
            try:
                mail_from, payload = messages[number % len(messages)]
                data_wait, whole = send_one(host, port, payload, mail_from, client)
            except Refused as e:
                outcome = f"{e.stage} {e.code}"
            except OSError as e:
                outcome = f"{type(e).__name__}"
            else:
                outcome = ""
            with lock:
                result.sent += 1
                result.late_starts += late
                if outcome:
                    result.refused[outcome] += 1
                else:
                    result.accepted += 1
                    result.data_latencies.append(data_wait)
                    result.data_latency_numbers.append(number)
                    result.session_latencies.append(whole)

    threads = [threading.Thread(target=session, name=f"smtp-{n}") for n in range(sessions)]
    cpu_started, started = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    result.client_cpu_seconds = time.process_time() - cpu_started
    return result

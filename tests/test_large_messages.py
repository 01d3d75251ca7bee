"""A worker's memory does not grow with the message (issue 9, part 3): a 200 MB body streamed
through the real daemon, its workers' RSS read from /proc: unsigned, signed (verified), and outbound
(signed by us).

The body is generated on the fly and sent in blocks; neither side ever holds it whole. The bound is
generous (a memory figure, not a timing): the peak (VmHWM) of the worker that took the message may
exceed its idle RSS by ``body_memory_limit`` + 32 MB at most, where keeping the body once costs 200 MB.
The benchmark (bench/run.py --rss-only, bench/README.md) measures the same for the record.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import dkim
import dkim.crypto
import pytest
from dkim.canonicalization import CanonicalizationPolicy

from authmilter.config import MilterSettings
from milterclient import MessageResult, MilterClient, split_message
from signing import rsa_key, zone_txt
from test_supervisor import AUTHORISED_IP, ZONE, Daemon, free_port

BODY_MB = 200
# One line, already canonical under simple and relaxed (RFC 6376 §3.4.3, §3.4.4): the body hash of
# LINE * n is the SHA-256 of exactly those bytes, computed here without any of the code under test.
LINE = b"All work and no play makes Jack a dull boy. 0123456789 abcdefghijklmnopqrstuvwxyz\r\n"
BLOCK = LINE * (1_048_576 // len(LINE))  # about 1 MB, sent as 16 body packets of 64 KB
BLOCKS = BODY_MB
SLACK_MB = 32
SELECTOR = "big"
HEAD = (
    b"From: Bob <bob@sender.example>\r\nTo: Alice <alice@receiver.example>\r\n"
    b"Subject: a large message\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <large-1@sender.example>\r\n"
)
KEY = rsa_key(2048)
SIGNING = '[signing]\nkey_table = "KeyTable"\nsigning_table = "refile:SigningTable"\n'


def body_hash() -> bytes:
    hasher = hashlib.sha256()
    for _ in range(BLOCKS):
        hasher.update(BLOCK)
    return base64.b64encode(hasher.digest())


def signed_head() -> bytes:
    """HEAD with a relaxed/relaxed rsa-sha256 DKIM-Signature over the generated body.

    dkimpy makes it from the header block and the body hash (its ``gen_header``, as dkim.sign()
    does after hashing a body it holds), so the test never holds the body either.
    """
    signer = dkim.DKIM(HEAD + b"\r\n", signature_algorithm=b"rsa-sha256", linesep=b"\r\n")
    signer.hasher = dkim.crypto.HASH_ALGORITHMS[b"rsa-sha256"]
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", b"sender.example"),
        (b"s", SELECTOR.encode()),
        (b"h", b"from:to:subject:date:message-id"),
        (b"bh", body_hash()),
        (b"b", b"0" * 60),
    ]
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    include = (b"from", b"to", b"subject", b"date", b"message-id")
    private = dkim.crypto.parse_pem_private_key(KEY.private)
    value: bytes = signer.gen_header(fields, include, policy, b"DKIM-Signature", private)
    return b"DKIM-Signature: " + value.rstrip(b"\r\n") + b"\r\n" + HEAD


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


class RssSampler:
    """The highest VmRSS of each process, read every 20 ms until stopped (VmHWM is the bound;
    this shows how the RSS moved, for the failure message)."""

    def __init__(self, pids: set[int]) -> None:
        self.peaks = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.peaks:
                self.peaks[pid] = max(self.peaks[pid], status_kb(pid, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream_message(address: str, head: bytes, mail_macros: Mapping[str, str]) -> MessageResult:
    """One message with the generated body, sent block by block as an MTA would."""
    with MilterClient.connect(address, timeout=300) as client:
        negotiated = client.negotiate()
        client.connect_info("mx.sender.example", AUTHORISED_IP)
        client.helo("mx.sender.example")
        client.mail("bob@sender.example", macros=mail_macros)
        client.rcpt("alice@receiver.example")
        client.data()
        headers, _ = split_message(head + b"\r\n", negotiated.leading_space)
        for name, value in headers:
            client.header(name, value)
        client.end_of_headers()
        for _ in range(BLOCKS):
            client.body(BLOCK)
        modifications, response = client.end_of_message({"i": "LARGE1"})
        client.quit()
    return MessageResult("eom", response, modifications)


class SigningDaemon(Daemon):
    """The test daemon, also signing mail from sender.example with KEY (outbound mail)."""

    def write_config(self, authserv_id: str, extra: str = "") -> None:
        super().write_config(authserv_id, extra + SIGNING)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    key = tmp_path / "big.private"
    key.write_bytes(KEY.private)
    os.chmod(key, 0o600)
    (tmp_path / "KeyTable").write_text(f"big sender.example:{SELECTOR}:{key}\n")
    (tmp_path / "SigningTable").write_text("*@sender.example big\n")
    record = f"{SELECTOR}._domainkey IN TXT {zone_txt(KEY.txt_record())}\n".encode()
    started = SigningDaemon(
        tmp_path, f"inet:{free_port()}@127.0.0.1", "mx.receiver.example", ZONE.read_bytes() + record
    )
    try:
        started.notification("READY=1")
        yield started
    finally:
        started.stop()


def check_outcome(case: str, result: MessageResult) -> None:
    assert result.response.kind == "accept", result
    if case == "outbound":
        [signature] = [m.value for m in result.modifications if m.name == "DKIM-Signature"]
        assert f"bh={body_hash().decode()};" in "".join(signature.split()), signature
        return
    [ar] = [m.value for m in result.modifications if m.name == "Authentication-Results"]
    expected = "dkim=pass" if case == "signed" else "dkim=none"
    assert expected in ar and "dmarc=pass" in ar, ar


@pytest.mark.parametrize("case", ["unsigned", "signed", "outbound"])
def test_a_200_mb_message_costs_a_worker_no_more_than_a_small_one(daemon: Daemon, case: str) -> None:
    head = signed_head() if case == "signed" else HEAD
    macros = {"{auth_authen}": "bob", "{auth_type}": "PLAIN"} if case == "outbound" else {}
    workers = daemon.workers()
    idle = {pid: status_kb(pid, "VmRSS") for pid in workers}
    with RssSampler(workers) as sampler:
        result = stream_message(daemon.socket, head, macros)
    peaks = {pid: status_kb(pid, "VmHWM") for pid in workers}
    check_outcome(case, result)
    allowed_kb = MilterSettings().body_memory_limit // 1024 + SLACK_MB * 1024
    grown = {pid: peaks[pid] - idle[pid] for pid in workers}
    summary = ", ".join(
        f"worker {pid}: idle {idle[pid] // 1024} MB, peak {peaks[pid] // 1024} MB "
        f"(sampled {sampler.peaks[pid] // 1024} MB)"
        for pid in sorted(workers)
    )
    assert max(grown.values()) <= allowed_kb, f"{BODY_MB} MB body; {summary}"

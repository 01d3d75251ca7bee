"""The bounded memo (memo.py) and the memos built on it for what senders send: kept when small,
computed each time when larger than any legitimate value, so a hostile sender cannot fill memory."""

from __future__ import annotations

import dns.rdatatype
import pytest

from authmilter import dmarc
from authmilter.memo import octets, remembered_when_small
from authmilter.message import MAX_CACHED_FROM_LENGTH, FromAuthors


def test_small_arguments_are_kept_large_ones_and_failures_are_not() -> None:
    calls: list[bytes | None] = []

    @remembered_when_small(2, 4, octets)
    def upper(first: bytes, second: bytes | None = None) -> list[bytes]:
        calls.append(first)
        if first == b"bad":
            raise ValueError(first)
        return [first.upper()]

    assert upper(b"ab") is upper(b"ab") and calls == [b"ab"]
    assert upper(b"ab", b"cd") is upper(b"ab", b"cd") and len(calls) == 2  # 4 octets in all: kept
    assert upper(b"ab", b"cde") is not upper(b"ab", b"cde") and len(calls) == 4  # 5: computed each time
    assert upper(b"abcde") == [b"ABCDE"] and upper(b"abcde") is not upper(b"abcde")
    for _ in range(2):
        with pytest.raises(ValueError):
            upper(b"bad")
    assert calls.count(b"bad") == 2
    upper(b"x"), upper(b"y"), upper(b"z")  # only the last 2 are kept
    before = len(calls)
    upper(b"x")
    assert len(calls) == before + 1


def _authors(domain: str, local_length: int) -> FromAuthors:
    return FromAuthors(addresses=(f"{'a' * local_length}@{domain}",), domains=(domain,))


def test_dmarc_keeps_what_it_derives_from_a_short_from_only() -> None:
    short = _authors("short.example", 10)
    assert dmarc._policy_questions(short, 5) is dmarc._policy_questions(short, 5)
    # A From of up to MAX_FROM_LENGTH (8 KB) that message.py does not keep parsed is not kept here.
    hostile = _authors("long.example", MAX_CACHED_FROM_LENGTH)
    questions = dmarc._policy_questions(hostile, 5)
    assert questions[0] == ("_dmarc.long.example", dns.rdatatype.TXT)
    again = dmarc._policy_questions(hostile, 5)
    assert again == questions and again is not questions
    failed = FromAuthors(error="x" * (MAX_CACHED_FROM_LENGTH + 1))
    assert dmarc.unusable_from(failed) == dmarc.unusable_from(failed)
    assert dmarc.unusable_from(failed) is not dmarc.unusable_from(failed)
    failed_short = FromAuthors(error="no From header field")
    assert dmarc.unusable_from(failed_short) is dmarc.unusable_from(failed_short)

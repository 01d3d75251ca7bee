"""The streaming body hashes equal dkimpy's, whatever the chunk boundaries (RFC 6376 §3.4.3, §3.4.4)."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator

import pytest
from dkim.canonicalization import Relaxed, Simple

from authmilter.dkim_body import (
    HASH_ALGORITHMS,
    RELAXED,
    SIMPLE,
    BodyHasher,
    BodyHashSpec,
    digest_body,
)

# Bodies are built from these: every byte that canonicalization treats specially, and the runs
# that straddle chunk boundaries (trailing WSP, empty lines, CRLF split in two).
PIECES = (b"a", b"xyz", b" ", b"  ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b" \r\n", b"\t \r\n", b".")
EDGE_BODIES = (
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"a",
    b"a\r\n",
    b"a\r\n\r\n\r\n",
    b"a  \r\n \t \r\n\r\n",
    b"  \r\n\t\r\n",
    b"a \t b\t\r\n",
    b"no final line end  ",
    b"a\r\n  ",
    b"a\r\n\r\n \t",
    b"a\r",
    b"a \r",
    b"a\r\r\n",
    b"a \r \r\n",
    b"bare\nline\n\nends\n",
    b"\n",
    b"\r\r\n\n",
    b"x\r\n" * 3 + b"\r\n" * 40_000,
    b" " * 100_000 + b"\r\n",
    b"\r\n" * 50_000 + b"late",
)


def dkimpy_canonical(body: bytes, canonicalization: str) -> bytes:
    """dkimpy's canonical body: rfc822_parse's line ends (bare LF as CRLF), then canonicalize_body."""
    parsed = b"\r\n".join(re.split(b"\r?\n", body))
    algorithm = Relaxed if canonicalization == RELAXED else Simple
    canonical: bytes = algorithm.canonicalize_body(parsed)
    return canonical


def dkimpy_digest(body: bytes, spec: BodyHashSpec) -> bytes:
    # As dkimpy's verify_sig_process: canonicalize, cut at l=, hash.
    canonical = dkimpy_canonical(body, spec.canonicalization)
    if spec.length is not None:
        canonical = canonical[: spec.length]
    return hashlib.new(spec.algorithm, canonical).digest()


def all_specs(lengths: tuple[int | None, ...] = (None, 0, 1, 3, 10)) -> list[BodyHashSpec]:
    return [
        BodyHashSpec(canonicalization, length, algorithm)
        for canonicalization in (SIMPLE, RELAXED)
        for length in lengths
        for algorithm in HASH_ALGORITHMS
    ]


def streamed(body: bytes, cuts: list[int], specs: list[BodyHashSpec]) -> BodyHasher:
    hasher = BodyHasher(specs)
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        hasher.update(body[start:end])
    return hasher


def check(body: bytes, cuts: list[int], specs: list[BodyHashSpec]) -> None:
    result = streamed(body, cuts, specs).finish()
    for spec in specs:
        assert result.digests[spec] == dkimpy_digest(body, spec), (body[:80], cuts[:20], spec)
    for canonicalization in (SIMPLE, RELAXED):
        assert result.lengths[canonicalization] == len(dkimpy_canonical(body, canonicalization))


def random_bodies(seed: int, count: int, max_pieces: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        yield b"".join(rng.choice(PIECES) for _ in range(rng.randrange(max_pieces)))


@pytest.mark.parametrize("body", EDGE_BODIES[:-3])
def test_edge_bodies_split_at_every_boundary(body: bytes) -> None:
    specs = all_specs()
    check(body, [], specs)
    for cut in range(len(body) + 1):
        check(body, [cut], specs)
    check(body, list(range(1, len(body))), specs)  # one byte at a time


@pytest.mark.parametrize("body", EDGE_BODIES[-3:], ids=["blank-lines", "spaces", "late-content"])
def test_long_runs_across_many_chunks(body: bytes) -> None:
    rng = random.Random(len(body))
    specs = all_specs((None, 7, 100_001))
    for _ in range(5):
        check(body, sorted(rng.sample(range(1, len(body)), 50)), specs)


def test_generated_bodies_split_at_every_boundary() -> None:
    specs = all_specs()
    for body in random_bodies(seed=6376, count=300, max_pieces=12):
        for cut in range(len(body) + 1):
            check(body, [cut], specs)
        check(body, list(range(1, len(body))), specs)


def test_generated_bodies_split_at_random_boundaries() -> None:
    rng = random.Random(3443)
    for body in random_bodies(seed=344, count=300, max_pieces=400):
        count = min(len(body) - 1, rng.randrange(1, 30)) if body else 0
        cuts = sorted(rng.sample(range(1, len(body)), count))
        check(body, cuts, all_specs((None, 0, 1, rng.randrange(len(body) + 3))))


def test_digest_body_feeds_milter_sized_chunks() -> None:
    line = b"All work and no play makes Jack a dull boy. \t \r\n"
    body = line * 5000 + b"\r\n" * 3  # about 250 KB: several chunks
    specs = all_specs((None, 70_000))
    result = digest_body(specs, body)
    for spec in specs:
        assert result.digests[spec] == dkimpy_digest(body, spec)


def test_same_spec_twice_is_hashed_once_and_no_spec_costs_nothing() -> None:
    spec = BodyHashSpec(RELAXED, None, "sha256")
    assert list(digest_body([spec, spec], b"x\r\n").digests) == [spec]
    assert digest_body([], b"x\r\n").digests == {}


def test_finish_is_final() -> None:
    hasher = BodyHasher([BodyHashSpec(SIMPLE, None, "sha256")])
    hasher.update(b"a\r\n")
    assert hasher.finish() is hasher.finish()
    with pytest.raises(RuntimeError, match="after the body hashes were finished"):
        hasher.update(b"b\r\n")


@pytest.mark.parametrize(
    "canonicalization, length, algorithm",
    [("nofws", None, "sha256"), (SIMPLE, None, "md5"), (RELAXED, -1, "sha256")],
)
def test_spec_is_validated(canonicalization: str, length: int | None, algorithm: str) -> None:
    with pytest.raises(ValueError):
        BodyHashSpec(canonicalization, length, algorithm)

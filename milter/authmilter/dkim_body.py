"""DKIM body hashes computed as the body streams in (RFC 6376 §3.4.3, §3.4.4, §3.7): flat memory.

Signing and verifying need the body only through its hashes: ``bh=`` is the hash of the
canonicalized body, cut at ``l=`` octets when the signature has one. So the milter hashes each body
chunk as the MTA sends it, one running hash per distinct :class:`BodyHashSpec` (canonicalization,
``l=``, hash algorithm) that the message's signatures or our signing need, and keeps no body at all:
a 200 MB message costs what a 2 KB one does. ``dkim_verify`` and ``dkim_sign`` take the
:class:`BodyDigests` instead of the body; given whole messages (``authmilter check`` and ``sign``,
tests) they feed the body through the same :class:`BodyHasher` in chunks.

The canonical body is exactly what dkimpy 1.1's ``canonicalize_body`` gives (tests compare them at
every chunk boundary), with the line ends dkimpy's ``rfc822_parse`` gives: a bare LF counts as CRLF.

- ``simple`` (§3.4.3): all empty lines at the end are ignored; the body ends with exactly one CRLF
  (an empty body becomes one CRLF, a last line without CRLF gets one).
- ``relaxed`` (§3.4.4): WSP before a CRLF is deleted, every other run of WSP becomes one SP, empty
  lines at the end are ignored, a non-empty body ends with CRLF and an empty one stays empty. As in
  dkimpy, WSP at the very end of a body without a final CRLF becomes one SP before the added CRLF
  (the MTA never sends such a body: SMTP data ends with CRLF).

Across chunks only a few bytes are held back: a CR that may start a CRLF, for ``relaxed`` the WSP
before it (one SP stands for the whole run), and a count of CRLFs that may turn out to be the
trailing empty lines to ignore.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from authmilter.dkim_rsa import compress_whitespace, strip_trailing_whitespace
from authmilter.message import normalise_line_endings

SIMPLE = "simple"
RELAXED = "relaxed"
CANONICALIZATIONS = (SIMPLE, RELAXED)
# The hash algorithms of DKIM's a= values (RFC 6376 §3.3, RFC 8463 §3), by hashlib name, with their
# constructors (hashlib.new looks the name up on each call, at twice the cost).
HASH_ALGORITHMS: Mapping[str, Callable[[], hashlib._Hash]] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}
# How a whole message in memory is fed to a hasher: the size of a libmilter body chunk
# (MILTER_CHUNK_SIZE), so the CLI and tests take the milter's path, with its bounded copies.
CHUNK_SIZE = 65535
# Held-back empty lines that turn out not to be trailing are written in pieces of this many CRLFs,
# so a hostile run of millions of empty lines costs bounded memory.
_CRLF_BLOCK = 32768
# An LF without a CR before it (RFC 5322 §2.3: CR and LF only together), at the start too. One
# scan of the piece, where normalise_line_endings counts LFs and CRLFs (two, the second slower).
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


@dataclass(frozen=True)
class BodyHashSpec:
    """One body hash a signature needs (RFC 6376 §3.7: the body hash, cut at ``l=``).

    Attributes:
        canonicalization: the body canonicalization, ``simple`` or ``relaxed`` (c=, after the slash).
        length: the ``l=`` value, octets of canonical body hashed; None = the whole body.
        algorithm: the hash, ``sha1`` or ``sha256`` (from a=).
    """

    canonicalization: str
    length: int | None
    algorithm: str

    def __post_init__(self) -> None:
        if self.canonicalization not in CANONICALIZATIONS:
            raise ValueError(f"unknown body canonicalization {self.canonicalization!r}")
        if self.algorithm not in HASH_ALGORITHMS:
            raise ValueError(f"unknown hash algorithm {self.algorithm!r}")
        if self.length is not None and self.length < 0:
            raise ValueError(f"l= must not be negative, not {self.length}")


@dataclass(frozen=True)
class BodyDigests:
    """The body as DKIM sees it, once it has all streamed in.

    Attributes:
        digests: the finished hash of each requested spec.
        lengths: octets of canonical body per canonicalization hashed (for l= checks, §3.5).
    """

    digests: Mapping[BodyHashSpec, bytes] = field(default_factory=dict)
    lengths: Mapping[str, int] = field(default_factory=dict)


class _Sink:
    """One running hash, fed canonical octets until its ``l=`` is reached."""

    def __init__(self, spec: BodyHashSpec) -> None:
        self.spec = spec
        self._hash = HASH_ALGORITHMS[spec.algorithm]()
        self._remaining = spec.length

    def write(self, data: bytes | memoryview) -> None:
        if self._remaining is None:
            self._hash.update(data)
        elif self._remaining > 0:
            part = data[: self._remaining]
            self._hash.update(part)
            self._remaining -= len(part)

    def digest(self) -> bytes:
        return self._hash.digest()


class _Canonicalizer:
    """One body canonicalization over raw chunks, writing canonical octets to its sinks."""

    def __init__(self, relaxed: bool, sinks: list[_Sink]) -> None:
        self._relaxed = relaxed
        self._sinks = sinks
        self._held = b""  # the raw suffix the next chunk may change: [SP] [CR]
        self._crlfs = 0  # CRLFs written by no one yet: maybe the trailing empty lines
        self._content = False  # anything but those CRLFs was written
        self.length = 0

    def update(self, chunk: bytes) -> None:
        data = self._held + chunk if self._held else chunk
        cut = self._hold_point(data)
        held = data[cut:]
        if self._relaxed and held[:1] in (b" ", b"\t"):
            held = b" \r" if held.endswith(b"\r") else b" "  # a run of WSP is one SP or nothing
        self._held = held
        self._write_piece(self._canonical(data[:cut]))

    def finish(self) -> int:
        """Write what was held and the final CRLF; returns the canonical body's length."""
        # No more data: a held CR is content, held WSP ends the body (kept as one SP, see the top).
        self._write_piece(self._held)
        self._held = b""
        if self._content or not self._relaxed:
            # §3.4.3: an empty body is one CRLF under simple; §3.4.4: it stays empty under relaxed.
            self._emit(b"\r\n")
        return self.length

    def _hold_point(self, data: bytes) -> int:
        end = len(data) - 1 if data.endswith(b"\r") else len(data)
        if self._relaxed:
            # WSP before a CRLF goes, elsewhere it is one SP: the next chunk decides.
            end = len(data[:end].rstrip(b" \t"))
        return end

    def _canonical(self, piece: bytes) -> bytes:
        # The piece does not end in WSP or CR (those are held), so no CRLF and no WSP run straddles
        # its end, and it does not start with LF after a CR: it can be canonicalized on its own.
        if _BARE_LF.search(piece):  # rare: SMTP and the MTA give CRLF
            piece = normalise_line_endings(piece)
        if self._relaxed:
            piece = compress_whitespace(strip_trailing_whitespace(piece))
        return piece

    def _write_piece(self, piece: bytes) -> None:
        """Write canonical octets, holding back the CRLFs at their end (§3.4.3/§3.4.4: maybe
        trailing empty lines, or the end of the last line, written by ``finish``)."""
        if not piece:
            return
        crlfs = _trailing_crlfs(piece)
        content = len(piece) - 2 * crlfs
        if content:
            self._emit_crlfs(self._crlfs)
            self._emit(memoryview(piece)[:content])
            self._crlfs = crlfs
            self._content = True
        else:
            self._crlfs += crlfs

    def _emit_crlfs(self, count: int) -> None:
        while count > 0:
            block = min(count, _CRLF_BLOCK)
            self._emit(b"\r\n" * block)
            count -= block

    def _emit(self, data: bytes | memoryview) -> None:
        self.length += len(data)
        for sink in self._sinks:
            sink.write(data)


def _trailing_crlfs(data: bytes) -> int:
    """How many CRLF pairs ``data`` ends with, without a Python loop over hostile input."""
    tail = data[len(data.rstrip(b"\r\n")) :][::-1]  # only CR and LF, last byte first
    # Read backwards, CRLF pairs are LF at even offsets and CR at odd ones.
    line_feeds, returns = tail[0::2], tail[1::2]
    return min(len(line_feeds) - len(line_feeds.lstrip(b"\n")), len(returns) - len(returns.lstrip(b"\r")))


class BodyHasher:
    """Canonicalizes and hashes a message body chunk by chunk, for the specs asked.

    Each canonicalization runs once, whatever the number of hashes over it. Memory is the same
    for any body: a few held-back bytes per canonicalization, one hash state per spec.

    Args:
        specs: the body hashes to compute (none: the body is only counted, which costs nothing).
    """

    def __init__(self, specs: Iterable[BodyHashSpec]) -> None:
        self._sinks = [_Sink(spec) for spec in dict.fromkeys(specs)]
        sinks_by_canonicalization: dict[str, list[_Sink]] = {}
        for sink in self._sinks:
            sinks_by_canonicalization.setdefault(sink.spec.canonicalization, []).append(sink)
        self._canonicalizers = {
            name: _Canonicalizer(name == RELAXED, sinks) for name, sinks in sinks_by_canonicalization.items()
        }
        self._result: BodyDigests | None = None

    def update(self, chunk: bytes) -> None:
        """Take the next body chunk, as the MTA sent it.

        Raises:
            RuntimeError: the hashes were finished already.
        """
        if self._result is not None:
            raise RuntimeError("body chunk after the body hashes were finished")
        for canonicalizer in self._canonicalizers.values():
            canonicalizer.update(chunk)

    def finish(self) -> BodyDigests:
        """The body has all arrived: the hashes and canonical lengths (the same on a second call)."""
        if self._result is None:
            lengths = {name: c.finish() for name, c in self._canonicalizers.items()}
            self._result = BodyDigests({sink.spec: sink.digest() for sink in self._sinks}, lengths)
        return self._result


def digest_body(specs: Iterable[BodyHashSpec], body: bytes) -> BodyDigests:
    """The body hashes of a body held in memory, fed in milter-sized chunks (the milter's path).

    Args:
        specs: the body hashes to compute.
        body: the body bytes (CRLF or bare LF line ends).

    Returns:
        The digests and canonical lengths.
    """
    hasher = BodyHasher(specs)
    for start in range(0, len(body), CHUNK_SIZE):
        hasher.update(body[start : start + CHUNK_SIZE])  # a body of one chunk is not copied
    return hasher.finish()

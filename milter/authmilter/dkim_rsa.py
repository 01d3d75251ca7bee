"""dkimpy's RSA through OpenSSL (``cryptography``), and its hot regexes: the one place we patch dkimpy.

Why: dkimpy 1.1.8 does RSASSA-PKCS1-v1_5 (RFC 8017 §8.2) with Python's ``pow()``: about 8 ms per
RSA-2048 signature, on the milter's critical path for every signed message. OpenSSL does the same
operation in well under a millisecond. And its regex that empties the ``b=`` value before the
signature header is hashed (RFC 6376 §3.7) takes about 0.1 ms per signature, on the same path.

What is patched (by :func:`install`, once, at start; idempotent and thread-safe):
- ``dkim.RSASSA_PKCS1_v1_5_sign`` and ``dkim.RSASSA_PKCS1_v1_5_verify``: the names ``dkim/__init__.py``
  imported from ``dkim.crypto`` and calls in ``DomainSigner.gen_header`` (signing, DKIM and ARC) and
  ``DomainSigner.verify_sig_process`` (verifying ARC; dkim_verify.py calls :func:`rsa_verify` itself).
- ``dkim.RE_BTAG``: the module global ``hash_headers``, ``hash_headers_ed25519`` and
  ``DomainSigner.gen_header`` read at each call, replaced by :data:`B_TAG`, which makes the same
  substitutions (see there) in a tenth of the time.
- ``dkim.canonicalization``'s three regex helpers of the relaxed algorithm (RFC 6376 §3.4.2,
  §3.4.4), looked up at each call by ``Relaxed``: the same patterns compiled once (dkimpy passes
  pattern strings to ``re.sub``, a cache lookup per call, ~19 per message) and skipped when the
  text holds nothing they would change (a tab, two spaces, WSP before CRLF): a signed body is
  scanned, not copied; unfolding is two ``bytes.replace`` calls.

Nothing else: dkimpy still parses keys (``parse_pem_private_key`` / ``parse_public_key`` return dicts
of integers), canonicalizes and hashes. ``dkim.crypto`` itself is left alone, so its functions stay
the pure-Python reference.

Behaviour is byte-identical: PKCS#1 v1.5 signatures are deterministic, so for the same key and digest
OpenSSL and dkimpy produce the same bytes (``tests/test_dkim_rsa.py`` checks whole DKIM-Signature
headers). The only deliberate differences are on inputs no honest signer produces: a signature whose
integer is not below the modulus (dkimpy reduces it mod n and may accept it; RFC 8017 §5.2.2 says
"signature representative out of range") and keys OpenSSL refuses (even exponent, over 16384 bits),
both of which verify as False. A digest too large for the modulus raises dkimpy's own
``DigestTooLargeError`` in both implementations, which dkimpy turns into ``KeyFormatError``/
``ParameterError`` as before.

Loaded key objects are cached: building an OpenSSL private key checks it (~50 ms for RSA-2048), and
dkimpy hands us a fresh dict for every message, so the caches are keyed by the key's integers, not
by the dict's identity. Public keys come from DNS, so their cache is bounded too.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from functools import lru_cache
from types import ModuleType
from typing import Any, Protocol

import dkim
import dkim.canonicalization as canonicalization
import dkim.crypto
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

# A signer uses a handful of keys; verifiers see many domains but each key costs ~1 KiB.
PRIVATE_KEY_CACHE_SIZE = 64
PUBLIC_KEY_CACHE_SIZE = 2048

# The digests dkimpy asks for (HASH_ALGORITHMS: rsa-sha1 and rsa-sha256), by hashlib name.
# Both are stateless descriptions of the operation, so one of each serves every call.
_PREHASHED = {"sha1": Prehashed(hashes.SHA1()), "sha256": Prehashed(hashes.SHA256())}
_PKCS1_V1_5 = padding.PKCS1v15()

# RFC 8017 §9.2 note 1: DigestInfo is 35 octets for SHA-1, 51 for SHA-256, and EMSA-PKCS1-v1_5 needs
# 11 more; dkimpy raises DigestTooLargeError below that, and so must we.
_DIGEST_INFO_LENGTH = {"sha1": 35, "sha256": 51}

# dkimpy's pure-Python functions, kept for fallback (a private key OpenSSL refuses) and for tests.
# The signer returns a bytearray (dkim.crypto.int2str builds one).
pure_python_sign: Callable[[Any, Mapping[str, int]], bytearray] = dkim.crypto.RSASSA_PKCS1_v1_5_sign
pure_python_verify: Callable[[Any, bytes, Mapping[str, int]], bool] = dkim.crypto.RSASSA_PKCS1_v1_5_verify

# dkimpy's b= pattern is ``([;\s]b FWS =)(?: FWS [a-zA-Z0-9+/=])*(?:\r?\n\Z)?`` with
# FWS = ``(?:(?:\s*\r?\n)?\s+)?``: nested optional groups the engine re-enters for every base64
# character. As a language FWS is just ``\s*`` (CR and LF are \s), so this pattern matches where
# dkimpy's does (the whitespace up to "=" is forced), with the same end: the last base64 character
# of the run of whitespace and base64 after "=" (both take every "whitespace then base64
# character" step they can), then an optional final line break. One difference: the [;\s] before
# "b" is a lookbehind, not group 1's first octet, so that the pattern starts with a literal, which
# the engine finds with a fast scan instead of trying a class at every offset (a third of the
# time). That octet is left in place instead of being put back by \1, and it is never the end of
# an earlier match ([;\s] is no base64; a final line break ends the value), so the matches are
# dkimpy's one octet later and sub() gives the same bytes; tests/test_dkim_rsa.py compares both on
# generated values.
B_TAG = re.compile(rb"(b(?<=[;\s]b)\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")
# dkimpy's own, kept for tests.
dkimpy_b_tag: re.Pattern[bytes] = dkim.RE_BTAG

# dkim.canonicalization's patterns, as written there.
_WSP_BEFORE_CRLF = re.compile(rb"[\t ]+\r\n")
_WSP_RUN = re.compile(rb"[\t ]+")

_install_lock = threading.Lock()


def strip_trailing_whitespace(content: bytes) -> bytes:
    """RFC 6376 §3.4.4 a: delete WSP at the end of each line (dkimpy's, precompiled)."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _WSP_BEFORE_CRLF.sub(b"\r\n", content)


def compress_whitespace(content: bytes) -> bytes:
    """RFC 6376 §3.4.2/§3.4.4 b: each run of WSP becomes one SP (dkimpy's, precompiled)."""
    if b"\t" not in content and b"  " not in content:
        return content
    return _WSP_RUN.sub(b" ", content)


def unfold_header_value(content: bytes) -> bytes:
    """RFC 6376 §3.4.2: unfold, i.e. delete every line break (what dkimpy's regex deletes).

    Every field value ends in a line break, so this runs on each signed field: two replaces cost
    less than the regex. They delete the same octets: every LF, and a CR only where it stood
    right before an LF (a CR the first replace brings next to an LF stays).
    """
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


class HashLike(Protocol):
    """What dkimpy passes as ``hash``: a hashlib object or its ``HashThrough`` wrapper."""

    @property
    def name(self) -> str: ...

    def digest(self) -> bytes: ...


@lru_cache(maxsize=PRIVATE_KEY_CACHE_SIZE)
def _private_key(numbers: tuple[int, int, int, int, int, int, int, int]) -> rsa.RSAPrivateKey:
    n, e, d, p, q, dmp1, dmq1, iqmp = numbers
    public = rsa.RSAPublicNumbers(e, n)
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, public).private_key()


@lru_cache(maxsize=PUBLIC_KEY_CACHE_SIZE)
def _public_key(n: int, e: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(e, n).public_key()


def _modulus_length(modulus: int) -> int:
    return max(1, (modulus.bit_length() + 7) // 8)


def _check_digest_fits(hash_name: str, modulus: int) -> None:
    # Same test as dkim.crypto.EMSA_PKCS1_v1_5_encode (RFC 8017 §9.2 step 3).
    if _DIGEST_INFO_LENGTH[hash_name] + 11 > _modulus_length(modulus):
        raise dkim.crypto.DigestTooLargeError()


def rsa_sign(hash: HashLike, private_key: Mapping[str, int]) -> bytes:
    """RSASSA-PKCS1-v1_5 signature of a finished digest, as ``dkim.crypto.RSASSA_PKCS1_v1_5_sign``.

    Args:
        hash: the hash object dkimpy built (``name`` is ``sha1`` or ``sha256``).
        private_key: the dict returned by ``dkim.crypto.parse_private_key``.

    Returns:
        The signature, exactly as many octets as the modulus (RFC 8017 §8.2.1).

    Raises:
        dkim.crypto.DigestTooLargeError: the modulus is too short for the digest (as dkimpy).
    """
    hash_name = hash.name.lower()
    _check_digest_fits(hash_name, private_key["modulus"])
    try:
        key = _private_key(
            (
                private_key["modulus"],
                private_key["publicExponent"],
                private_key["privateExponent"],
                private_key["prime1"],
                private_key["prime2"],
                private_key["exponent1"],
                private_key["exponent2"],
                private_key["coefficient"],
            )
        )
    except (ValueError, UnsupportedAlgorithm):
        # OpenSSL refuses an inconsistent key; dkimpy signs with it anyway, so do what it does.
        return bytes(pure_python_sign(hash, private_key))
    return key.sign(hash.digest(), _PKCS1_V1_5, _PREHASHED[hash_name])


def rsa_verify(hash: HashLike, signature: bytes, public_key: Mapping[str, int]) -> bool:
    """Check an RSASSA-PKCS1-v1_5 signature, as ``dkim.crypto.RSASSA_PKCS1_v1_5_verify``.

    Args:
        hash: the hash object dkimpy built over the signed data.
        signature: the decoded ``b=`` value.
        public_key: the dict returned by ``dkim.crypto.parse_public_key``.

    Returns:
        True when the signature is valid; False for a wrong signature, a malformed one, or a key
        OpenSSL cannot use.

    Raises:
        dkim.crypto.DigestTooLargeError: the modulus is too short for the digest (as dkimpy).
    """
    hash_name = hash.name.lower()
    modulus = public_key["modulus"]
    _check_digest_fits(hash_name, modulus)
    # RFC 8017 §8.2.2 step 1 wants exactly k octets, but dkimpy reads the signature as an integer,
    # so a signer that dropped a leading zero octet still verifies there; pad to keep that.
    representative = int.from_bytes(signature, "big")
    if representative >= modulus:
        return False  # RFC 8017 §5.2.2: "signature representative out of range"
    padded = representative.to_bytes(_modulus_length(modulus), "big")
    try:
        key = _public_key(modulus, public_key["publicExponent"])
        key.verify(padded, hash.digest(), _PKCS1_V1_5, _PREHASHED[hash_name])
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


# What install() replaces: (module, name, our replacement, dkimpy's original as shipped).
PATCHES: tuple[tuple[ModuleType, str, object, object], ...] = (
    (dkim, "RSASSA_PKCS1_v1_5_sign", rsa_sign, pure_python_sign),
    (dkim, "RSASSA_PKCS1_v1_5_verify", rsa_verify, pure_python_verify),
    (dkim, "RE_BTAG", B_TAG, dkimpy_b_tag),
    *(
        (canonicalization, function.__name__, function, getattr(canonicalization, function.__name__))
        for function in (strip_trailing_whitespace, compress_whitespace, unfold_header_value)
    ),
)


def install() -> None:
    """Give dkimpy what :data:`PATCHES` lists: RSA through OpenSSL, :data:`B_TAG`, and the
    canonicalization helpers above.

    Idempotent, thread-safe. Call once at start (the pipeline does); until then dkimpy works
    unchanged, only slower.
    """
    with _install_lock:
        for module, name, ours, _ in PATCHES:
            setattr(module, name, ours)


def installed() -> bool:
    """True when dkimpy currently uses everything :data:`PATCHES` lists."""
    return all(getattr(module, name) is ours for module, name, ours, _ in PATCHES)

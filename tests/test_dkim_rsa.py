"""dkim_rsa: OpenSSL-backed RSA and the faster b= pattern give exactly dkimpy's own results."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import inspect
import random
import re
import time
from collections.abc import Iterator

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authmilter import dkim_rsa

MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\nHello.\r\n"
)
FROZEN = 1_700_000_000.0


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module", params=[2048, 1024], ids=["rsa2048", "rsa1024"])
def key(request: pytest.FixtureRequest) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, request.param)


@pytest.fixture
def pure_python(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """dkimpy as shipped, even if another test installed the adapter."""
    as_shipped(monkeypatch)
    yield


@pytest.fixture
def openssl(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The adapter installed; monkeypatch puts dkimpy back afterwards."""
    installed_here(monkeypatch)
    yield


def as_shipped(patch: pytest.MonkeyPatch) -> None:
    for module, name, _, original in dkim_rsa.PATCHES:
        patch.setattr(module, name, original)


def installed_here(patch: pytest.MonkeyPatch) -> None:
    """install(), undone by ``patch`` at its end."""
    for module, name, _, _ in dkim_rsa.PATCHES:
        patch.setattr(module, name, getattr(module, name))
    dkim_rsa.install()


def _sign(pem: bytes, algorithm: bytes, canonicalize: tuple[bytes, bytes]) -> bytes:
    return bytes(
        dkim.sign(
            MESSAGE, b"sel", b"example.org", pem, signature_algorithm=algorithm, canonicalize=canonicalize
        )
    )


def _public_dict(key: rsa.RSAPrivateKey) -> dict[str, int]:
    numbers = key.public_key().public_numbers()
    return {"modulus": numbers.n, "publicExponent": numbers.e}


def _private_dict(key: rsa.RSAPrivateKey) -> dict[str, int]:
    return dict(dkim.crypto.parse_pem_private_key(_pem(key)))


# --- install ---------------------------------------------------------------------------------


def test_install_patches_dkimpy_once_and_leaves_dkim_crypto_alone(openssl: None) -> None:
    assert dkim_rsa.installed()
    dkim_rsa.install()  # idempotent
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkim_rsa.rsa_sign
    assert dkim.RSASSA_PKCS1_v1_5_verify is dkim_rsa.rsa_verify
    assert dkim.RE_BTAG is dkim_rsa.B_TAG
    assert dkim.crypto.RSASSA_PKCS1_v1_5_sign is dkim_rsa.pure_python_sign


def test_not_installed_means_pure_python(pure_python: None) -> None:
    assert not dkim_rsa.installed()


@pytest.mark.parametrize("patched", range(len(dkim_rsa.PATCHES)))
def test_installed_needs_every_patch(openssl: None, monkeypatch: pytest.MonkeyPatch, patched: int) -> None:
    module, name, _, original = dkim_rsa.PATCHES[patched]
    monkeypatch.setattr(module, name, original)
    assert not dkim_rsa.installed()


# --- the canonicalization helpers ---------------------------------------------------------------

CANONICALIZATION_SAMPLES = [
    b"",
    b"plain text\r\n",
    b"two  spaces\tand a tab \r\nnext \t \r\n\r\n",
    b"folded:\r\n continuation\n bare LF\r\n",
    b" \t\t ",
    b"\r\n\r\n",
    b"trailing tab\t\r\n",
    b"no line end  ",
]


@pytest.mark.parametrize("index", range(3, len(dkim_rsa.PATCHES)))
def test_canonicalization_helpers_give_dkimpys_results(index: int) -> None:
    _, name, ours, original = dkim_rsa.PATCHES[index]
    assert callable(ours) and callable(original) and ours is not original
    rng = random.Random(index)
    generated = [bytes(rng.choice(b" \t\r\nab") for _ in range(rng.randrange(40))) for _ in range(3000)]
    for sample in [*CANONICALIZATION_SAMPLES, *generated]:
        assert ours(sample) == original(sample), (name, sample)


# --- the b= pattern --------------------------------------------------------------------------


def test_dkimpy_b_tag_is_the_pattern_replaced() -> None:
    # If a dkimpy upgrade changes its pattern, B_TAG's equivalence must be shown again.
    fws = rb"(?:(?:\s*\r?\n)?\s+)?"
    expected = rb"([;\s]b" + fws + rb"=)(?:" + fws + rb"[a-zA-Z0-9+/=])*(?:\r?\n\Z)?"
    assert dkim_rsa.dkimpy_b_tag.pattern == expected
    assert dkim_rsa.dkimpy_b_tag is not dkim_rsa.B_TAG


# Whitespace within a line, then folding (or broken line ends); \x0b and \x0c are \s too.
_WSP = [b"", b"", b" ", b"\t", b"  ", b"\x0b", b"\x0c"]
_FWS = [*_WSP, b"\r\n ", b"\r\n\t", b"\n ", b"\r\n", b"\n", b"\r", b" \r\n  "]
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_TAG_NAMES = [*b"v a c d s h i t l b b bh B bb hb".split(), b""]
_HOSTILE = [*(bytes([octet]) for octet in b"b=; \t\r\na0+/-:\xff"), b"\r\n", b"b="]


def _tag_value(rng: random.Random) -> bytes:
    chunks = []
    for _ in range(rng.choice([0, 1, 1, 2, 5])):
        alphabet = _BASE64 if rng.random() < 0.8 else b"ab=:-.@ \xff"
        chunks.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 12))))
    return b"".join(rng.choice(_FWS) + chunk for chunk in chunks) + rng.choice(_FWS)


def _signature_value(rng: random.Random) -> bytes:
    """A DKIM-Signature value as dkimpy hashes it: tags, folding, several b= and bh=, endings."""
    if rng.random() < 0.2:
        return b"".join(rng.choice(_HOSTILE) for _ in range(rng.randint(0, 30)))
    tags = [
        rng.choice(_FWS) + rng.choice(_TAG_NAMES) + rng.choice(_FWS) + b"=" + _tag_value(rng)
        for _ in range(rng.randint(0, 6))
    ]
    value = rng.choice([b";", b"; ", b" ;", b";\r\n\t"]).join(tags)
    return (
        rng.choice([b"", b" ", b"\t", b";"])
        + value
        + rng.choice([b"", b";", b"\r\n", b"\n", b" \r\n", b"\r\n\r\n"])
    )


def _matches(pattern: re.Pattern[bytes], value: bytes) -> list[tuple[tuple[int, int], bytes]]:
    return [(match.span(), match.group(1)) for match in pattern.finditer(value)]


def _dkimpy_matches(value: bytes) -> list[tuple[tuple[int, int], bytes]]:
    """dkimpy's matches as B_TAG's: B_TAG leaves the [;\\s] octet before "b" out of the match."""
    return [((start + 1, end), group[1:]) for (start, end), group in _matches(dkim_rsa.dkimpy_b_tag, value)]


def test_b_tag_pattern_substitutes_exactly_like_dkimpys() -> None:
    rng = random.Random(6376)
    matched = 0
    for _ in range(12000):
        value = _signature_value(rng)
        expected = _dkimpy_matches(value)
        assert _matches(dkim_rsa.B_TAG, value) == expected, value
        assert dkim_rsa.B_TAG.sub(rb"\1", value) == dkim_rsa.dkimpy_b_tag.sub(rb"\1", value), value
        matched += bool(expected)
    assert matched > 3000  # the generator reaches b= tags, not only values without one


@pytest.mark.parametrize(
    "value",
    [
        b" v=1; a=rsa-sha256; b=abc/+d\r\n e==; bh=xyz=\r\n",
        b"b=abc; b=def",  # no delimiter before the first b=
        b" b=abc\r\n",
        b" b=abc \r\n",  # space before the final CRLF: the CRLF stays
        b" b=\r\n",
        b";b =\r\n abc;b\t=de\r\n\r\n",
        b" b=ab-cd; bh=x",
        b";b=" + b"A" * 5000 + b"\r\n",
    ],
)
def test_b_tag_pattern_on_chosen_values(value: bytes) -> None:
    assert _matches(dkim_rsa.B_TAG, value) == _dkimpy_matches(value)
    assert dkim_rsa.B_TAG.sub(rb"\1", value) == dkim_rsa.dkimpy_b_tag.sub(rb"\1", value)


# --- byte-identical signatures ---------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [b"rsa-sha256", b"rsa-sha1"])
@pytest.mark.parametrize("canonicalize", [(b"relaxed", b"simple"), (b"simple", b"relaxed")])
def test_signatures_are_byte_identical(
    key: rsa.RSAPrivateKey,
    algorithm: bytes,
    canonicalize: tuple[bytes, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time", lambda: FROZEN)  # dkim.sign writes t= from the clock
    pem = _pem(key)
    with monkeypatch.context() as patch:
        as_shipped(patch)
        reference = _sign(pem, algorithm, canonicalize)
    with monkeypatch.context() as patch:
        installed_here(patch)
        adapted = _sign(pem, algorithm, canonicalize)
    assert adapted == reference
    assert b"b=" in adapted and b"t=1700000000" in adapted


def test_raw_signature_matches_for_both_hashes(key: rsa.RSAPrivateKey) -> None:
    private = _private_dict(key)
    for digest in (hashlib.sha256(b"data"), hashlib.sha1(b"data")):
        assert dkim_rsa.rsa_sign(digest, private) == bytes(dkim_rsa.pure_python_sign(digest, private))


def test_private_keys_are_cached_by_value(key: rsa.RSAPrivateKey) -> None:
    # dkimpy parses the PEM anew for every message: a fresh dict must still hit the cache.
    first, second = _private_dict(key), _private_dict(key)
    assert first is not second
    dkim_rsa.rsa_sign(hashlib.sha256(b"x"), first)
    hits = dkim_rsa._private_key.cache_info().hits
    dkim_rsa.rsa_sign(hashlib.sha256(b"x"), second)
    assert dkim_rsa._private_key.cache_info().hits == hits + 1


def test_inconsistent_private_key_signs_like_dkimpy(key: rsa.RSAPrivateKey) -> None:
    broken = _private_dict(key) | {"privateExponent": 12345}  # OpenSSL refuses it; dkimpy uses the CRT parts
    digest = hashlib.sha256(b"data")
    assert dkim_rsa.rsa_sign(digest, broken) == bytes(dkim_rsa.pure_python_sign(digest, broken))


# --- verification agrees ---------------------------------------------------------------------


def _signed_digest(key: rsa.RSAPrivateKey) -> tuple[bytes, dict[str, int]]:
    return bytes(dkim_rsa.pure_python_sign(hashlib.sha256(b"payload"), _private_dict(key))), _public_dict(key)


def _both(digest_data: bytes, signature: bytes, public: dict[str, int]) -> tuple[bool, bool]:
    digest = hashlib.sha256(digest_data)
    return (
        dkim_rsa.rsa_verify(digest, signature, public),
        bool(dkim_rsa.pure_python_verify(hashlib.sha256(digest_data), signature, public)),
    )


def test_verify_accepts_and_rejects_like_dkimpy(key: rsa.RSAPrivateKey) -> None:
    signature, public = _signed_digest(key)
    assert _both(b"payload", signature, public) == (True, True)
    assert _both(b"payloaD", signature, public) == (False, False)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert _both(b"payload", flipped, public) == (False, False)
    other = _public_dict(rsa.generate_private_key(65537, 1024))
    assert _both(b"payload", signature, other) == (False, False)


def test_signature_without_its_leading_zero_octet_verifies_like_dkimpy(key: rsa.RSAPrivateKey) -> None:
    # Find a message whose signature starts with 0x00 (1 in 256), then drop that octet.
    private, public = _private_dict(key), _public_dict(key)
    for counter in range(5000):
        data = b"payload %d" % counter
        signature = bytes(dkim_rsa.pure_python_sign(hashlib.sha256(data), private))
        if signature[0] == 0:
            assert _both(data, signature[1:], public) == (True, True)
            return
    pytest.fail("no signature with a leading zero octet in 5000 tries")


@pytest.mark.parametrize(
    "signature",
    [b"", b"\x00", b"not a signature", b"\xff" * 600],
    ids=["empty", "zero", "short", "longer-than-modulus"],
)
def test_malformed_signature_is_false_not_an_exception(key: rsa.RSAPrivateKey, signature: bytes) -> None:
    assert dkim_rsa.rsa_verify(hashlib.sha256(b"payload"), signature, _public_dict(key)) is False


@pytest.mark.parametrize(
    "public",
    [
        {"modulus": (1 << 2048) + 2, "publicExponent": 65537},
        {"modulus": (1 << 2047) + 1, "publicExponent": 2},
    ],
    ids=["even-modulus", "even-exponent"],
)
def test_malformed_key_is_false_not_an_exception(key: rsa.RSAPrivateKey, public: dict[str, int]) -> None:
    signature, _ = _signed_digest(key)
    assert dkim_rsa.rsa_verify(hashlib.sha256(b"payload"), signature, public) is False


def test_modulus_too_small_for_the_digest_raises_dkimpy_error() -> None:
    tiny = {"modulus": (1 << 400) + 1, "publicExponent": 65537}
    with pytest.raises(dkim.crypto.DigestTooLargeError):
        dkim_rsa.pure_python_verify(hashlib.sha256(b"x"), b"\x01", tiny)
    with pytest.raises(dkim.crypto.DigestTooLargeError):
        dkim_rsa.rsa_verify(hashlib.sha256(b"x"), b"\x01", tiny)


def test_dkim_verify_round_trip_through_the_adapter(key: rsa.RSAPrivateKey, openssl: None) -> None:
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    signed = _sign(_pem(key), b"rsa-sha256", (b"relaxed", b"relaxed")) + MESSAGE
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)
    assert not dkim.verify(signed.replace(b"Hello.", b"Hullo."), dnsfunc=lambda name, timeout=5: record)


# What dkim_rsa.py was tested against (dkimpy 1.1.8): the source of each dkimpy object it replaces
# (PATCHES) and of the dkimpy code that calls them by the patched name. sha256 of inspect.getsource
# (of the pattern text for RE_BTAG), first 16 hex digits.
TESTED_DKIMPY = "1.1.8"
TESTED_SOURCES = {
    "dkim.RSASSA_PKCS1_v1_5_sign": "88352188b2ba2ad9",
    "dkim.RSASSA_PKCS1_v1_5_verify": "8398ae89bb481414",
    "dkim.RE_BTAG": "9462d3ccdeee123a",
    "dkim.canonicalization.strip_trailing_whitespace": "07ef48de2ef08e4b",
    "dkim.canonicalization.compress_whitespace": "7ee4d82e06fc310a",
    "dkim.canonicalization.unfold_header_value": "28ed65c29158c5a4",
    "dkim.hash_headers": "216b8155ca91b6f8",
    "dkim.hash_headers_ed25519": "588e63563ac6fe29",
    "dkim.DomainSigner.gen_header": "e86f61152fe59398",
    "dkim.DomainSigner.verify_sig_process": "ab008897178aa566",
    "dkim.canonicalization.Relaxed": "47cb7b7e4754edf7",
}


def _source_digest(thing: object) -> str:
    text = thing.pattern if isinstance(thing, re.Pattern) else inspect.getsource(thing)  # type: ignore[arg-type]
    data = text if isinstance(text, bytes) else text.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _dkimpy_sources() -> dict[str, str]:
    originals = {f"{module.__name__}.{name}": dkimpys for module, name, _, dkimpys in dkim_rsa.PATCHES}
    callers = {
        "dkim.hash_headers": dkim.hash_headers,
        "dkim.hash_headers_ed25519": dkim.hash_headers_ed25519,
        "dkim.DomainSigner.gen_header": dkim.DomainSigner.gen_header,
        "dkim.DomainSigner.verify_sig_process": dkim.DomainSigner.verify_sig_process,
        "dkim.canonicalization.Relaxed": dkim.canonicalization.Relaxed,
    }
    return {name: _source_digest(thing) for name, thing in {**originals, **callers}.items()}


def test_patched_dkimpy_code_is_what_the_adapter_was_tested_with() -> None:
    changed = sorted(name for name, digest in _dkimpy_sources().items() if TESTED_SOURCES.get(name) != digest)
    assert not changed, (
        f"dkimpy {importlib.metadata.version('dkimpy')} changed {', '.join(changed)} since dkimpy "
        f"{TESTED_DKIMPY}, which milter/authmilter/dkim_rsa.py patches or relies on. Re-check that each "
        "patch in dkim_rsa.PATCHES still replaces the same behaviour (its docstring lists the call "
        "sites), run tests/test_dkim_rsa.py, then update TESTED_SOURCES and the dkimpy pin in pyproject.toml."
    )

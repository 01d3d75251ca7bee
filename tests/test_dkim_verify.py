"""verify_dkim: generated keys signed with dkimpy, keys served from zone files through our Resolver."""

from __future__ import annotations

import base64
import hashlib
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.name
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from authmilter import dkim_rsa, dkim_verify
from authmilter.dkim_body import RELAXED, SIMPLE, BodyDigests, BodyHasher, BodyHashSpec, digest_body
from authmilter.dkim_verify import FUTURE_TIMESTAMP_SKEW, DkimSettings, verify_dkim
from authmilter.message import HeaderField
from authmilter.model import AuthResult, DkimResult
from authmilter.resolver import DnsAnswer, Resolver, ZoneFileSource, tempfail
from signing import small_rsa_key

DOMAIN = "example.org"
NOW = 1_700_000_000
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"the numbers are attached.\r\n"
)
SIGNED = (b"from", b"to", b"subject", b"date", b"message-id")


# --- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    algorithm: bytes  # the a= this key signs with
    private: bytes  # what dkimpy's sign() takes
    public_b64: str  # the p= value

    @property
    def record(self) -> str:
        return f"v=DKIM1; k={self.algorithm.split(b'-')[0].decode()}; p={self.public_b64}"


def rsa_key(private_key: rsa.RSAPrivateKey) -> Key:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(b"rsa-sha256", pem, base64.b64encode(der).decode())


def ed25519_key() -> Key:
    private_key = ed25519.Ed25519PrivateKey.generate()
    seed = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Key(b"ed25519-sha256", base64.b64encode(seed), base64.b64encode(public).decode())


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "rsa2048": rsa_key(rsa.generate_private_key(65537, 2048)),
        "rsa1024": rsa_key(rsa.generate_private_key(65537, 1024)),
        "rsa768": rsa_key(small_rsa_key(768)),
        "ed25519": ed25519_key(),
    }


# --- DNS -------------------------------------------------------------------------------------


def _quoted(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    # RFC 1035 §3.3.14: one character-string holds at most 255 octets; RFC 6376 §3.6.2.2 joins them.
    return " ".join(f'"{escaped[i : i + 200]}"' for i in range(0, len(escaped), 200)) or '""'


def resolver_for(tmp_path: Path, records: Mapping[str, Sequence[str]]) -> Resolver:
    """A Resolver over one zone file for DOMAIN holding the given TXT records (absolute names)."""
    lines = [f"$ORIGIN {DOMAIN}.", "$TTL 300"]
    for name, texts in records.items():
        lines += [f"{name}. IN TXT {_quoted(text)}" for text in texts]
    path = tmp_path / f"{DOMAIN}.zone"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Resolver(ZoneFileSource([path]))


def key_name(selector: str = "sel", domain: str = DOMAIN) -> str:
    return f"{selector}._domainkey.{domain}"


# --- signing ---------------------------------------------------------------------------------


def sign(message: bytes, key: Key, selector: str = "sel", **kwargs: object) -> bytes:
    """dkimpy's public signer; returns the signed message."""
    signature = dkim.sign(
        message,
        selector.encode(),
        DOMAIN.encode(),
        key.private,
        signature_algorithm=key.algorithm,
        include_headers=list(SIGNED),
        **kwargs,
    )
    return bytes(signature) + message


def sign_with_tags(
    message: bytes,
    key: Key,
    tags: Iterable[tuple[bytes, bytes]] = (),
    headers: Sequence[bytes] = SIGNED,
    algorithm: bytes | None = None,
    selector: str = "sel",
) -> bytes:
    """A valid signature with tags dkim.sign() cannot write (x=, a future t=, h= without From).

    Built on dkimpy's own DomainSigner.gen_header, the routine dkim.sign() ends in.
    """
    algorithm = algorithm or key.algorithm
    signer = dkim.DKIM(message, signature_algorithm=algorithm)
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/simple")
    signer.hasher = dkim.HASH_ALGORITHMS[algorithm]
    body_hash = base64.b64encode(signer.hasher(policy.canonicalize_body(signer.body)).digest())
    if algorithm.startswith(b"rsa"):
        private = dkim.crypto.parse_pem_private_key(key.private)
    else:
        import nacl.encoding
        import nacl.signing

        private = nacl.signing.SigningKey(key.private, encoder=nacl.encoding.Base64Encoder)
    fields = [
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", b"relaxed/simple"),
        (b"d", DOMAIN.encode()),
        (b"s", selector.encode()),
        *tags,
        (b"h", b" : ".join(headers)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),
    ]
    value = signer.gen_header(fields, list(headers), policy, b"DKIM-Signature", private)
    return b"DKIM-Signature: " + bytes(value) + message


def only(results: tuple[DkimResult, ...]) -> DkimResult:
    assert len(results) == 1, results
    return results[0]


SETTINGS = DkimSettings()


# --- passing signatures ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rsa2048", "rsa1024", "ed25519"])
def test_signature_passes_and_is_described(tmp_path: Path, keys: dict[str, Key], name: str) -> None:
    key = keys[name]
    signed = sign(MESSAGE, key, identity=b"alice@" + DOMAIN.encode())
    resolver = resolver_for(tmp_path, {key_name(): [key.record]})
    result = only(verify_dkim(signed, resolver, SETTINGS))
    b_value = dkim.util.parse_tag_value(signed.split(b"\r\n\r\n")[0].split(b"DKIM-Signature:")[1])[b"b"]
    assert result == DkimResult(
        result=AuthResult.PASS,
        domain=DOMAIN,
        selector="sel",
        algorithm=key.algorithm.decode(),
        reason="",
        header_b=b"".join(b_value.split())[:8].decode(),
        identity="alice@example.org",
        testing=False,
    )


def test_bare_lf_message_verifies_like_crlf(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign(MESSAGE, keys["rsa2048"])
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    assert only(verify_dkim(signed.replace(b"\r\n", b"\n"), resolver, SETTINGS)).result is AuthResult.PASS


def test_each_signature_gets_its_own_result_in_header_order(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign(sign(MESSAGE, keys["ed25519"], selector="ed"), keys["rsa2048"], selector="rsa")
    tampered_rsa_key = keys["rsa1024"].record  # a different key: the rsa signature fails
    resolver = resolver_for(
        tmp_path, {key_name("ed"): [keys["ed25519"].record], key_name("rsa"): [tampered_rsa_key]}
    )
    results = verify_dkim(signed, resolver, SETTINGS)
    assert [(r.selector, r.result) for r in results] == [("rsa", AuthResult.FAIL), ("ed", AuthResult.PASS)]


# --- failures in the message -----------------------------------------------------------------


def test_tampered_body_fails(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign(MESSAGE, keys["rsa2048"]).replace(b"numbers are", b"numbers were")
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    result = only(verify_dkim(signed, resolver, SETTINGS))
    assert (result.result, result.reason) == (AuthResult.FAIL, "body hash did not verify")


@pytest.mark.parametrize("name", ["rsa2048", "ed25519"])
def test_tampered_header_fails(tmp_path: Path, keys: dict[str, Key], name: str) -> None:
    signed = sign(MESSAGE, keys[name]).replace(b"Subject: quarterly", b"Subject: monthly")
    resolver = resolver_for(tmp_path, {key_name(): [keys[name].record]})
    result = only(verify_dkim(signed, resolver, SETTINGS))
    assert (result.result, result.reason) == (AuthResult.FAIL, "signature did not verify")


def test_added_from_header_fails(tmp_path: Path, keys: dict[str, Key]) -> None:
    # A second From (not covered by the signature) must not ride along (dkimpy bug 644046).
    signed = sign(MESSAGE, keys["rsa2048"]).replace(b"To: Bob", b"From: mallory@example.com\r\nTo: Bob")
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    assert only(verify_dkim(signed, resolver, SETTINGS)).result is AuthResult.FAIL


def test_rsa_sha1_fails_even_when_the_signature_is_good(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign_with_tags(MESSAGE, keys["rsa2048"], algorithm=b"rsa-sha1")
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: keys["rsa2048"].record.encode())
    result = only(verify_dkim(signed, resolver, SETTINGS))
    assert result.result is AuthResult.FAIL and "RFC 8301" in result.reason
    assert result.algorithm == "rsa-sha1"


def test_rsa_768_key_fails_as_too_small(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign(MESSAGE, keys["rsa768"])
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa768"].record]})
    result = only(verify_dkim(signed, resolver, SETTINGS))
    assert (result.result, result.reason) == (AuthResult.FAIL, "key too small: 768 bits")


def test_min_rsa_bits_setting_rejects_1024(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign(MESSAGE, keys["rsa1024"])
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa1024"].record]})
    result = only(verify_dkim(signed, resolver, DkimSettings(min_rsa_bits=2048)))
    assert (result.result, result.reason) == (AuthResult.FAIL, "key too small: 1024 bits")


# --- time ------------------------------------------------------------------------------------


def test_expiry_follows_now_not_the_clock(
    tmp_path: Path, keys: dict[str, Key], monkeypatch: pytest.MonkeyPatch
) -> None:
    tags = [(b"t", str(NOW).encode()), (b"x", str(NOW + 3600).encode())]
    signed = sign_with_tags(MESSAGE, keys["rsa2048"], tags)
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    monkeypatch.setattr(time, "time", lambda: 4_000_000_000.0)  # far past x=: must not matter
    assert only(verify_dkim(signed, resolver, SETTINGS, now=NOW + 60)).result is AuthResult.PASS
    expired = only(verify_dkim(signed, resolver, SETTINGS, now=NOW + 2 * 3600))
    assert (expired.result, expired.reason) == (AuthResult.FAIL, "signature expired")


def test_x_before_t_is_a_permerror(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign_with_tags(
        MESSAGE, keys["rsa2048"], [(b"t", str(NOW).encode()), (b"x", str(NOW - 1).encode())]
    )
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    assert only(verify_dkim(signed, resolver, SETTINGS, now=NOW)).result is AuthResult.PERMERROR


def test_timestamp_in_the_future(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign_with_tags(MESSAGE, keys["rsa2048"], [(b"t", str(NOW).encode())])
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    within = only(verify_dkim(signed, resolver, SETTINGS, now=NOW - FUTURE_TIMESTAMP_SKEW + 10))
    assert within.result is AuthResult.PASS
    beyond = only(verify_dkim(signed, resolver, SETTINGS, now=NOW - FUTURE_TIMESTAMP_SKEW - 10))
    assert (beyond.result, beyond.reason) == (AuthResult.PERMERROR, "signature timestamp in the future")


# --- malformed signatures --------------------------------------------------------------------


def test_from_not_signed_is_a_permerror(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign_with_tags(MESSAGE, keys["rsa2048"], headers=(b"to", b"subject", b"date"))
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: keys["rsa2048"].record.encode())
    result = only(verify_dkim(signed, resolver, SETTINGS))
    assert (result.result, result.reason) == (AuthResult.PERMERROR, "From field not signed")


@pytest.mark.parametrize(
    ("header", "domain", "selector"),
    [
        (b"DKIM-Signature: this is not a tag list\r\n", "", ""),
        (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; d=evil.example\r\n", "", "sel"),
        (
            b"DKIM-Signature: v=1; a=rsa-sha256; d=Example.ORG; s=sel; h=from; bh=AAAA\r\n",
            "example.org",
            "sel",
        ),
        (
            b"DKIM-Signature: v=2; a=rsa-sha256; d=example.org; s=sel; h=from; bh=AAAA; b=AAAA\r\n",
            "example.org",
            "sel",
        ),
        (
            b"DKIM-Signature: v=1; a=rsa-md5; d=example.org; s=sel; h=from; bh=AAAA; b=AAAA\r\n",
            "example.org",
            "sel",
        ),
        (
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from; bh=AA; b=AAAA\r\n",
            "example.org",
            "sel",
        ),
    ],
    ids=["garbage", "duplicate-tag", "missing-b", "version-2", "unknown-algorithm", "bad-base64-bh"],
)
def test_malformed_signature_is_a_permerror(
    tmp_path: Path, header: bytes, domain: str, selector: str
) -> None:
    resolver = resolver_for(tmp_path, {})
    result = only(verify_dkim(header + MESSAGE, resolver, SETTINGS))
    assert (result.result, result.domain, result.selector) == (AuthResult.PERMERROR, domain, selector)
    assert result.reason


def test_identity_outside_d_is_a_permerror(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign_with_tags(MESSAGE, keys["rsa2048"], [(b"i", b"alice@example.com")])
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    assert only(verify_dkim(signed, resolver, SETTINGS)).result is AuthResult.PERMERROR


# --- key records -----------------------------------------------------------------------------


class StubSource:
    """A DnsSource answering every query the same way (TEMPFAIL cannot be written in a zone file)."""

    def __init__(self, answer: DnsAnswer, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        time.sleep(self.delay)
        return self.answer


def test_dns_tempfail_is_a_temperror(keys: dict[str, Key]) -> None:
    signed = sign(MESSAGE, keys["rsa2048"])
    result = only(verify_dkim(signed, Resolver(StubSource(tempfail("SERVFAIL"))), SETTINGS))
    assert (result.result, result.reason) == (AuthResult.TEMPERROR, "key unavailable: SERVFAIL")


def test_no_key_record_is_a_permerror(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign(MESSAGE, keys["rsa2048"])
    # NXDOMAIN: the selector does not exist; NODATA: a name below it exists, so it has no TXT.
    for records in ({}, {"deeper." + key_name(): ["v=DKIM1; p=AAAA"]}):
        result = only(verify_dkim(signed, resolver_for(tmp_path, records), SETTINGS))
        assert (result.result, result.reason) == (AuthResult.PERMERROR, "no key record")


@pytest.mark.parametrize(
    ("record", "result", "reason"),
    [
        ("v=DKIM1; k=rsa; p=not!!base64=", AuthResult.PERMERROR, "key syntax error"),
        ("v=DKIM1; k=rsa; p=QUJD", AuthResult.PERMERROR, "key syntax error"),
        ("v=DKIM1; k=rsa; p=", AuthResult.FAIL, "key revoked"),
        ("v=DKIM2; k=rsa; p={p}", AuthResult.PERMERROR, "key syntax error: v= is not DKIM1"),
        ("v=DKIM1; k=rsa", AuthResult.PERMERROR, "key syntax error: no p="),
        ("v=DKIM1; k=dsa; p={p}", AuthResult.PERMERROR, "key syntax error: unknown k=dsa"),
        ("v=DKIM1; k=ed25519; p={p}", AuthResult.PERMERROR, "inappropriate key algorithm"),
        ("v=DKIM1; h=sha1; k=rsa; p={p}", AuthResult.PERMERROR, "inappropriate hash algorithm"),
        ("v=DKIM1; s=tlsrpt; k=rsa; p={p}", AuthResult.PERMERROR, "key not for email"),
        ("v=DKIM1 k=rsa p={p}", AuthResult.PERMERROR, "key syntax error"),
        ("v=DKIM1; h=sha1:sha256; s=email:tlsrpt; k=rsa; p={p}", AuthResult.PASS, ""),
    ],
    ids=[
        "bad-base64",
        "not-a-key",
        "revoked",
        "version",
        "no-p",
        "unknown-k",
        "k-mismatch",
        "h-mismatch",
        "service",
        "no-separators",
        "lists-accepted",
    ],
)
def test_key_record_problems(
    tmp_path: Path, keys: dict[str, Key], record: str, result: AuthResult, reason: str
) -> None:
    key = keys["rsa2048"]
    signed = sign(MESSAGE, key)
    resolver = resolver_for(tmp_path, {key_name(): [record.format(p=key.public_b64)]})
    got = only(verify_dkim(signed, resolver, SETTINGS))
    assert got.result is result
    assert got.reason.startswith(reason)


def test_first_usable_key_record_wins(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign(MESSAGE, keys["rsa2048"])
    resolver = resolver_for(tmp_path, {key_name(): ["v=DKIM1; k=rsa; p=QUJD", keys["rsa2048"].record]})
    assert only(verify_dkim(signed, resolver, SETTINGS)).result is AuthResult.PASS


def test_testing_flag_is_reported_and_the_result_stands(tmp_path: Path, keys: dict[str, Key]) -> None:
    key = keys["rsa2048"]
    signed = sign(MESSAGE, key)
    plain = only(verify_dkim(signed, resolver_for(tmp_path, {key_name(): [key.record]}), SETTINGS))
    testing = resolver_for(tmp_path, {key_name(): [f"v=DKIM1; t=y; p={key.public_b64}"]})
    flagged = only(verify_dkim(signed, testing, SETTINGS))
    assert (plain.result, plain.testing) == (AuthResult.PASS, False)
    assert (flagged.result, flagged.testing) == (AuthResult.PASS, True)
    bad = only(verify_dkim(signed.replace(b"Hello", b"Hullo"), testing, SETTINGS))
    assert (bad.result, bad.testing) == (AuthResult.FAIL, True)


def test_strict_key_refuses_subdomain_identity(tmp_path: Path, keys: dict[str, Key]) -> None:
    key = keys["rsa2048"]
    strict = {key_name(): [f"v=DKIM1; t=s; p={key.public_b64}"]}
    same = sign(MESSAGE, key, identity=b"alice@example.org")
    sub = sign(MESSAGE, key, identity=b"alice@mail.example.org")
    assert only(verify_dkim(same, resolver_for(tmp_path, strict), SETTINGS)).result is AuthResult.PASS
    assert only(verify_dkim(sub, resolver_for(tmp_path, strict), SETTINGS)).result is AuthResult.PERMERROR


# --- l= --------------------------------------------------------------------------------------


def test_body_length_is_noted_in_the_reason(tmp_path: Path, keys: dict[str, Key]) -> None:
    key = keys["rsa2048"]
    signed = sign(MESSAGE, key, length=True)
    resolver = resolver_for(tmp_path, {key_name(): [key.record]})
    whole = only(verify_dkim(signed, resolver, SETTINGS))
    assert (whole.result, whole.reason) == (AuthResult.PASS, "l=39, whole body signed")
    appended = only(verify_dkim(signed + b"Buy now!\r\n", resolver, SETTINGS))
    assert (appended.result, appended.reason) == (AuthResult.PASS, "l=39, 10 body octets unsigned")
    changed = only(verify_dkim(signed.replace(b"Hello", b"Hullo"), resolver, SETTINGS))
    assert changed.result is AuthResult.FAIL


def test_body_length_beyond_the_body_fails(tmp_path: Path, keys: dict[str, Key]) -> None:
    key = keys["rsa2048"]
    signed = sign_with_tags(MESSAGE, key, [(b"l", b"4096")])
    result = only(verify_dkim(signed, resolver_for(tmp_path, {key_name(): [key.record]}), SETTINGS))
    assert (result.result, result.reason) == (AuthResult.FAIL, "l=4096 is longer than the body (39)")


# --- limits and settings ---------------------------------------------------------------------


def test_signatures_beyond_the_limit_are_reported_as_policy(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = MESSAGE
    for selector in ("s3", "s2", "s1"):
        signed = sign(signed, keys["ed25519"], selector=selector)
    resolver = resolver_for(tmp_path, {key_name(s): [keys["ed25519"].record] for s in ("s1", "s2", "s3")})
    results = verify_dkim(signed, resolver, DkimSettings(max_signatures=2))
    assert [(r.selector, r.result) for r in results] == [
        ("s1", AuthResult.PASS),
        ("s2", AuthResult.PASS),
        ("s3", AuthResult.POLICY),
    ]
    assert results[2].reason == "not checked: more than 2 signatures"
    assert (results[2].domain, results[2].algorithm) == (DOMAIN, "ed25519-sha256")
    assert resolver.queries == 2


def test_time_budget_turns_late_signatures_into_temperror(keys: dict[str, Key]) -> None:
    signed = sign(sign(MESSAGE, keys["rsa2048"], selector="b"), keys["rsa2048"], selector="a")
    slow = Resolver(StubSource(tempfail("slow"), delay=0.2))
    results = verify_dkim(signed, slow, DkimSettings(timeout=0.1))
    assert [r.result for r in results] == [AuthResult.TEMPERROR, AuthResult.TEMPERROR]
    assert results[0].reason == "key unavailable: slow"
    assert results[1].reason.startswith("not checked: DKIM time limit")
    assert slow.queries == 1


def test_disabled_and_unsigned_give_no_results(tmp_path: Path) -> None:
    resolver = resolver_for(tmp_path, {})
    assert verify_dkim(MESSAGE, resolver, SETTINGS) == ()
    assert verify_dkim(b"DKIM-Signature: x\r\n" + MESSAGE, resolver, DkimSettings(enabled=False)) == ()


@pytest.mark.parametrize(
    "kwargs", [{"max_signatures": -1}, {"min_rsa_bits": 768}, {"timeout": 0}], ids=["max", "bits", "timeout"]
)
def test_settings_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DkimSettings(**kwargs)  # type: ignore[arg-type]


# --- hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\r\n\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel",
        b"From: a@example.org\nDKIM-Signature: v=1;\n d=example.org; s=sel; h=from\nno blank line",
        "Subject: caf\u00e9\r\nDKIM-Signature: d=\u00e9.example; s=s\u00e9l\r\n\r\nbody".encode(),
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example..org; s=sel; h=from; bh=AAAA; b=AAAA\r\n\r\nx",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from; bh=AAAA; b=AAAA; t=99x\r\n\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from; bh=AAAA; b=AAAA; i=org\r\n\r\n",
        b"\xff\xfe: junk\r\nDKIM-Signature: v=1; d=example.org; s=sel\r\n\r\n",
    ],
    ids=["empty", "blank", "no-separator", "bare-lf", "8bit", "bad-name", "bad-t", "i-no-at", "junk-line"],
)
def test_hostile_messages_never_raise(tmp_path: Path, message: bytes) -> None:
    resolver = resolver_for(tmp_path, {key_name(): ["v=DKIM1; p=QUJD"]})
    results = verify_dkim(message, resolver, SETTINGS)
    assert all(r.result is not AuthResult.PASS for r in results)
    assert len(results) == message.count(b"DKIM-Signature")


def test_unparseable_header_section_names_the_signature(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign(MESSAGE, keys["rsa2048"])
    broken = signed.replace(b"To: Bob", b"this line is not a header\r\nTo: Bob")
    result = only(verify_dkim(broken, resolver_for(tmp_path, {}), SETTINGS))
    assert (result.result, result.domain, result.selector) == (AuthResult.PERMERROR, DOMAIN, "sel")
    assert result.reason.startswith("message header not parseable")


# --- the CRLF parse beside dkimpy's ------------------------------------------------------------

_FIELD_NAMES = [b"From", b"To", b"DKIM-Signature"]
_ODD_FIELD_NAMES = [b"X-a_b.c!~", b"Subject ", b"From x", b":", b"\xff", b"N\x7fme", b""]
_LINE_BREAKS = [b"\r\n"] * 40 + [b"\n", b"\r", b"\r\r\n"]


def _generated_message(rng: random.Random) -> bytes:
    """Header fields (some odd), folding, junk lines, separators and bodies of every line ending."""
    lines = []
    for _ in range(rng.randint(0, 6)):
        if rng.random() < 0.05:
            lines.append(rng.choice([b"junk line", b"From alice@example.org", b" orphan", b""]))
            continue
        name = rng.choice(_ODD_FIELD_NAMES if rng.random() < 0.1 else _FIELD_NAMES)
        value = rng.choice([b"", b" v", b"\tv:w", b" a=b; b=c", b" \x80\r x"])
        value += b"".join(
            rng.choice(_LINE_BREAKS) + rng.choice([b" ", b"\t"]) + b"more" for _ in range(rng.randint(0, 2))
        )
        lines.append(name + b":" + value)
    head = b"".join(line + rng.choice(_LINE_BREAKS) for line in lines)
    separator = rng.choice([b"\r\n"] * 12 + [b"\n", b"", b"\r\n\n"])
    body = b"".join(
        rng.choice([b"text", b"", b" ", b"\r"]) + rng.choice(_LINE_BREAKS) for _ in range(rng.randint(0, 4))
    )
    return (b"\r\n" if rng.random() < 0.05 else b"") + head + separator + body


def test_crlf_split_gives_what_rfc822_parse_gives() -> None:
    rng = random.Random(5322)
    taken = 0
    for _ in range(5000):
        message = _generated_message(rng)
        split = dkim_verify._split_crlf(message)
        if split is not None:
            # rfc822_parse raising here fails the test too: the shortcut must refuse such input.
            assert split == dkim.rfc822_parse(message), message
            taken += 1
    assert 1500 < taken < 4000  # both the shortcut and the fallback are exercised


@pytest.mark.parametrize(
    "message",
    [
        b"From alice@example.org\r\nFrom: a\r\n\r\nbody\r\n",  # mbox line: dkimpy skips it
        b"Subject : x\r\nFrom: a\r\n\r\n",  # dkimpy refuses the space before the colon
        b"::x\r\n\r\n",  # dkimpy reads a field named ":"
        b"From: a\nTo: b\r\n\r\nbody\r\n",  # bare LF in the header block
        b"From: a\r\n\r\nline\nline\r\n",  # bare LF in the body
        b"From: a\r\n\r\n\nbody\r\n",  # the body starts with a bare LF
        b"\r\nFrom: a\r\n\r\nbody\r\n",  # empty header block
        b"From: a\r\nno header here\r\n\r\nbody\r\n",
        b"From: a\r\nbody without a blank line\r\n",
        b" folded: first\r\n\r\n",
    ],
    ids=[
        "mbox-from",
        "space-before-colon",
        "colon-name",
        "lf-head",
        "lf-body",
        "lf-body-start",
        "leading-crlf",
        "junk-line",
        "no-separator",
        "leading-fold",
    ],
)
def test_crlf_split_leaves_other_messages_to_dkimpy(message: bytes) -> None:
    assert dkim_verify._split_crlf(message) is None


def test_crlf_split_of_a_signed_message() -> None:
    signature = b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n def=\r\n"
    split = dkim_verify._split_crlf(signature + MESSAGE)
    assert split == dkim.rfc822_parse(signature + MESSAGE)
    assert split is not None and split[0][0] == [
        b"DKIM-Signature",
        b" v=1; a=rsa-sha256;\r\n\tb=abc\r\n def=\r\n",
    ]
    assert split[1] == b"Hello Bob,\r\nthe numbers are attached.\r\n"


def test_results_match_dkimpys_own_parse(
    tmp_path: Path, keys: dict[str, Key], monkeypatch: pytest.MonkeyPatch
) -> None:
    rsa_signed = sign(MESSAGE, keys["rsa2048"])
    messages = [
        rsa_signed,
        sign(rsa_signed, keys["ed25519"], selector="ed"),
        rsa_signed.replace(b"Hello", b"Hullo"),
        rsa_signed.replace(b"Subject: quarterly", b"Subject: yearly"),
        sign(MESSAGE, keys["rsa2048"], length=True) + b"appended\r\n",
        sign(MESSAGE, keys["rsa2048"], canonicalize=(b"simple", b"simple")),
        sign(MESSAGE.replace(b"\r\n\r\n", b"\r\n\r\n\r\n\r\n"), keys["rsa2048"]),
        sign(MESSAGE.replace(b"Subject:", b"Subject:\r\n\t"), keys["rsa2048"]),
        sign(MESSAGE, keys["rsa2048"]).replace(b"\r\n", b"\n"),
        sign(MESSAGE + b"\r", keys["rsa2048"]),
        b"From: a@example.org\r\n" + rsa_signed,
    ]
    messages += [_generated_message(random.Random(seed)) + rsa_signed for seed in range(50)]
    resolver = resolver_for(
        tmp_path, {key_name(): [keys["rsa2048"].record], key_name("ed"): [keys["ed25519"].record]}
    )
    now = time.time()  # dkim.sign() writes t= from the clock
    fast = [verify_dkim(message, resolver, SETTINGS, now=now) for message in messages]
    monkeypatch.setattr(dkim_verify, "_split_crlf", lambda message: None)
    assert [verify_dkim(message, resolver, SETTINGS, now=now) for message in messages] == fast
    assert {result.result for results in fast for result in results} >= {AuthResult.PASS, AuthResult.FAIL}


# --- faster equivalents of dkimpy's helpers ------------------------------------------------------


def _parse_outcome(parse: Callable[[bytes], dict[bytes, bytes]], value: bytes) -> object:
    try:
        return parse(value)
    except InvalidTagValueList as e:
        return type(e), e.args


_WHITESPACE = [b"", b"", b" ", b"\t", b"\r\n ", b"\x0b", b"\x0c"]
_TAG_NAMES = [b"v", b"a", b"bh", b"B", b"x_1", b"h", b"h", b"", b"_x", b"1a", b"\xe9", b"x y"]


def _tag_list_value(rng: random.Random) -> bytes:
    """Tag lists, mostly well formed, with odd names, duplicates, stray '=' and ';', whitespace."""
    specs = []
    for _ in range(rng.randint(0, 5)):
        name = rng.choice(_TAG_NAMES) if rng.random() < 0.1 else rng.choice(_TAG_NAMES[:5])
        equals = rng.choice([b"=", b"=", b"=", b"==", b""])
        value = bytes(rng.choice(b"ab1=: \t\xe9") for _ in range(rng.randint(0, 6)))
        spec = rng.choice(_WHITESPACE) + name + rng.choice(_WHITESPACE) + equals + rng.choice(_WHITESPACE)
        specs.append(spec + value + rng.choice(_WHITESPACE))
    return b";".join(specs) + rng.choice([b"", b"", b";", b";;", b"; "])


def test_tag_list_parses_and_fails_exactly_like_dkimpy() -> None:
    rng = random.Random(6376)
    parsed = 0
    for _ in range(20000):
        value = _tag_list_value(rng)
        expected = _parse_outcome(parse_tag_value, value)
        assert _parse_outcome(dkim_verify._tag_list, value) == expected, value
        parsed += isinstance(expected, dict) and len(expected) > 1
    assert 2000 < parsed < 18000  # both outcomes are exercised


def test_signature_tags_are_the_tag_list_parsed_once_and_read_only() -> None:
    rng = random.Random(3652)
    for _ in range(5000):
        value = _tag_list_value(rng)
        expected = _parse_outcome(dkim_verify._tag_list, value)
        # The header callback's value has no final CRLF, the message's has: both read alike.
        for variant in (value, value + b"\r\n", b" " + value, value):
            assert _parse_outcome(dkim_verify._signature_tags, variant) == expected, variant
    tags = dkim_verify._signature_tags(b" v=1; d=example.org\r\n")
    assert tags is dkim_verify._signature_tags(b"v=1; d=example.org")
    with pytest.raises(TypeError):
        tags[b"d"] = b"attacker.example"  # type: ignore[index]  # shared between callers
    long_value = b"v=1; z=" + b"a" * dkim_verify.SIGNATURE_MEMO_LENGTH
    assert dkim_verify._signature_tags(long_value) == dkim_verify._tag_list(long_value)
    assert dkim_verify._signature_tags(long_value) is not dkim_verify._signature_tags(long_value)


def test_signed_header_names_are_dkimpys_split_kept_or_not() -> None:
    rng = random.Random(5322)
    long_h = b" : ".join([b"From", b"To"] * dkim_verify.SIGNATURE_MEMO_LENGTH)
    for value in [*(_tag_list_value(rng) for _ in range(500)), long_h, long_h]:
        # dkimpy's verify_headerprep: re.split on the stripped h=, each name lowercased.
        expected = tuple(name.lower() for name in re.split(rb"\s*:\s*", value.strip()))
        assert dkim_verify._signed_header_names({b"h": value}) == expected, value
        assert dkim_verify._signed_header_names({b"h": value}) == expected  # the second time kept


def test_key_asked_ahead_is_the_lenient_readings() -> None:
    rng = random.Random(8301)
    check = dkim_verify.DkimCheck()
    names = [b"s", b"d", b"s", b"d", b"v", b"h", b"S", b""]
    asked = 0
    for _ in range(3000):
        specs = [rng.choice(names) + rng.choice([b"=", b" = ", b""]) + rng.choice([b"k", b"a.example", b""])]
        specs += [rng.choice(names) + b"=" + rng.choice([b"sel", b"b.example", b" "]) for _ in range(3)]
        value = b";".join(rng.sample(specs, len(specs))) + rng.choice([b"", b";", b";\r\n "])
        field = HeaderField("DKIM-Signature", value.decode("latin-1"), 1)
        lenient = dkim_verify._lenient_tags(value)
        selector, domain = lenient.get(b"s", b"").decode(), lenient.get(b"d", b"").decode()
        expected = [(f"{selector}._domainkey.{domain}", dns.rdatatype.TXT)] if selector and domain else []
        assert check.field_questions(field, SETTINGS) == expected, value
        asked += bool(expected)
    assert 150 < asked < 2850  # both outcomes are exercised


def test_header_b_drops_whitespace_like_the_regex() -> None:
    rng = random.Random(6008)
    for _ in range(2000):
        b_value = bytes(
            rng.choice(b"AZaz09+/= \t\r\n\x0b\x0c\x1c\x85\xa0") for _ in range(rng.randint(0, 20))
        )
        result = dkim_verify._result(AuthResult.PASS, {b"b": b_value})
        assert result.header_b == re.sub(rb"\s+", b"", b_value)[:8].decode("utf-8", "replace"), b_value


# --- body hashes computed as the body streams in (the milter's path) ----------------------------


def test_streamed_body_hashes_verify_from_the_header_block_alone(
    tmp_path: Path, keys: dict[str, Key]
) -> None:
    signed = sign(MESSAGE, keys["rsa2048"], canonicalize=(b"relaxed", b"simple"), length=True)
    resolver = resolver_for(tmp_path, {key_name(): [keys["rsa2048"].record]})
    head, _, body = signed.partition(b"\r\n\r\n")
    signature = head.split(b"DKIM-Signature:")[1].split(b"\r\nFrom:")[0]
    needed = dkim_verify.body_hashes_needed([signature], SETTINGS)
    assert needed == {BodyHashSpec(SIMPLE, len(body), "sha256")}
    hasher = BodyHasher(needed)
    for byte in range(len(body)):  # one octet per chunk
        hasher.update(body[byte : byte + 1])
    result = only(verify_dkim(head + b"\r\n\r\n", resolver, SETTINGS, body=hasher.finish()))
    assert result.result is AuthResult.PASS and result.reason == f"l={len(body)}, whole body signed"
    tampered = digest_body(needed, body + b"more\r\n")
    result = only(verify_dkim(head + b"\r\n\r\n", resolver, SETTINGS, body=tampered))
    assert result.result is AuthResult.PASS and "6 body octets unsigned" in result.reason
    wrong = digest_body(needed, b"another body\r\n")
    assert only(verify_dkim(signed, resolver, SETTINGS, body=wrong)).reason == "body hash did not verify"


def test_a_body_hash_not_computed_is_our_error_not_the_senders(tmp_path: Path, keys: dict[str, Key]) -> None:
    signed = sign(MESSAGE, keys["ed25519"])
    resolver = resolver_for(tmp_path, {key_name(): [keys["ed25519"].record]})
    result = only(verify_dkim(signed, resolver, SETTINGS, body=BodyDigests()))
    assert result.result is AuthResult.TEMPERROR and "body hash not computed" in result.reason


def test_body_hashes_needed_only_for_signatures_that_will_be_checked() -> None:
    values = [
        b"v=1; a=rsa-sha256; c=relaxed/relaxed; d=a.example; s=s; h=from; bh=AA==; b=AA==",
        b"v=1; a=ed25519-sha256; c=relaxed/relaxed; d=a.example; s=s; h=from; bh=AA==; b=AA==",  # again
        b"v=1; a=rsa-sha256; c=relaxed; d=a.example; s=s; h=from; bh=AA==; b=AA==",  # body: simple, §3.5
        b"v=1; a=rsa-sha1; d=a.example; s=s; l=10; h=from; bh=AA==; b=AA==",  # simple/simple by default
        b"v=1; a=rsa-sha256; c=odd/relaxed; d=a.example; s=s; h=from; bh=AA==; b=AA==",  # unreadable c=
        b"v=1; a=rsa-md5; d=a.example; s=s; h=from; bh=AA==; b=AA==",  # unknown a=
        b"not a tag list",
        b"v=1; a=rsa-sha256; c=simple/simple; d=a.example; s=s; h=from; bh=AA==; b=AA==",  # past the limit
    ]
    assert dkim_verify.body_hashes_needed(values, DkimSettings(max_signatures=7)) == {
        BodyHashSpec(RELAXED, None, "sha256"),
        BodyHashSpec(SIMPLE, None, "sha256"),
        BodyHashSpec(SIMPLE, 10, "sha1"),
    }
    assert dkim_verify.body_hashes_needed(values, DkimSettings(enabled=False)) == frozenset()


def test_body_hash_spec_is_the_same_kept_or_not() -> None:
    cases = [
        ({b"a": b"rsa-sha256"}, BodyHashSpec(SIMPLE, None, "sha256")),
        ({b"a": b"rsa-sha1", b"c": b"relaxed", b"l": b"7"}, BodyHashSpec(SIMPLE, 7, "sha1")),
        (  # too long to be kept
            {b"a": b"rsa-sha256", b"c": b"simple/relaxed", b"l": b"9" * 200},
            BodyHashSpec(RELAXED, int(b"9" * 200), "sha256"),
        ),
    ]
    for tags, expected in cases * 2:  # the second time from the memo, when kept
        assert dkim_verify._body_hash_spec(tags) == expected
    for c_value in (b"relaxed/odd", b"relaxed/" + b"x" * 200):
        for _ in range(2):
            with pytest.raises(InvalidCanonicalizationPolicyError):
                dkim_verify._body_hash_spec({b"a": b"rsa-sha256", b"c": c_value})
    with pytest.raises(ValueError):
        dkim_verify._body_hash_spec({b"a": b"rsa-sha256", b"l": b""})


# --- the header hash and signature check beside dkimpy's verify_sig_process ----------------------

_HASHED_NAMES = [b"From", b"FROM", b"from", b"To", b"Subject", b"X-Odd_1", b"Date"]
_HASHED_VALUES = [b" v", b"\tv", b"", b" ", b"  a \t b  ", b" a\r\n b", b" a\r\n\tb \r\n c"]
_HASHED_VALUES += [b" x\x0b", b"\x0cy "]
_FIELD_ENDS = [b"\r\n", b"\r\n", b" \r\n", b"\n", b"\r\r\n"]


def _hashed_field(rng: random.Random) -> list[bytes]:
    return [rng.choice(_HASHED_NAMES), rng.choice(_HASHED_VALUES) + rng.choice(_FIELD_ENDS)]


def _signature_field(rng: random.Random) -> tuple[bytes, bytes]:
    """A DKIM-Signature field with b= in odd places and forms: spaced, folded, empty, last."""
    b_tag = rng.choice([b"b=abc/+=", b" b = ab\r\n c=", b"b=", b"\tb=\r\n\tQUJD", b"b=a b"])
    tags = [b"v=1", b"a=rsa-sha256", b"bh=QUJD", b"d=example.org", b"h=from", b"s=sel", b"cb=x"]
    tags.insert(rng.randint(0, len(tags)), b_tag)
    value = b";".join(tags) + rng.choice([b"", b";", b"; ", b" \r\n"])
    return rng.choice([b"DKIM-Signature", b"dkim-signature"]), b" " + value + b"\r\n"


def test_signed_header_data_is_what_dkimpy_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    for module, name, _, original in dkim_rsa.PATCHES:  # dkimpy as shipped is the reference
        monkeypatch.setattr(module, name, original)
    rng = random.Random(37)
    for _ in range(3000):
        fields = [_hashed_field(rng) for _ in range(rng.randint(0, 8))]
        signed = [name.lower() for name in rng.choices([*_HASHED_NAMES, b"", b"cc"], k=rng.randint(1, 6))]
        header = _signature_field(rng)
        relaxed = rng.random() < 0.5
        policy = CanonicalizationPolicy.from_c_value(b"relaxed" if relaxed else b"simple")
        reference = dkim.HashThrough(hashlib.sha256(), debug=True)
        include = [*signed, b"from"] if b"from" in signed else list(signed)
        dkim.hash_headers(reference, policy, policy.canonicalize_headers(fields), include, header, {})
        ours = dkim_verify.signed_header_data(fields, signed, header, relaxed)
        assert ours == reference.hashed(), (fields, signed, header, relaxed)


def _verification_outcomes(
    fields: list[list[bytes]], header: tuple[bytes, bytes], key: dkim_verify.PublicKey
) -> tuple[object, object]:
    """(dkimpy's verify_sig_process, ours) for one signature: a bool, or the exception raised."""
    tags = dkim_verify._tag_list(header[1])
    signed = dkim_verify._signed_header_names(tags)
    reference = dkim.DKIM(b"", minkey=1024)
    reference.headers = fields
    reference.pk, reference.keysize, reference.ktag = key.pk, key.bits, key.ktag
    without_body_hash = {k: v for k, v in tags.items() if k != b"bh"}
    outcomes = []
    for verify in (
        lambda: reference.verify_sig_process(without_body_hash, list(signed), header, None),  # it appends
        lambda: dkim_verify.verify_header_signature(tags, signed, header, fields, key),
    ):
        try:
            outcomes.append(verify())
        except Exception as e:
            outcomes.append((type(e).__mro__[:2], str(e)))
    return outcomes[0], outcomes[1]


def test_header_signature_verifies_exactly_like_dkimpy(tmp_path: Path, keys: dict[str, Key]) -> None:
    records = {key_name(name): [key.record] for name, key in keys.items()}
    resolver = resolver_for(tmp_path, records)
    compared = set()
    for name in ("rsa2048", "rsa1024", "ed25519"):
        algorithm = keys[name].algorithm
        public = dkim_verify.lookup_public_key(DOMAIN.encode(), name.encode(), algorithm, resolver, SETTINGS)
        assert isinstance(public, dkim_verify.PublicKey)
        for canonicalize in ((b"relaxed", b"simple"), (b"simple", b"simple")):
            message = MESSAGE.replace(b"Subject: ", b"Subject:  \t")
            fields, _ = dkim.rfc822_parse(sign(message, keys[name], name, canonicalize=canonicalize))
            header = (fields[0][0], fields[0][1])
            good_b = dkim_verify._tag_list(header[1])[b"b"]
            # Added From above (signed once more: fails), added To below (unsigned: passes).
            added_from, added_to = [b"From", b" x@example.org\r\n"], [b"to", b" c\r\n"]
            for variant in (fields, [added_from, *fields], [*fields, added_to]):
                # Bad padding, wrong length, wrong signature: exceptions and failures alike.
                for b_value in (good_b, good_b[:-4], good_b[:-3], good_b[1:], b"A" * 86 + b"=="):
                    changed = (header[0], header[1].replace(good_b, b_value))
                    expected, ours = _verification_outcomes(variant, changed, public)
                    assert ours == expected, (name, canonicalize, b_value)
                    compared.add(repr(expected)[:40])
    assert len(compared) >= 4  # passes, failures and both kinds of exception were compared


_FIELD_VALUES = {
    b"v": [b"1", b"1", b"2", b""],
    b"a": [b"rsa-sha256", b"ed25519-sha256", b"rsa-sha1", b"rsa-md5", b"RSA-SHA256"],
    b"b": [b"QUJD", b"QUJDRA==", b"QU JD\r\n RA==", b"QUJ", b"QUJD!", b"=QUJD", b"QUJD\n", b"", b"QU\x0bJD"],
    b"bh": [b"QUJD", b"QUJ", b"QU\tJD", b"!!!!", b""],
    b"d": [b"example.org", b"EXAMPLE.org", b"ex@mple.org", b"ex(ample", b"caf\xe9.org", b"a@b\xe9", b""],
    b"i": [b"@example.org", b"u@mail.example.org", b"u@xexample.org", b"@EXAMPLE.ORG", b"example.org", b"@"],
    b"l": [b"0", b"12", b"1" * 77, b"-1", b"1 2", b"12\n", b""],
    b"q": [b"dns/txt", b"dns", b""],
    b"cv": [b"pass", b"none", b"bad"],
    b"t": [b"1", b"x"],
    b"x": [b"1", b"x"],
}


def _validation_outcome(validate: Callable[[], object]) -> object:
    try:
        return validate() or ""
    except dkim.ValidationError as e:
        return str(e)
    except IndexError as e:
        return type(e)


def test_field_problems_are_dkimpys() -> None:
    rng = random.Random(6376_35)
    outcomes = set()
    for _ in range(20000):
        tags = {name: rng.choice(_FIELD_VALUES[name]) for name in (b"v", b"a", b"b", b"bh", b"d")}
        tags |= {b"h": b"from", b"s": b"sel"}
        tags |= {name: rng.choice(values) for name, values in _FIELD_VALUES.items() if rng.random() < 0.2}
        untimed = {name: value for name, value in tags.items() if name not in (b"t", b"x")}
        expected = _validation_outcome(lambda: dkim.validate_signature_fields(untimed))  # noqa: B023
        assert _validation_outcome(lambda: dkim_verify._field_problem(tags)) == expected, tags  # noqa: B023
        outcomes.add(expected if not isinstance(expected, str) else expected.partition(" ")[0])
    assert len(outcomes) >= 10, outcomes  # every check is reached, passing, failing and raising


# --- RSA keys read through OpenSSL beside dkimpy's ASN.1 parser ----------------------------------


def _der_variants(key: rsa.RSAPublicKey, rng: random.Random) -> list[bytes]:
    """The key's SubjectPublicKeyInfo and PKCS#1 DER, and hostile neighbours of both."""
    variants = []
    for encoding in (serialization.PublicFormat.SubjectPublicKeyInfo, serialization.PublicFormat.PKCS1):
        der = key.public_bytes(serialization.Encoding.DER, encoding)
        variants += [der, der + b"\x00", der[:-1], der[:40], b"\x30\x84" + bytes([0, 0]) + der[2:]]
        # BER: the outer length in long form with a leading zero octet (not DER, dkimpy may take it).
        variants.append(der[:1] + bytes([0x80 | (der[1] & 0x7F) + 1, 0]) + der[2:])
        for _ in range(30):  # one octet changed: in the lengths, the OID, the integers
            position = rng.randrange(len(der)) if rng.random() < 0.5 else rng.randrange(min(len(der), 40))
            variants.append(der[:position] + bytes([rng.randrange(256)]) + der[position + 1 :])
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    rsa_encryption = bytes.fromhex("300d06092a864886f70d0101010500")  # AlgorithmIdentifier, NULL parameters
    key_bits = spki[spki.index(rsa_encryption) + len(rsa_encryption) :]
    # Without the NULL parameters (OpenSSL reads it, dkimpy does not); with the RSASSA-PSS OID (the reverse).
    without_null = bytes.fromhex("300b06092a864886f70d010101") + key_bits
    length = len(without_null).to_bytes((len(without_null).bit_length() + 7) // 8, "big")
    variants.append(b"\x30" + bytes([0x80 | len(length)]) + length + without_null)  # DER: shortest length
    variants.append(spki.replace(rsa_encryption, bytes.fromhex("300d06092a864886f70d01010a0500")))
    return variants


def _key_outcome(record: str) -> object:
    tags = {b"a": b"rsa-sha256", b"d": DOMAIN.encode(), b"s": b"sel"}
    try:
        return dkim_verify._load_key(key_name() + ".", record, tags, DkimSettings(min_rsa_bits=1024))
    except dkim_verify._Stop as stop:
        return stop.result, stop.reason
    except Exception as e:  # dkimpy's ASN.1 parser asserts on some input: _verify_one's permerror
        return type(e)


def test_rsa_keys_read_through_openssl_as_dkimpy_reads_them(
    keys: dict[str, Key], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(8017)
    public_keys = [
        rsa.generate_private_key(65537, 1024).public_key(),
        rsa.generate_private_key(3, 1024).public_key(),
        small_rsa_key(768).public_key(),
        serialization.load_der_public_key(base64.b64decode(keys["rsa2048"].public_b64)),
    ]
    ders = [der for key in public_keys for der in _der_variants(key, rng)]  # type: ignore[arg-type]
    ders += [base64.b64decode(keys["ed25519"].public_b64), b"", b"\x30\x00"]
    ders.append(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    records = [f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}" for der in ders]
    records += ["p=" + keys["rsa2048"].public_b64[:100] + " \t" + keys["rsa2048"].public_b64[100:], "p=QUJD="]
    fast = [_key_outcome(record) for record in records]
    p_values = [record.split("p=")[1].encode() for record in records]
    read_by_openssl = sum(dkim_verify._openssl_rsa_key(p_value) is not None for p_value in p_values)
    monkeypatch.setattr(dkim_verify, "_openssl_rsa_key", lambda p_value: None)
    assert [_key_outcome(record) for record in records] == fast
    usable = sum(isinstance(outcome, dkim_verify.PublicKey) for outcome in fast)
    assert 8 <= read_by_openssl < len(records) - 20 and usable >= 8, (read_by_openssl, usable)


def test_a_key_is_read_once_and_shared_read_only(keys: dict[str, Key]) -> None:
    # The same p= published under many names is parsed once; what is shared cannot be altered.
    p_value = keys["rsa2048"].public_b64.encode()
    read = dkim_verify._openssl_rsa_key(p_value)
    assert read is not None and read is dkim_verify._openssl_rsa_key(p_value)
    integers, bits = read
    assert bits == 2048 and set(integers) == {"modulus", "publicExponent"}
    with pytest.raises(TypeError):
        integers["modulus"] = 3  # type: ignore[index]  # shared between callers
    # A value longer than any key (here whitespace around one) is read each time, and read alike.
    padded = p_value + b" " * dkim_verify.KEY_MEMO_LENGTH
    assert dkim_verify._openssl_rsa_key(padded) == read
    assert dkim_verify._openssl_rsa_key(padded) is not dkim_verify._openssl_rsa_key(padded)

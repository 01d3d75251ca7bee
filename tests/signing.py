"""Test helpers: real keys, their DNS records, and messages signed with dkimpy."""

from __future__ import annotations

import base64
import random
import time
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


@dataclass(frozen=True)
class SigningKey:
    algorithm: str  # rsa-sha256 | ed25519-sha256
    private: bytes  # what dkim.sign takes: PEM for RSA, base64 seed for Ed25519
    public_b64: str

    def txt_record(self, extra: str = "") -> str:
        kind = "ed25519" if self.algorithm.startswith("ed25519") else "rsa"
        return f"v=DKIM1; k={kind}; {extra}p={self.public_b64}"


def rsa_key(bits: int = 2048) -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey("rsa-sha256", pem, base64.b64encode(der).decode())


def ed25519_key() -> SigningKey:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey("ed25519-sha256", base64.b64encode(seed), base64.b64encode(public).decode())


def zone_txt(value: str) -> str:
    """A TXT value in zone-file syntax, split into 255-byte character-strings (RFC 1035 §3.3.14)."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def make_message(
    from_header: str = "Bob <bob@sender.example>",
    subject: str = "Hello",
    body: str = "Hi Alice,\r\nsee you tomorrow.\r\n",
    extra_headers: str = "",
) -> bytes:
    return (
        f"From: {from_header}\r\nTo: alice@receiver.example\r\nSubject: {subject}\r\n"
        f"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{time.time_ns()}@sender.example>\r\n"
        f"{extra_headers}\r\n{body}"
    ).encode()


def with_tight_fields(message: bytes) -> bytes:
    """Subject and To written with no space after the colon ("Subject:x", "To:<TAB>x"): legal
    (RFC 5322 §2.2), and what ``simple`` header canonicalization (RFC 6376 §3.4.1) must see as is."""
    head, separator, body = message.partition(b"\r\n\r\n")
    head = head.replace(b"\r\nSubject: ", b"\r\nSubject:").replace(b"\r\nTo: ", b"\r\nTo:\t")
    return head + separator + body


def sign(message: bytes, key: SigningKey, domain: str, selector: str, **kwargs: object) -> bytes:
    """The message with a DKIM-Signature from dkimpy prepended."""
    signature = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key.private,
        signature_algorithm=key.algorithm.encode(),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        **kwargs,
    )
    return bytes(signature) + message


def small_rsa_key(bits: int = 768) -> rsa.RSAPrivateKey:
    """An RSA key below cryptography's 1024-bit generation floor (for RFC 8301 refusal tests).

    Built from primes found here with Miller-Rabin; seeded by ``bits``, so repeatable.
    """
    rng = random.Random(bits)

    def probably_prime(n: int) -> bool:
        d, r = n - 1, 0
        while d % 2 == 0:
            d, r = d // 2, r + 1
        for _ in range(20):
            x = pow(rng.randrange(2, n - 1), d, n)
            if x in (1, n - 1):
                continue
            for _ in range(r - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                return False
        return True

    def prime(size: int) -> int:
        while True:
            candidate = rng.getrandbits(size) | (3 << (size - 2)) | 1
            if (candidate - 1) % 65537 and probably_prime(candidate):
                return candidate

    p, q = prime(bits // 2), prime(bits // 2)
    d = pow(65537, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(65537, p * q)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q), public
    )
    return numbers.private_key()

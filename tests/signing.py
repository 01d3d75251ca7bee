"""Test helpers: real keys, their DNS records, and messages signed with dkimpy."""

from __future__ import annotations

import base64
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

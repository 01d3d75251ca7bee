"""A loopback SMTP relay for the report sending tests (aiosmtpd): STARTTLS, AUTH, refusals, SIZE.

It keeps what it accepted in memory; it listens on 127.0.0.1 only and stops with the test.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dnsserver import free_port

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool
    authenticated_as: str | None


@dataclass
class RelayHandler:
    """What the relay does: refuse (a reply for RCPT or DATA) or keep the message."""

    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    refuse_data: str = ""
    received: list[Received] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.refuse_rcpt.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.refuse_data:
            return self.refuse_data
        assert isinstance(envelope.content, bytes) and envelope.mail_from is not None
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        self.received.append(
            Received(
                envelope.mail_from,
                tuple(envelope.rcpt_tos),
                envelope.content,
                session.ssl is not None,
                login,
            )
        )
        return "250 2.0.0 queued"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (IP SAN) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "relay.crt", directory / "relay.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def _authenticator(user: str, password: str) -> Any:
    def check(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        expected = (user.encode(), password.encode())
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == expected
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    return check


@contextmanager
def running_relay(
    handler: RelayHandler,
    *,
    certificate: tuple[Path, Path] | None = None,
    user: str = "",
    password: str = "",
    data_size_limit: int | None = None,
) -> Iterator[int]:
    """Serve ``handler`` on 127.0.0.1; yields the port.

    Args:
        certificate: offer STARTTLS with this certificate and key.
        user, password: offer AUTH (only after STARTTLS when a certificate is given) and accept these.
        data_size_limit: advertise SIZE and refuse larger messages (552).
    """
    kwargs: dict[str, Any] = {"data_size_limit": data_size_limit}
    if certificate is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*map(str, certificate))
        kwargs["tls_context"] = context
    if user:
        kwargs["authenticator"] = _authenticator(user, password)
        kwargs["auth_require_tls"] = certificate is not None
        kwargs["auth_required"] = True
    controller = Controller(handler, hostname=HOST, port=free_port(HOST), **kwargs)
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()

"""One SMTP connection and one message, as the checks see them.

:class:`Connection` is what the MTA told about the client; :class:`Transaction` one message with
its envelope. Both are plain frozen values: the milter adapter and ``authmilter check`` build them,
the checks (checks.py) and the pipeline read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from authmilter.dkim_body import BodyDigests
from authmilter.message import FromAuthors, ParsedMessage, parse_from
from authmilter.tables import HostEntry


@dataclass(frozen=True)
class Connection:
    """What the MTA told us about the SMTP client.

    Attributes:
        client_ip: the client's address as text ("" when unknown, e.g. a local submission).
        helo: the HELO/EHLO name.
        client_name: the verified PTR name the MTA found ("" or "unknown" when none).
        macros: milter macros of interest (``{daemon_name}``, ``{auth_type}``, ``j`` ...).
        internal_host: the ``[milter] internal_hosts`` entry that decided for this client
            (pipeline.match_internal_host; check ``included``), or None: no entry covers it.
    """

    client_ip: str
    helo: str
    client_name: str = ""
    macros: Mapping[str, str] = field(default_factory=dict)
    internal_host: HostEntry | None = None


@dataclass(frozen=True)
class Transaction:
    """One message: the connection, the envelope and the message itself.

    Attributes:
        body: the DKIM body hashes, computed as the body streamed in (pipeline.body_hashes; the
            milter keeps no body, so its ``message`` is the header block only); None: computed
            from ``message``'s body (a message read whole, as ``authmilter check`` does).
        outbound: why the message is outbound (pipeline.outbound_reason; "" inbound), as the
            session found it once the envelope was complete and used it all along; None:
            ``pipeline.evaluate`` finds it.
    """

    connection: Connection
    mail_from: str
    recipients: tuple[str, ...]
    message: ParsedMessage
    queue_id: str = ""
    body: BodyDigests | None = None
    outbound: str | None = None

    @cached_property
    def authors(self) -> FromAuthors:
        """The From field's authors, parsed once per message (DMARC, the pipeline and the log read them)."""
        return parse_from(self.message.headers)

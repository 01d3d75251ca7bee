"""One SMTP connection as a state machine, fed callback by callback (h11's ``_state.py``, STYLE.md §1).

The milter adapter (milter_app.py) translates each pymilter callback into one call here and applies
what comes out; ``authmilter check`` feeds the same machine from a file. Everything a message
gathers lives here: the envelope, the header fields (bounded by ``[milter] max_headers``), the
recipients (bounded by :data:`MAX_RECIPIENTS`), the DKIM body hashes computed as the body streams
in (dkim_body.py; the body itself is never kept), and the first failure of a callback.

Events, in the order the MTA sends them (RFC 5321 §3.3; a connection may carry several messages):

- :meth:`Session.connect`, :meth:`Session.hello`: the client; once per connection (HELO again
  replaces the name).
- :meth:`Session.mail` starts a message (dropping any unfinished one, as RSET does);
  :meth:`Session.rcpt`, :meth:`Session.header`, :meth:`Session.end_of_headers`,
  :meth:`Session.body` add to it, or :meth:`Session.whole_message` gives it at once (a file).
- :meth:`Session.end_of_message` ends it, and :meth:`Session.transaction` hands out the
  :class:`~authmilter.transaction.Transaction` to evaluate; :meth:`Session.abort` forgets it.
- DNS names become known along the way: the SPF records at MAIL FROM (once its macros say the
  message is inbound), a ``_dmarc`` record when the From field arrives, a key with each
  DKIM-Signature field. The session hands them to the ``prefetch`` callable it was given
  (pipeline.envelope_questions, pipeline.field_questions); the adapter wires that to the resolver,
  so the queries overlap with the rest of the transaction and the session itself does no I/O.
- :meth:`Session.failed` records that a callback raised: the connection's failure (at connect or
  HELO) stays for every later message, a message's for that message; end of message then applies
  the configured failure action.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from authmilter.checks import Question
from authmilter.config import Config
from authmilter.dkim_body import BodyHasher
from authmilter.domains import path_address
from authmilter.message import HeaderCollector, MessageHeaders, ParsedMessage, assemble_message
from authmilter.pipeline import (
    body_hashes,
    envelope_questions,
    field_questions,
    match_internal_host,
    outbound_reason,
    prefetch_fields,
)
from authmilter.tables import HostEntry
from authmilter.transaction import Connection, Transaction

# Recipients kept per message (history rows need the envelope-to domain, not thousands of them).
# RFC 5321 §4.5.3.1.8 asks servers to take at least 100; Postfix's smtpd_recipient_limit is 1000.
MAX_RECIPIENTS = 1000
# Stages whose failure spoils the whole connection rather than one message.
CONNECTION_STAGES = frozenset({"connect", "hello"})


class _Message:
    """What one message has gathered, from MAIL FROM to end of message."""

    def __init__(self, connection: Connection, mail_from: str, queue_id: str, max_headers: int) -> None:
        self.connection = connection
        self.mail_from = mail_from
        self.queue_id = queue_id
        self.recipients: list[str] = []
        # Headers are gathered even when MAIL FROM could not be read, so forged A-R can be deleted.
        self.headers = HeaderCollector(max_headers)
        self.parsed_headers: MessageHeaders | None = None
        # Started at the end of the header block, when the DKIM-Signature fields say which hashes.
        self.body: BodyHasher | None = None
        # A message read whole (authmilter check): its body is hashed by the DKIM check itself.
        self.whole: ParsedMessage | None = None
        # Why it is outbound ("" inbound), found once the envelope is complete (Session._outbound).
        self.outbound: str | None = None


class Session:
    """One MTA connection: the client, then one message at a time.

    Args:
        config: ``[milter] max_headers``, the internal hosts, and what decides the body hashes.
        prefetch: given the DNS questions of the current inbound message as soon as they are
            known (it must return at once); None: nothing is prefetched.
    """

    def __init__(self, config: Config, prefetch: Callable[[Sequence[Question]], None] | None = None) -> None:
        self._config = config
        self._prefetch = prefetch
        # Header fields that tell a DNS name; the others are not looked at twice.
        self._prefetch_fields = prefetch_fields(config) if prefetch is not None else frozenset()
        self._prefetching = False  # the current message is inbound and prefetch is on
        self.client_ip = ""
        self._client_name = ""
        self._helo = ""
        self._macros: dict[str, str] = {}
        self.internal_host: HostEntry | None = None
        self._message: _Message | None = None
        self._connection_failure = ""
        self._message_failure = ""

    # --- the connection ----------------------------------------------------------------------

    def connect(self, client_ip: str, client_name: str, macros: Mapping[str, str]) -> None:
        """The client: its address ("" when none), its verified name ("" when none), the macros."""
        self.client_ip = client_ip
        self._client_name = client_name
        self._macros = dict(macros)
        self.internal_host = match_internal_host(client_ip, client_name, self._config)

    def hello(self, name: str) -> None:
        """The HELO/EHLO argument."""
        self._helo = name

    # --- one message -------------------------------------------------------------------------

    def mail(self, path: str) -> None:
        """MAIL FROM: a new message begins (an unfinished one is dropped).

        Args:
            path: the reverse-path as sent, e.g. ``<bob@example.org>``; ``<>`` is the null sender.
        """
        self.abort()
        connection = Connection(
            client_ip=self.client_ip,
            helo=self._helo,
            client_name=self._client_name,
            macros=dict(self._macros),
            internal_host=self.internal_host,
        )
        self._message = _Message(connection, path_address(path), "", self._config.milter.max_headers)

    def mail_macros(self, queue_id: str, macros: Mapping[str, str]) -> None:
        """The macros sent with MAIL FROM (a separate step: reading them may fail on its own).

        Args:
            queue_id: the MTA's queue id, when it is known this early ("" when not).
            macros: e.g. ``{auth_authen}``, added to the connection's.
        """
        message = self._current()
        message.queue_id = queue_id
        if macros:  # inbound mail usually has none (no {auth_authen}): the connection's stand
            message.connection = dataclasses.replace(
                message.connection, macros={**message.connection.macros, **macros}
            )
        # Now the envelope is complete: outbound mail is signed, not checked, and asks nothing.
        message.outbound = outbound_reason(message.connection, self._config)
        if self._prefetch is not None and not message.outbound:
            self._prefetching = True
            self._ask(envelope_questions(message.connection, message.mail_from, self._config))

    def rcpt(self, path: str) -> None:
        """RCPT TO: one recipient; past MAX_RECIPIENTS they are not kept."""
        message = self._current()
        if len(message.recipients) < MAX_RECIPIENTS:
            message.recipients.append(path_address(path))

    def header(self, name: str, value: bytes | str, leading_space_included: bool = False) -> None:
        """One header field as the MTA passed it (see HeaderCollector.add)."""
        field = self._current().headers.add(name, value, leading_space_included=leading_space_included)
        if self._prefetching and field is not None and field.name.lower() in self._prefetch_fields:
            self._ask(field_questions(field, self._config))

    def end_of_headers(self) -> None:
        """The header block is complete: the DKIM-Signature fields say which body hashes to make.

        Called by the first body chunk and at end of message when the MTA does not say it.
        """
        self._body_hasher(self._current())

    def body(self, chunk: bytes) -> None:
        """One body chunk: hashed as it arrives, never kept."""
        self._body_hasher(self._current()).update(chunk)

    def whole_message(self, parsed: ParsedMessage) -> None:
        """The message at once, headers and body (``authmilter check`` reads it from a file)."""
        message = self._current()
        message.whole = parsed
        message.parsed_headers = parsed.headers

    def end_of_message(self, queue_id: str = "") -> None:
        """The message is complete: check :attr:`failure`, then take its :meth:`transaction`.

        Args:
            queue_id: the MTA's queue id, when it sends it only now ("" keeps the earlier one).
        """
        message = self._current()
        message.queue_id = queue_id or message.queue_id

    def transaction(self) -> Transaction:
        """The complete message, to evaluate.

        Raises:
            RuntimeError: no message was started (no MAIL FROM), or a callback failed (then the
                failure action applies instead).
        """
        message = self._current()
        if self.failure:
            raise RuntimeError(f"no transaction: a callback failed ({self.failure})")
        if message.whole is not None:
            parsed, digests = message.whole, None
        else:
            digests = self._body_hasher(message).finish()
            head = assemble_message(self._headers(message), b"")  # the MTA always separates them
            parsed = ParsedMessage(self._headers(message), len(head), head, has_separator=True)
        return Transaction(
            connection=message.connection,
            mail_from=message.mail_from,
            recipients=tuple(message.recipients),
            message=parsed,
            queue_id=message.queue_id,
            body=digests,
            outbound=self._outbound(message),
        )

    def abort(self) -> bool:
        """The message is abandoned (RSET, QUIT, a lost client) or over: forget it.

        Returns:
            True when a message was in progress (between MAIL FROM and now).
        """
        in_message = self._message is not None
        self._message = None
        self._message_failure = ""
        self._prefetching = False
        return in_message

    # --- failures ----------------------------------------------------------------------------

    def failed(self, stage: str, exc: Exception) -> bool:
        """A callback raised: keep why (the exception's type) for end of message.

        Args:
            stage: the callback (``connect`` and ``hello`` spoil the connection, the others the
                message).
            exc: what it raised.

        Returns:
            True for the first failure of this message (or connection): the one to log with its
            traceback; later ones (each body chunk, say) need no more.
        """
        first = not self.failure
        if stage in CONNECTION_STAGES:
            self._connection_failure = self._connection_failure or type(exc).__name__
        else:
            self._message_failure = self._message_failure or type(exc).__name__
        return first

    @property
    def failure(self) -> str:
        """Why this message cannot be checked (a callback failed), or ""."""
        return self._connection_failure or self._message_failure

    # --- what the adapter reads ----------------------------------------------------------------

    @property
    def in_message(self) -> bool:
        """A message is between MAIL FROM and its end."""
        return self._message is not None

    @property
    def queue_id(self) -> str:
        """The current message's queue id, "" when unknown."""
        return self._message.queue_id if self._message is not None else ""

    def headers(self) -> MessageHeaders:
        """The current message's header fields so far (none outside a message)."""
        return self._headers(self._message) if self._message is not None else MessageHeaders(())

    def _ask(self, questions: Sequence[Question]) -> None:
        if questions and self._prefetch is not None and not self.failure:
            self._prefetch(questions)

    def _body_hasher(self, message: _Message) -> BodyHasher:
        if message.body is None:
            headers = self._headers(message)
            needed = body_hashes(message.connection, headers, self._config, self._outbound(message))
            message.body = BodyHasher(needed)
        return message.body

    def _outbound(self, message: _Message) -> str:
        # Found at MAIL FROM's macros; a message without them (authmilter check) finds it here.
        if message.outbound is None:
            message.outbound = outbound_reason(message.connection, self._config)
        return message.outbound

    def _headers(self, message: _Message) -> MessageHeaders:
        if message.parsed_headers is None:
            message.parsed_headers = message.headers.result()
        return message.parsed_headers

    def _current(self) -> _Message:
        if self._message is None:
            raise RuntimeError("message callback without MAIL FROM")
        return self._message

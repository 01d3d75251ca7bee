"""The milter adapter: the only ``Milter.Base`` subclass (STYLE.md §5, §6).

It translates each callback into one event of the connection's
:class:`~authmilter.session.Session` (the transaction state machine, which owns the message being
built), calls ``pipeline.evaluate`` on its transaction at end of message and applies the
:class:`~authmilter.model.Verdict`.
It decides nothing of its own, beyond what only the edge can know: which ``internal_hosts`` entry
matches the client (at connect, put into the Connection), whether an ``ignore_hosts`` client is to
be left alone (accepted at connect), and that one of its own callbacks failed.
Whether a message is inbound (verified) or outbound (signed) is the pipeline's decision.

Protocol choices (negotiated per connection, see :meth:`AuthMilter.negotiate`):

- Every callback before end of message only gathers input, so it is ``@Milter.noreply``: the MTA
  does not wait for it. Nothing can be refused there either; a failure in one is kept and applied at
  end of message, the one place a decision is made. One exception: with ``[dns] prefetch_queries``
  on and a resolver that sends queries ahead (nameservers, a cache), the MTA waits for our MAIL
  FROM reply (:meth:`AuthMilter.negotiate`), so that the lookups MAIL FROM tells start while the
  client still sends the message.
- Callbacks we do not define (``data``, ``eoh``, ``unknown``) are switched off, and only the
  actions we use are asked for: add/insert headers, change (delete) headers, quarantine.
- Header values arrive as sent (``SMFIP_HDR_LEADSPC``, when the MTA offers it, as Postfix and
  Sendmail 8.14+ do): otherwise the MTA drops one space after each colon and "Subject:x" could not
  be told from "Subject: x", which DKIM's ``simple`` header canonicalization (RFC 6376 §3.4.1)
  must. Then the MTA adds no space to the fields we add either: :meth:`AuthMilter._field_value`.
- The body is never kept: each chunk goes through the DKIM body hashes the message needs as it
  arrives (dkim_body.py), which are known at the end of the header block (the signatures are header
  fields; outbound mail gets our signing hash). A message costs the same memory whatever its size.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, Protocol

import Milter

from authmilter import dkim_rsa
from authmilter.actions import internal_error_decision
from authmilter.arc_seal import ARC_SET_FIELDS
from authmilter.authresults import (
    HEADER_NAME,
)
from authmilter.checks import Question
from authmilter.config import Config
from authmilter.connection_socket import (
    ListenerIdentity,
    connection_descriptor,
    inherited_listener,
    listener_identity,
    shut_down,
)
from authmilter.dkim_sign import HEADER_NAME as SIGNATURE_HEADER
from authmilter.dmarc import load_public_suffix_list
from authmilter.history import Envelope, HistoryError, HistoryWriter, make_record
from authmilter.keys import KeyCache
from authmilter.logformat import FIELDS
from authmilter.metrics import Metrics
from authmilter.model import Action, Verdict
from authmilter.pipeline import evaluate, failure_verdict, ignored_host
from authmilter.quickack import QuickAck
from authmilter.resolver import Prefetch, Resolver, build_resolver
from authmilter.session import Session
from authmilter.tables import IPV4_MAPPED_PREFIX, packed_client_ip
from authmilter.transaction import Transaction

log = logging.getLogger(__name__)

MILTER_NAME = "authmilter"
# The only actions we take (smfi_register flags and negotiation): insert our A-R and the quarantine
# header, delete forged A-R (smfi_chgheader with an empty value), hold the message.
ACTIONS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE
# Protocol extensions pymilter leaves off by default that we take when offered (see the top).
EXTENSIONS = Milter.P_HDR_LEADSPC
# Log values come from the network: one line each, bounded.
MAX_LOG_VALUE = 200
QUARANTINE_HEADER = "X-Authmilter-Quarantine"
MAX_QUARANTINE_REASON = 200
# The macros we read (Postfix sends them by default: milter_connect_macros, milter_mail_macros,
# milter_end_of_data_macros). `i` is the queue id; Postfix may only know it at end of message.
CONNECT_MACROS = ("j", "{daemon_name}")
MAIL_MACROS = ("{auth_type}", "{auth_authen}")
QUEUE_ID_MACRO = "i"

_MILTER_CODES = {
    Action.ACCEPT: Milter.ACCEPT,
    Action.QUARANTINE: Milter.ACCEPT,
    Action.REJECT: Milter.REJECT,
    Action.TEMPFAIL: Milter.TEMPFAIL,
}


@dataclass(frozen=True)
class MessageCounts:
    """What the connections of this process are doing.

    Attributes:
        connections: milter connections open (an MTA keeps one per SMTP session, Postfix milter8.c).
        in_progress: connections between MAIL FROM and the end of that message (eom, abort, close).
        ended: messages ended so far.
    """

    connections: int
    in_progress: int
    ended: int


class _MessageCounter:
    # libmilter serves connections from several threads at once, hence the lock; plain ints, as
    # every connection changes them several times.
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections = self._in_progress = self._ended = 0

    def opened(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections

    def closed(self) -> None:
        with self._lock:
            self._connections -= 1

    def started(self) -> None:
        with self._lock:
            self._in_progress += 1

    def ended(self) -> None:
        with self._lock:
            self._in_progress -= 1
            self._ended += 1

    def counts(self) -> MessageCounts:
        with self._lock:
            return MessageCounts(self._connections, self._in_progress, self._ended)


_messages = _MessageCounter()

def message_counts() -> MessageCounts:
    """What this process is doing, for a stopping worker (supervisor.py).

    Returns:
        Open connections, messages in progress and messages ended, over the whole process.
    """
    return _messages.counts()


class HistorySink(Protocol):
    """Where the record of a DMARC-evaluated message goes (history.py implements it)."""

    def record(self, verdict: Verdict, transaction: Transaction, now: float) -> None: ...


@dataclass(frozen=True)
class Runtime:
    """What a worker needs, built once per worker (and again after a reload).

    A reload starts new workers with the new config, and one worker handles a message from MAIL
    FROM to its end, so a message is signed wholly with the old tables and keys or wholly with
    the new ones.
    """

    config: Config
    resolver: Resolver
    history: HistorySink | None
    keys: KeyCache = field(default_factory=KeyCache)
    metrics: Metrics | None = None  # None: [metrics] is off, nothing is counted


class HistoryRecorder:
    """Writes one history line per DMARC-evaluated message (docs/history-schema.md)."""

    def __init__(self, writer: HistoryWriter, config: Config) -> None:
        self._writer = writer
        self._config = config

    def record(self, verdict: Verdict, transaction: Transaction, now: float) -> None:
        if verdict.dmarc is None:
            return
        connection = transaction.connection
        envelope = Envelope(
            connection.client_ip,
            transaction.mail_from,
            transaction.recipients,
            connection.helo,
            transaction.queue_id,
        )
        record = make_record(verdict, envelope, self._config.authserv_id, now, self._config.dmarc.org_domain)
        self._writer.append(record)

    def reopen(self) -> None:
        self._writer.reopen()


def build_runtime(
    config: Config, history: HistorySink | None = None, metrics: Metrics | None = None
) -> Runtime:
    """Build what the milter needs from a validated config.

    Args:
        config: the configuration.
        history: where DMARC-evaluated messages are recorded; None = the config's ``[history] path``
            (no history when that is empty).
        metrics: where messages, connections and DNS lookups are counted; None: nowhere.

    Returns:
        The runtime: config, the resolver it describes, the history sink, and the worker's
        signing keys (loaded here, once, so no message waits for a key file).

    Raises:
        ZoneFileError: a configured zone file is unreadable or invalid.
        KeyFileError: a KeyTable key became unusable since the configuration was checked.
        OSError: the pinned Public Suffix List became unreadable since then.
    """
    resolver = build_resolver(config.dns, metrics)
    load_public_suffix_list(config.dmarc)  # ~10,000 rules: parsed here, not on the first message
    dkim_rsa.install()  # RSA signing and verifying through OpenSSL
    keys = KeyCache(follow_changes=False)  # keys change on SIGHUP only, all at once
    if config.signing_table is not None:
        for entry in config.signing_table.key_table:
            keys.get(entry.key_path, entry.algorithm, config.signing.key_permissions)
    if history is None and config.history.path:
        history = HistoryRecorder(_history_writer(config.history.path), config)
    return Runtime(config, resolver, history, keys, metrics)


def _history_writer(path: str) -> HistoryWriter:
    """The history file's writer; one that cannot open the file now tries again at each record.

    A lost history line never changes what happens to a message (docs/history-schema.md), so an
    unusable history file is no reason to stop checking mail: it is logged here, and with each
    lost record.
    """
    try:
        return HistoryWriter(path)
    except HistoryError as e:
        log.error("%s; mail is checked as usual, its history records are lost until it can be opened", e)
        return HistoryWriter(path, open_now=False)


def serve(connection: str, runtime: Runtime, ready: Callable[[], None] | None = None) -> None:
    """Serve the milter protocol until libmilter stops (SIGTERM, ``Milter.stop()``).

    A connection on which the MTA sends nothing for ``[milter] idle_timeout`` seconds is closed by
    libmilter (smfi_settimeout), so a stalled or abandoned connection does not hold a thread.

    Args:
        connection: libmilter's connection string (``fd:N``, ``unix:PATH``, ``inet:PORT@HOST``).
        runtime: what every connection uses.
        ready: called (from another thread) once libmilter serves the socket; never if it fails
            to start.
    """
    gate = ConnectionGate.for_listener(connection, runtime.config.milter.max_connections)
    Milter.factory = functools.partial(AuthMilter, runtime, QuickAck.for_listener(connection), gate)
    Milter.set_flags(ACTIONS)
    _settle_collector()
    if ready is not None:
        _call_when_serving(ready)
    Milter.runmilter(MILTER_NAME, connection, runtime.config.milter.idle_timeout)


# Container objects allocated, net, before the cyclic garbage collector looks at the youngest
# generation (Python's default is 700). A message allocates thousands that reference counting
# frees; at 700 the collector ran every few messages and re-scanned the survivors: the cache
# entries and the message in progress.
GC_YOUNGEST_THRESHOLD = 10_000


def _settle_collector() -> None:
    """Keep the cyclic garbage collector off what lives as long as the worker.

    Everything loaded before serving (modules, the config and its tables, the Public Suffix List,
    keys) is never garbage; freezing it keeps the collector's full passes from walking it again
    (the gc module's advice for pre-forked servers, which also leaves those pages shared with the
    supervisor). Measured in a worker driven over the milter protocol: collection took 30-45 us
    per message before (a full pass over the start-up heap ~20 ms), ~6 us after.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNGEST_THRESHOLD)


# smfi_main starts a signal thread (mi_control_startup) and then, in Debian's build with
# _FFR_WORKERS_POOL, its worker pool (mi_pool_controller_init: a controller and pool threads):
# the last steps before its accept loop that can fail. Two threads more than before smfi_main
# therefore mean libmilter is serving the socket.
LIBMILTER_STARTUP_THREADS = 2
STARTUP_POLL = 0.005


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _call_when_serving(ready: Callable[[], None]) -> None:
    """Call ``ready`` from a thread of its own once libmilter has started its threads."""
    before = _thread_count() + 1  # this watcher

    def watch() -> None:
        while _thread_count() < before + LIBMILTER_STARTUP_THREADS:
            time.sleep(STARTUP_POLL)
        ready()

    threading.Thread(target=watch, name="ready", daemon=True).start()


# Descriptors a worker keeps for itself (listener, control socket, log, history file, DNS
# queries) before connections count; each connection needs one for its socket and may hold a
# second at the same time (the socket of a DNS query made for its message).
RESERVED_DESCRIPTORS = 64
DESCRIPTORS_PER_CONNECTION = 2
# The "no room" warning is logged at most once per this many seconds, with the count refused.
REFUSAL_LOG_INTERVAL = 60.0


def connection_cap(configured: int) -> int:
    """``[milter] max_connections``, lowered to what this process's descriptor limit leaves room for.

    Without that, a worker at its descriptor limit leaves new connections in the kernel's accept
    queue unanswered until the MTA's milter timeout, and logs nothing.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return min(configured, max(1, (soft - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION))


class ConnectionGate:
    """Closes, at once, the connections a worker has no room for.

    The MTA then sees the milter connection closed and applies its ``milter_default_action`` to
    that SMTP session straight away (Postfix: tempfail by default), instead of waiting for its
    milter timeout.

    Args:
        identity: the listening socket's identity (connection_socket.py); None when unknown,
            and then connections over the cap are served after all (never left unanswered).
        cap: the most connections this worker serves at once.
    """

    def __init__(self, identity: ListenerIdentity | None, cap: int) -> None:
        self.identity = identity
        self.cap = cap
        self._lock = threading.Lock()
        self._refused = 0
        self._logged_at: float | None = None

    @classmethod
    def for_listener(cls, connection: str, configured: int) -> ConnectionGate:
        """The gate for libmilter's connection string and ``[milter] max_connections``."""
        fd = inherited_listener(connection)
        return cls(listener_identity(fd) if fd is not None else None, connection_cap(configured))

    def admits(self, open_connections: int) -> bool:
        return open_connections <= self.cap

    def refuse(self, context: object, open_connections: int) -> bool:
        """Close the connection behind ``context``; say so in the log at most once per interval.

        Returns:
            True when it was closed; False when its socket could not be found (it is served then).
        """
        fd = connection_descriptor(context, self.identity)
        closed = fd is not None and shut_down(fd)
        with self._lock:
            self._refused += 1
            now = time.monotonic()
            if self._logged_at is not None and now - self._logged_at < REFUSAL_LOG_INTERVAL:
                return closed
            refused, self._refused, self._logged_at = self._refused, 0, now
        log.warning(
            "worker %d has no room for more MTA connections (%d open, limit %d: [milter] "
            "max_connections and the descriptor limit): %d %s; raise max_connections, workers "
            "or LimitNOFILE=",
            os.getpid(),
            open_connections - 1,
            self.cap,
            refused,
            "closed at once, the MTA applies its milter_default_action"
            if closed
            else "served all the same (their socket could not be found)",
        )
        return closed


P = ParamSpec("P")
_Gatherer = Callable[Concatenate["AuthMilter", P], None]
_Callback = Callable[Concatenate["AuthMilter", P], int]


_CONTINUE: int = Milter.CONTINUE
_NOREPLY: int = Milter.NOREPLY


def _gathers(callback: _Gatherer[P]) -> _Callback[P]:
    """Make a callback that only gathers input: no reply awaited, never raises.

    A failure is logged and kept; end of message applies the configured failure action.
    Milter.noreply's work is done here, in the same frame (a header field is one callback): the
    callback is marked as one whose reply the MTA need not await (protocol_mask() reads the mark),
    and it answers NOREPLY when negotiate() left the MTA not waiting for it.
    """
    no_reply_bit: int = Milter.OPTIONAL_CALLBACKS[callback.__name__][0]

    def contained(self: AuthMilter, /, *args: P.args, **kwargs: P.kwargs) -> int:
        try:
            callback(self, *args, **kwargs)
        except Exception as exc:
            self._record_failure(callback.__name__, exc)
        return _NOREPLY if self._protocol & no_reply_bit else _CONTINUE

    functools.update_wrapper(contained, callback)
    contained.__dict__["milter_protocol"] = no_reply_bit
    return contained


def _noreply(callback: _Callback[P]) -> _Callback[P]:
    """Milter.noreply: NOREPLY when negotiate() left the MTA not waiting for this callback."""
    noreply: _Callback[P] = Milter.noreply(callback)
    return noreply


def _header_values_as_bytes(callback: _Callback[P]) -> _Callback[P]:
    """Milter.decode("bytes"): header values arrive undecoded; message.py reads them as wire bytes."""
    decoded: _Callback[P] = Milter.decode("bytes")(callback)
    return decoded


class AuthMilter(Milter.Base):  # type: ignore[misc]  # pymilter has no type information
    """One SMTP connection: gathers each message and applies its verdict.

    Args:
        runtime: the worker's config, resolver and history sink.
        quickack: prompt TCP acknowledgements for the listener (quickack.py); off by default.
        gate: closes connections beyond this worker's room (``[milter] max_connections``);
            None: no limit.
    """

    def __init__(
        self, runtime: Runtime, quickack: QuickAck | None = None, gate: ConnectionGate | None = None
    ) -> None:
        # pymilter makes one object per milter connection and calls close() once at its end.
        self._open_connections = _messages.opened()
        self._gate = gate
        self._open = True
        self._runtime = runtime
        self._metrics = runtime.metrics
        if self._metrics is not None:
            self._metrics.connection_opened()
        self._config = runtime.config
        # The connection and its current message, fed by the callbacks below; the DNS names the
        # message tells are prefetched as they come (_prefetch), cancelled when it ends.
        # Only where queries can go out ahead: otherwise awaiting MAIL FROM (negotiate) costs the MTA
        # a round trip per message for nothing.
        self._prefetching = runtime.config.dns.prefetch_queries > 0 and runtime.resolver.sends_ahead
        self._session = Session(runtime.config, self._prefetch if self._prefetching else None)
        self._lookups: Prefetch | None = None
        # Header changes were sent for the current message: a failure after that must not resend them.
        self._modifying = False
        self._quickack = quickack or QuickAck(None)
        self._ack_fd: int | None = None
        # SMFIP_HDR_LEADSPC was negotiated: header values keep the whitespace after the colon.
        self._leading_space = False

    # --- negotiation -------------------------------------------------------------------------

    def negotiate(self, opts: list[int]) -> int:
        """Ask for our actions only, and skip or do not await every step we do not need.

        Args:
            opts: actions, protocol steps and two reserved words offered by the MTA; changed in place.

        Returns:
            Milter.CONTINUE, or Milter.ALL_OPTS to leave the offer as it is if it cannot be read.
        """
        try:
            offered_actions, offered_protocol = opts[0], opts[1]
            # protocol_mask() comes from the @noreply/@nocallback marks on the callbacks; SKIP is a
            # reply we never give.
            self._actions = offered_actions & ACTIONS
            self._protocol = offered_protocol & ~(self.protocol_mask() & ~EXTENSIONS) & ~Milter.P_SKIP
            self._leading_space = bool(self._protocol & Milter.P_HDR_LEADSPC)
            if len(self._config.ignore_hosts):
                # connect() must be answered to turn an ignored client away (see there).
                self._protocol &= ~Milter.P_NR_CONN
            if self._prefetching:
                # Postfix (milter8.c) keeps the events it awaits no reply for in its stream buffer
                # until one that awaits a reply: unanswered, MAIL FROM reached us with the message
                # at end of data (measured: a median 3 ms before end of message, against ~20 ms
                # of SMTP between them), and the SPF lookups it starts gained nothing.
                self._protocol &= ~Milter.P_NR_MAIL
            opts[0], opts[1], opts[2], opts[3] = self._actions, self._protocol, 0, 0
        except Exception:
            log.exception("cannot negotiate with the MTA (offer %r)", opts)
            return int(Milter.ALL_OPTS)
        return int(Milter.CONTINUE)

    # --- gathering ---------------------------------------------------------------------------

    @_noreply
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        """Gather the client; leave an ``ignore_hosts`` client alone for the whole connection.

        Accepting at connect makes the MTA skip this milter until the connection ends (Postfix
        milter8.c: MILTER8_STAT_ACCEPT_CON; libmilter: "accept this connection without further
        filter processing"), as OpenDKIM's PeerList and OpenDMARC's IgnoreHosts do. The MTA waits
        for this reply only when ``ignore_hosts`` is set (negotiate).

        Returns:
            Milter.ACCEPT for an ignored client, else Milter.CONTINUE (NOREPLY when not awaited).
        """
        gate, count = self._gate, self._open_connections
        if gate is not None and not gate.admits(count) and gate.refuse(self._ctx, count):
            return int(Milter.CONTINUE)  # libmilter reads EOF next and ends the connection (close())
        try:
            client_ip, client_name = self._gather_client(hostname, family, hostaddr)
            ignored = ignored_host(client_ip, client_name, self._config)
        except Exception as exc:
            self._record_failure("connect", exc)
            return int(Milter.CONTINUE)
        if ignored is None:
            return int(Milter.CONTINUE)
        log.info(
            "client=%s name=%s ignored (ignore_hosts: %s at %s): accepted without any processing",
            _log_value(client_ip),
            _log_value(client_name),
            _log_value(ignored.text),
            ignored.source,
        )
        return int(Milter.ACCEPT)

    def _gather_client(self, hostname: str, family: int, hostaddr: object) -> tuple[str, str]:
        # Our negotiation reply made the connection "interactive": acknowledge what the MTA sends
        # from here on promptly, or its Nagle algorithm stalls each message ~40 ms (quickack.py).
        self._ack_fd = self._quickack.connection_fd(self._ctx)
        self._quickack.acknowledge(self._ack_fd)
        client_ip, client_name = client_ip_from(family, hostaddr), _ptr_name(hostname)
        self._session.connect(client_ip, client_name, self._macros(CONNECT_MACROS))
        if log.isEnabledFor(logging.DEBUG):
            entry = self._session.internal_host
            log.debug(
                "client=%s name=%s internal_hosts: %s",
                _log_value(client_ip),
                _log_value(client_name),
                "no entry" if entry is None else f"{entry.text} at {entry.source}",
            )
        return client_ip, client_name

    @_gathers
    def hello(self, hostname: str) -> None:
        self._session.hello(hostname)

    # pymilter calls envfrom_bytes and envrcpt_bytes; its own decode the ESMTP parameters too, which
    # we never read. UTF-8 with surrogateescape, as pymilter's: the original bytes survive, and
    # decoding cannot fail.
    def envfrom_bytes(self, mail_from: bytes, *params: bytes) -> int:
        return self.envfrom(mail_from.decode("utf-8", "surrogateescape"))

    def envrcpt_bytes(self, recipient: bytes, *params: bytes) -> int:
        return self.envrcpt(recipient.decode("utf-8", "surrogateescape"))

    @_gathers
    def envfrom(self, mail_from: str, *params: str) -> None:
        self._quickack.acknowledge(self._ack_fd)  # our reply to the previous message, as at connect
        self._reset_message()
        # Started before the macros are read: should that fail, the headers are still gathered,
        # so forged A-R can be deleted whatever the failure action.
        self._session.mail(mail_from)
        _messages.started()  # first, so a stopping worker waits for this message
        self._session.mail_macros(self._mta_queue_id(), self._macros(MAIL_MACROS))

    @_gathers
    def envrcpt(self, recipient: str, *params: str) -> None:
        self._quickack.acknowledge(self._ack_fd)  # after our MAIL FROM reply, when it is awaited
        self._session.rcpt(recipient)

    @_header_values_as_bytes
    @_gathers
    def header(self, name: str, value: bytes) -> None:
        self._session.header(name, value, leading_space_included=self._leading_space)

    @_gathers
    def body(self, chunk: bytes) -> None:
        self._quickack.acknowledge(self._ack_fd)  # the MTA may hold the next chunk for our ACK
        self._session.body(chunk)

    # --- end of message ----------------------------------------------------------------------

    def eom(self) -> int:
        """Evaluate the message and apply the verdict (the only callback that decides).

        Returns:
            Milter.ACCEPT (also for quarantine), Milter.REJECT or Milter.TEMPFAIL.
        """
        started = time.perf_counter()
        try:
            return self._end_of_message(started)
        except Exception as exc:
            self._record_failure("eom", exc)
            return self._end_failed_message(started)
        finally:
            self._reset_message()

    def abort(self) -> int:
        """The message was abandoned (RSET, QUIT, or the client went away): forget it."""
        self._reset_message()
        return int(Milter.CONTINUE)

    def close(self) -> int:
        """The connection is over."""
        self._reset_message()
        if self._open:
            self._open = False
            _messages.closed()
            if self._metrics is not None:
                self._metrics.connection_closed()
        return int(Milter.CONTINUE)

    def _end_of_message(self, started: float) -> int:
        self._session.end_of_message(self._mta_queue_id())
        if self._session.failure:
            return self._end_failed_message(started)
        transaction = self._session.transaction()
        prefetched = self._lookups.sent if self._lookups is not None else 0
        verdict = evaluate(
            transaction, self._runtime.resolver, self._config, self._runtime.keys, prefetched=prefetched
        )
        code = self._apply(verdict)
        if self._metrics is not None:
            self._metrics.message(verdict)
        if verdict.dmarc is not None:
            self._record_history(verdict, transaction)
        if log.isEnabledFor(logging.INFO):  # the line costs more than its check at level warning
            self._log_verdict(transaction, verdict, started)
        return code

    def _end_failed_message(self, started: float) -> int:
        reason = self._session.failure
        decision = internal_error_decision(reason, self._config.policy)
        if self._modifying and decision.action in (Action.ACCEPT, Action.QUARANTINE):
            # The failure came while applying a verdict: its header changes are sent, send no more.
            return int(_MILTER_CODES[decision.action])
        try:
            verdict = failure_verdict(reason, self._session.headers(), self._config, self._queue_id())
            code = self._apply(verdict)
        except Exception:
            log.exception("queue_id=%s cannot apply the failure action", _log_value(self._queue_id()))
            return int(_MILTER_CODES[decision.action])
        if self._metrics is not None:
            self._metrics.message(verdict)
        fields = {
            "queue_id": _log_value(self._queue_id()),
            "client": _log_value(self._session.client_ip),
            "action": decision.action.value,
            "reason": _log_value(decision.reason),
            "ms": round(_elapsed_ms(started), 1),
        }
        log.info(
            "queue_id=%s client=%s action=%s reason=%s ms=%.1f", *fields.values(), extra={FIELDS: fields}
        )
        return code

    # --- applying a verdict ------------------------------------------------------------------

    def _apply(self, verdict: Verdict) -> int:
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            if verdict.reply is not None:
                self.setreply(verdict.reply.code, verdict.reply.enhanced, verdict.reply.text)
            return int(_MILTER_CODES[verdict.action])
        # Delete before inserting ours: inserting an A-R first would shift the indices. Forged A-R
        # are hostile whatever the direction (RFC 8601 §5), so outbound mail loses them too.
        self._delete_authentication_results(verdict.forged_authentication_results)
        if verdict.authentication_results:  # none on outbound mail: we did not verify it
            # RFC 8601 §4: above the MTA's own Received, so index 0 (smfi_insheader).
            self.addheader(HEADER_NAME, self._field_value(verdict.authentication_results), 0)
        # Each at the top (RFC 6376 §5.6: prepended), the last first, so the first ends on top.
        for signature in reversed(verdict.signatures):
            self.addheader(SIGNATURE_HEADER, self._field_value(signature), 0)
        # Our ARC Set on top (RFC 8617 §4.1: ARC fields are prepended), ARC-Seal first.
        for name, value in reversed(tuple(zip(ARC_SET_FIELDS, verdict.arc_seal, strict=False))):
            self.addheader(name, self._field_value(value), 0)
        if verdict.action is Action.QUARANTINE:
            self._quarantine(verdict.reason)
        return int(Milter.ACCEPT)

    def _field_value(self, value: str) -> str:
        """A value for a field we add, with the one space after the colon that readers expect.

        The MTA puts it there itself unless SMFIP_HDR_LEADSPC was negotiated (Postfix milter8.c);
        a DKIM-Signature was signed with it (dkimpy), so under ``simple`` header canonicalization
        it must be there.
        """
        return " " + value if self._leading_space else value

    def _delete_authentication_results(self, indices: tuple[int, ...]) -> None:
        # The indices come highest first: deleting the last first keeps the others valid
        # (forward deletion removes the wrong fields: OpenDKIM bug #148).
        self._modifying = True
        for index in indices:
            self.chgheader(HEADER_NAME, index, "")

    def _quarantine(self, reason: str) -> None:
        text = _ascii_line(reason, MAX_QUARANTINE_REASON) or "quarantined by authmilter"
        if self._config.milter.quarantine == "hold":
            self.quarantine(text)
        else:
            self.addheader(QUARANTINE_HEADER, self._field_value(text))

    def _record_history(self, verdict: Verdict, transaction: Transaction) -> None:
        history = self._runtime.history
        if history is None:
            return
        try:
            history.record(verdict, transaction, time.time())
        except HistoryError as e:
            # A full disk would otherwise print a traceback per message.
            log.error("queue_id=%s history record lost: %s", _log_value(transaction.queue_id), e)
            self._history_lost()
        except Exception:
            # The message is judged already; a lost history row must not change what happens to it.
            log.exception("queue_id=%s cannot write the history record", _log_value(transaction.queue_id))
            self._history_lost()

    def _history_lost(self) -> None:
        if self._metrics is not None:
            self._metrics.history_write_error()

    # --- helpers -----------------------------------------------------------------------------

    def _prefetch(self, questions: Sequence[Question]) -> None:
        if self._lookups is None:
            self._lookups = self._runtime.resolver.prefetch(self._config.dns.prefetch_queries)
        self._lookups.start(questions)

    def _reset_message(self) -> None:
        if self._session.abort():
            _messages.ended()
        if self._lookups is not None:  # the queries no check read: their sockets are closed
            self._lookups.cancel()
            self._lookups = None
        self._modifying = False

    def _record_failure(self, stage: str, exc: Exception) -> None:
        if self._session.failed(stage, exc):  # one traceback per message, not one per body chunk
            log.exception(
                "queue_id=%s client=%s internal error in the %s callback: %s",
                _log_value(self._queue_id()),
                _log_value(self._session.client_ip),
                stage,
                _log_value(str(exc)),
            )

    def _queue_id(self) -> str:
        if self._session.queue_id:
            return self._session.queue_id
        try:
            return self._mta_queue_id()
        except Exception:  # asked while handling a failure; the context itself may be broken
            return ""

    def _macro(self, name: str) -> str:
        value = self.getsymval(name)
        return value if isinstance(value, str) else ""

    def _mta_queue_id(self) -> str:
        # Made safe once, here: the pipeline, the resolver's DNS-budget warning, the history and the
        # failure lines all name it, and a macro value is the MTA's text, whatever it holds.
        value = self._macro(QUEUE_ID_MACRO)
        return _log_value(value) if value else ""

    def _macros(self, names: tuple[str, ...]) -> dict[str, str]:
        return {name: value for name in names if (value := self._macro(name))}

    def _log_verdict(self, transaction: Transaction, verdict: Verdict, started: float) -> None:
        # One line per message; in [log] format = "json" the fields below are the object's keys.
        fields: dict[str, object] = {
            "queue_id": _log_value(transaction.queue_id),
            "client": _log_value(transaction.connection.client_ip),
            "from": _log_value(",".join(transaction.authors.domains) or "-"),
        }
        if verdict.outbound:
            # OpenDKIM's LogWhy at INFO: why it is outbound, and what was signed or why not.
            fields |= {
                "reason": _log_value(verdict.reason),
                "signatures": len(verdict.signatures),
                "action": verdict.action.value,
                "ms": round(_elapsed_ms(started), 1),
            }
            log.info(
                "queue_id=%s client=%s from=%s %s signatures=%d action=%s ms=%.1f",
                *fields.values(),
                extra={FIELDS: fields},
            )
            return
        dkim = ",".join(f"{d.result.value}:{d.domain or '-'}" for d in verdict.dkim) or "none"
        check_ms = {timing.check: round(timing.ms, 2) for timing in verdict.timings}
        fields |= {
            "spf": verdict.spf.result.value if verdict.spf else "-",
            "helo": verdict.helo.result.value if verdict.helo else "-",
            "dkim": [
                {"result": d.result.value, "domain": _log_value(d.domain), "selector": _log_value(d.selector)}
                for d in verdict.dkim
            ],
            "dmarc": verdict.dmarc.result.value if verdict.dmarc else "-",
            "action": verdict.action.value,
            "ms": round(_elapsed_ms(started), 1),
            "check_ms": check_ms,
        }
        log.info(
            "queue_id=%s client=%s from=%s spf=%s dkim=%s dmarc=%s action=%s ms=%.1f checks=%s",
            fields["queue_id"],
            fields["client"],
            fields["from"],
            fields["spf"],
            _log_value(dkim),
            fields["dmarc"],
            fields["action"],
            fields["ms"],
            ",".join(f"{check}:{ms:.1f}" for check, ms in check_ms.items()) or "-",
            extra={FIELDS: fields},
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "queue_id=%s why: action=%s (%s); spf: %s; dkim: %s; dmarc: %s",
                _log_value(transaction.queue_id),
                verdict.action.value,
                _log_value(verdict.reason),
                _log_value(verdict.spf.explanation if verdict.spf else "-"),
                _log_value(
                    "; ".join(f"{d.domain}/{d.selector}: {d.reason or d.result.value}" for d in verdict.dkim)
                    or "-"
                ),
                _log_value(verdict.dmarc.reason if verdict.dmarc else "-"),
            )


def client_ip_from(family: int, hostaddr: object) -> str:
    """The client address from the connect callback's arguments.

    Args:
        family: the socket family (``AF_INET``, ``AF_INET6``, ``AF_UNIX``, or another for local mail).
        hostaddr: ``(ip, port)`` for IPv4, ``(ip, port, flowinfo, scope_id)`` for IPv6, the socket
            name for a unix socket, None when the MTA knows no address; a bare ip string (as pymilter's
            TestCtx passes) is taken too.

    Returns:
        The address as text ("" when there is none), IPv4-mapped IPv6 as IPv4 (RFC 4291 §2.5.5.2).
    """
    if family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    text = hostaddr[0] if isinstance(hostaddr, tuple) and hostaddr else hostaddr
    if not isinstance(text, str):
        return ""
    packed = packed_client_ip(text)
    if packed is None:
        return ""
    if packed[:12] == IPV4_MAPPED_PREFIX:
        packed = packed[12:]
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _ptr_name(hostname: str) -> str:
    # libmilter passes "[address]" when the client has no (verified) PTR name.
    return "" if hostname.startswith("[") else hostname


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _log_value(value: str) -> str:
    """One line, bounded: a value from the network must not forge or flood log lines."""
    if len(value) <= MAX_LOG_VALUE and value.isprintable():  # the usual value: nothing to replace
        return value or "-"
    cleaned = "".join(char if char.isprintable() else "?" for char in value[:MAX_LOG_VALUE])
    return (cleaned + "..." if len(value) > MAX_LOG_VALUE else cleaned) or "-"


def _ascii_line(text: str, limit: int) -> str:
    # Printable ASCII only: the quarantine reason and header value go to the MTA as they are.
    return "".join(char if " " <= char <= "~" else "?" for char in text[:limit]).strip()

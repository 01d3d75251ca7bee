"""The order of the checks and the one place a verdict is made.

``evaluate()`` first decides the direction (:func:`outbound_reason`). Inbound mail gets SPF
(MAIL FROM, then HELO), DKIM verification, DMARC over both, the local policy (actions.py), and
our Authentication-Results. Outbound mail (an internal host, a SASL-authenticated client, a
signing ``{daemon_name}``) is not verified and gets no Authentication-Results; it is signed when the
SigningTable has an entry for it (:func:`sign_transaction`, which ``authmilter sign`` calls too).
Forged Authentication-Results are listed for deletion in both directions (RFC 8601 §5).

Nothing here does I/O of its own: DNS goes through the resolver passed in, private keys through
the key cache passed in. The milter adapter and the CLI both build a :class:`Transaction` and call
this module, so every decision can be tested without a socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from authmilter.actions import Decision, decide_action, internal_error_decision, unenforced_disposition
from authmilter.arc_check import arc_body_hashes, trusted_forwarder, verify_arc, with_override
from authmilter.arc_seal import (
    SEAL_BODY_HASH,
    Sealer,
    SealOutcome,
    own_results,
    recorded_status,
    seal_message,
)
from authmilter.authresults import find_forged_authentication_results, render_authentication_results
from authmilter.config import Config
from authmilter.dkim_body import BodyDigests, BodyHashSpec
from authmilter.dkim_sign import HEADER_NAME as SIGNATURE_HEADER
from authmilter.dkim_sign import (
    KeyProvider,
    SigningError,
    plan_signatures,
    sign_message,
    signing_address,
    signing_body_hash,
)
from authmilter.dkim_verify import body_hashes_needed, verify_dkim
from authmilter.dmarc import evaluate_dmarc, from_header_error, too_many_author_domains
from authmilter.keys import KeyCache, PrivateKey
from authmilter.message import FromAuthors, MessageHeaders, ParsedMessage, parse_from
from authmilter.model import (
    Action,
    ArcResult,
    AuthResult,
    Disposition,
    DkimResult,
    DmarcVerdict,
    SpfResult,
    Verdict,
)
from authmilter.resolver import DnsBudget, Resolver
from authmilter.spf_check import check_helo, check_mail_from
from authmilter.tables import HostEntry, KeyEntry

log = logging.getLogger(__name__)

# A local submission (Postfix non_smtpd_milters, no client address) is judged as loopback for the
# internal-hosts check, as OpenDKIM does.
LOCAL_SUBMISSION_ADDRESS = "127.0.0.1"
# The macros that say the client authenticated with SASL (Postfix sends them at MAIL FROM).
AUTH_MACROS = ("{auth_authen}", "{auth_type}")
DAEMON_NAME_MACRO = "{daemon_name}"


@dataclass(frozen=True)
class Connection:
    """What the MTA told us about the SMTP client.

    Attributes:
        client_ip: the client's address as text ("" when unknown, e.g. a local submission).
        helo: the HELO/EHLO name.
        client_name: the verified PTR name the MTA found ("" or "unknown" when none).
        macros: milter macros of interest (``{daemon_name}``, ``{auth_type}``, ``j`` ...).
        internal_host: the ``[milter] internal_hosts`` entry that decided for this client
            (:func:`match_internal_host`; check ``included``), or None: no entry covers it.
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
        body: the DKIM body hashes, computed as the body streamed in (:func:`body_hashes`; the
            milter keeps no body, so its ``message`` is the header block only); None: computed
            from ``message``'s body (a message read whole, as ``authmilter check`` does).
    """

    connection: Connection
    mail_from: str
    recipients: tuple[str, ...]
    message: ParsedMessage
    queue_id: str = ""
    body: BodyDigests | None = None


@dataclass(frozen=True)
class SigningOutcome:
    """What signing one message gave.

    Attributes:
        signatures: DKIM-Signature values (without the name), the first on top.
        reason: for the log: what was signed (``d=example.com s=sel``...), or why nothing was.
    """

    signatures: tuple[str, ...]
    reason: str


def match_internal_host(client_ip: str, client_name: str, config: Config) -> HostEntry | None:
    """The ``[milter] internal_hosts`` entry deciding for a client (the connect-time match).

    Args:
        client_ip: the client address ("" for a local submission, judged as 127.0.0.1).
        client_name: the client name the MTA verified, or "".
        config: the configuration.

    Returns:
        The most specific entry covering the client (check ``included``: a ``!`` entry excludes),
        or None.
    """
    return config.internal_hosts.match(client_ip or LOCAL_SUBMISSION_ADDRESS, client_name)


def ignored_host(client_ip: str, client_name: str, config: Config) -> HostEntry | None:
    """The ``[milter] ignore_hosts`` entry that puts a client beyond any processing, or None.

    Args:
        client_ip: the client address ("" for a local submission, judged as 127.0.0.1).
        client_name: the client name the MTA verified, or "".
        config: the configuration.

    Returns:
        The most specific entry covering the client when it includes it (not a ``!`` entry).
    """
    entry = config.ignore_hosts.match(client_ip or LOCAL_SUBMISSION_ADDRESS, client_name)
    return entry if entry is not None and entry.included else None


def outbound_reason(connection: Connection, config: Config) -> str:
    """Why mail on this connection is outbound (signed, not verified), or "" for inbound mail.

    Args:
        connection: the client, with its internal-hosts match and macros.
        config: ``skip_authenticated`` and ``[signing] sign_daemon_names``.

    Returns:
        e.g. ``"internal host (10.0.0.0/8 at /etc/authmilter/hosts:3)"``,
        ``"authenticated as bob"`` or ``"daemon_name submission"``; "" when inbound.
    """
    entry = connection.internal_host
    if entry is not None and entry.included:
        return f"internal host ({entry.text} at {entry.source})"
    macros = connection.macros
    if config.milter.skip_authenticated and any(macros.get(name) for name in AUTH_MACROS):
        who = macros.get("{auth_authen}") or f"an unnamed user ({macros.get('{auth_type}')})"
        return f"authenticated as {who}"
    daemon = macros.get(DAEMON_NAME_MACRO, "")
    if daemon and daemon in config.signing.sign_daemon_names:
        return f"daemon_name {daemon}"
    return ""


def body_hashes(connection: Connection, headers: MessageHeaders, config: Config) -> frozenset[BodyHashSpec]:
    """The DKIM body hashes this message will need, known at the end of its header block.

    Args:
        connection: the client (outbound mail is signed, inbound mail verified).
        headers: the header fields, with the DKIM-Signature fields to verify.
        config: ``[dkim]`` and ``[signing]``.

    Returns:
        For outbound mail, the hash our signatures carry; for inbound mail, one per distinct body
        canonicalization, l= and hash of the signatures that will be checked (RFC 6376 §3.7), and
        of the ARC-Message-Signatures (RFC 8617 §4.1.2); the hash of our ARC seal when we seal.
    """
    outbound = bool(outbound_reason(connection, config))
    sealing = {SEAL_BODY_HASH} if config.arc.seals(outbound) else set()
    if outbound:
        return frozenset({signing_body_hash(config.signing), *sealing})
    values = (field.value.encode("latin-1") for field in headers.get_all(SIGNATURE_HEADER))
    return body_hashes_needed(values, config.dkim) | arc_body_hashes(headers, config.arc) | sealing


def sign_transaction(
    transaction: Transaction, config: Config, keys: KeyCache | None = None, now: float | None = None
) -> SigningOutcome:
    """Sign one outbound message as the SigningTable says (the daemon and ``authmilter sign``).

    Args:
        transaction: the message and its envelope.
        config: ``[signing]`` and its tables.
        keys: the worker's key cache; None loads the keys for this call only.
        now: the signing time (t=) in Unix seconds; None = the clock.

    Returns:
        The signatures, and what was signed or why nothing was (no table entry, no usable From,
        a header block dkimpy cannot parse).

    Raises:
        KeyFileError: a key file became unusable since the configuration was loaded (our fault:
            the caller applies the internal-error action rather than send the mail unsigned).
    """
    message = transaction.message
    settings = config.signing
    if message.headers.truncated:
        return SigningOutcome((), "not signed: too many header fields to sign reliably")
    address, problem = signing_address(message.headers, transaction.mail_from, settings.signing_domain)
    if problem:
        return SigningOutcome((), f"not signed: no {settings.signing_domain} address to sign for: {problem}")
    plan = plan_signatures(config.signing_table, address, settings.multiple_signatures)
    if not plan.signers:
        return SigningOutcome((), f"not signed: {plan.reason}")
    provider = _key_provider(keys or KeyCache(), settings.key_permissions)
    signed_at = time.time() if now is None else now
    try:
        signatures = sign_message(message.raw, plan.signers, provider, settings, signed_at, transaction.body)
    except SigningError as e:
        return SigningOutcome((), f"not signed: {e}")
    made = ", ".join(f"d={s.domain} s={s.selector} ({s.rule.source})" for s in plan.signers)
    return SigningOutcome(signatures, f"signed for {address}: {made}")


def _key_provider(cache: KeyCache, permissions: str) -> KeyProvider:
    def key_of(entry: KeyEntry) -> PrivateKey:
        return cache.get(entry.key_path, entry.algorithm, permissions)

    return key_of


def evaluate(
    transaction: Transaction,
    resolver: Resolver,
    config: Config,
    keys: KeyCache | None = None,
    now: float | None = None,
) -> Verdict:
    """Check (inbound) or sign (outbound) one message and decide what to do with it.

    Args:
        transaction: the message, its envelope and connection.
        resolver: the only way to DNS.
        config: the configuration.
        keys: the worker's key cache, for outbound mail; None loads keys for this call only.
        now: the signing time for outbound mail; None = the clock.

    Returns:
        The verdict. Never raises: an internal failure (a key file gone unreadable included)
        becomes a verdict with the configured failure action (tempfail by default), logged with
        the queue id and traceback.
    """
    try:
        why_outbound = outbound_reason(transaction.connection, config)
        if why_outbound:
            return _evaluate_outbound(transaction, config, why_outbound, keys, now)
        return _evaluate(transaction, resolver, config, keys, now)
    except Exception as e:
        log.exception(
            "queue_id=%s internal error checking the message from %s: %s",
            transaction.queue_id or "-",
            transaction.connection.client_ip or "-",
            e,
        )
        return failure_verdict(type(e).__name__, transaction.message.headers, config, transaction.queue_id)


def failure_verdict(reason: str, headers: MessageHeaders, config: Config, queue_id: str = "") -> Verdict:
    """The verdict when checking a message failed: the configured failure action (actions.py).

    Forged A-R are listed all the same: they are hostile whatever else failed, and with
    ``internal_error = "accept"`` they must still go.
    """
    decision = internal_error_decision(reason, config.policy)
    try:
        forged = _removed_authentication_results(headers, config)
    except Exception:
        log.exception("queue_id=%s cannot inspect Authentication-Results", queue_id or "-")
        forged = ()
    return Verdict(
        spf=None,
        helo=None,
        dkim=(),
        dmarc=None,
        action=decision.action,
        reply=decision.reply,
        reason=decision.reason,
        authentication_results=render_authentication_results(config.authserv_id, None, None, (), None),
        forged_authentication_results=forged,
    )


def _removed_authentication_results(headers: MessageHeaders, config: Config) -> tuple[int, ...]:
    """The incoming A-R to delete: ours and ``remove_authserv_ids``' (forged, RFC 8601 §5)."""
    return find_forged_authentication_results(
        headers, config.authserv_id, config.milter.remove_authserv_ids
    )


def _evaluate_outbound(
    transaction: Transaction, config: Config, why: str, keys: KeyCache | None, now: float | None
) -> Verdict:
    # Forged A-R are found first and deleted by the adapter before it adds the signatures; they are
    # never in h= (config.py refuses it), so the signatures cover the header set as delivered.
    forged = _removed_authentication_results(transaction.message.headers, config)
    outcome = sign_transaction(transaction, config, keys, now)
    seal = _seal_outbound(transaction, config, keys, now) if config.arc.seals(outbound=True) else None
    return Verdict(
        spf=None,
        helo=None,
        dkim=(),
        dmarc=None,
        action=Action.ACCEPT,
        reply=None,
        reason=f"outbound: {why}; {outcome.reason}" + (f"; ARC {seal.reason}" if seal else ""),
        authentication_results="",
        forged_authentication_results=forged,
        outbound=True,
        signatures=outcome.signatures,
        arc_seal=seal.fields if seal else (),
    )


def _seal_outbound(
    transaction: Transaction, config: Config, keys: KeyCache | None, now: float | None
) -> SealOutcome:
    """Mail leaving (a list's re-sent copy) is sealed with the A-R we wrote when it came in, and
    the chain status it records: the chain as it arrived, before the list changed the message.

    Only mail from an internal host (the list software): an authenticated user could write an A-R
    with our authserv-id claiming any pass, and our seal would vouch for it."""
    entry = transaction.connection.internal_host
    if entry is None or not entry.included:
        return SealOutcome((), "not sealed: outbound mail not from an internal host")
    results = own_results(transaction.message.headers, config.authserv_id)
    if not results:
        return SealOutcome((), f"not sealed: no Authentication-Results of {config.authserv_id} to record")
    status = recorded_status(results)
    if status is None:
        return SealOutcome((), "not sealed: our Authentication-Results record no single arc= result")
    return _seal(transaction, status, results, config, keys, now)


def _seal(
    transaction: Transaction,
    status: AuthResult,
    results: str,
    config: Config,
    keys: KeyCache | None,
    now: float | None,
) -> SealOutcome:
    """Our ARC Set (arc_seal.py); a key file gone unusable raises KeyFileError (our fault)."""
    settings = config.arc
    key = (keys or KeyCache()).get(settings.key_file, "rsa-sha256", config.signing.key_permissions)
    sealer = Sealer(settings.signing_domain, settings.selector, key)
    sealed_at = time.time() if now is None else now
    outcome = seal_message(transaction.message, status, results, sealer, sealed_at, transaction.body)
    if not outcome.fields:
        log.info("queue_id=%s ARC %s", transaction.queue_id or "-", outcome.reason)
    return outcome


def _evaluate(
    transaction: Transaction, resolver: Resolver, config: Config, keys: KeyCache | None, now: float | None
) -> Verdict:
    connection = transaction.connection
    authors = parse_from(transaction.message.headers)
    unusable_from = _unusable_from(authors) if config.dmarc.enabled else None
    if unusable_from is not None:
        # The cheap structural caps come before any DNS query: a From the policy rejects whatever
        # the DNS says (no Author Domain, several From fields, more than MAX_AUTHOR_DOMAINS domains)
        # is rejected without one. Header fields and signatures are capped as they are read.
        decision = decide_action(connection.client_ip, None, unusable_from, config.policy)
        if decision.action is Action.REJECT:
            return _inbound_verdict(transaction, config, None, None, (), unusable_from, decision, None)
    dns_config = config.dns
    budget = DnsBudget(dns_config.message_time_budget, dns_config.message_query_budget, transaction.queue_id)
    resolver = resolver.for_message(budget)
    timer = CheckTimer(budget)
    spf: SpfResult | None = None
    helo: SpfResult | None = None
    if config.spf.enabled:
        with timer("spf", "SPF (MAIL FROM)"):
            spf = check_mail_from(
                connection.client_ip, connection.helo, transaction.mail_from, resolver, config.spf
            )
        if config.spf.check_helo:
            with timer("helo", "SPF (HELO)"):
                helo = check_helo(connection.client_ip, connection.helo, resolver, config.spf)
    dkim: tuple[DkimResult, ...] = ()
    if config.dkim.enabled:
        with timer("dkim", "DKIM"):
            dkim = verify_dkim(transaction.message.raw, resolver, config.dkim, body=transaction.body)
    arc: ArcResult | None = None
    if config.arc.verify:
        with timer("arc", "ARC"):
            arc = verify_arc(transaction.message, resolver, config.dkim, transaction.body)
    dmarc: DmarcVerdict | None = None
    if config.dmarc.enabled:
        with timer("dmarc", "DMARC"):
            dmarc = unusable_from or evaluate_dmarc(authors.domains, spf, dkim, resolver, config.dmarc)
    decision = decide_action(connection.client_ip, spf, dmarc, config.policy)
    if arc is not None and dmarc is not None and decision.action in (Action.REJECT, Action.QUARANTINE):
        arc, decision = _trusted_forwarder_override(arc, dmarc, spf, decision, connection, resolver, config)
    verdict = _inbound_verdict(transaction, config, spf, helo, dkim, dmarc, decision, arc, keys, now)
    return replace(verdict, check_seconds=tuple(timer.seconds))


def _trusted_forwarder_override(
    arc: ArcResult,
    dmarc: DmarcVerdict,
    spf: SpfResult | None,
    decision: Decision,
    connection: Connection,
    resolver: Resolver,
    config: Config,
) -> tuple[ArcResult, Decision]:
    """A trusted sealer vouches for the message (arc_check.trusted_forwarder): the decision as if
    DMARC had asked for nothing. Only DMARC's part is lifted: a reject for another reason stands."""
    sealer = trusted_forwarder(arc, dmarc, config.arc, resolver, config.dmarc)
    if not sealer:
        return arc, decision
    lifted = replace(dmarc, disposition=Disposition.NONE)
    relaxed = decide_action(connection.client_ip, spf, lifted, config.policy)
    if relaxed.action is decision.action:
        return arc, decision
    reason = relaxed.reason or f"dmarc=fail not applied: arc=pass sealed by trusted forwarder {sealer}"
    return with_override(arc, sealer), Decision(relaxed.action, relaxed.reply, reason)


class CheckTimer:
    """Times each check of one message and names it to the message's DNS budget.

    ``with timer("spf", "SPF (MAIL FROM)"):`` around a check records (check, wall seconds) in
    :attr:`seconds`; the label is what the budget's log line names when it runs out.
    """

    def __init__(self, budget: DnsBudget) -> None:
        self._budget = budget
        self.seconds: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, check: str, label: str) -> Iterator[None]:
        self._budget.start(label)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds.append((check, time.perf_counter() - started))


def _unusable_from(authors: FromAuthors) -> DmarcVerdict | None:
    """The permerror verdict for a From that gives no Author Domain DMARC can evaluate, else None."""
    if authors.error:
        return from_header_error(authors.error)
    return too_many_author_domains(authors.domains)


def _inbound_verdict(
    transaction: Transaction,
    config: Config,
    spf: SpfResult | None,
    helo: SpfResult | None,
    dkim: tuple[DkimResult, ...],
    dmarc: DmarcVerdict | None,
    decision: Decision,
    arc: ArcResult | None,
    keys: KeyCache | None = None,
    now: float | None = None,
) -> Verdict:
    headers = transaction.message.headers
    client_ip = transaction.connection.client_ip
    applied = unenforced_disposition(dmarc, decision.action)
    results = render_authentication_results(
        config.authserv_id, spf, helo, dkim, dmarc, applied, arc, client_ip
    )
    seal = None
    delivered = decision.action in (Action.ACCEPT, Action.QUARANTINE)
    if arc is not None and delivered and config.arc.seals(outbound=False):
        seal = _seal(transaction, arc.result, results, config, keys, now)
    return Verdict(
        spf=spf,
        helo=helo,
        dkim=dkim,
        dmarc=dmarc,
        action=decision.action,
        reply=decision.reply,
        reason=decision.reason,
        authentication_results=results,
        forged_authentication_results=_removed_authentication_results(headers, config),
        arc=arc,
        arc_seal=seal.fields if seal else (),
    )

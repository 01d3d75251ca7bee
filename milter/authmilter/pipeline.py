"""The order of the checks and the one place a verdict is made.

``evaluate()`` runs SPF (MAIL FROM, then HELO), DKIM verification, DMARC over both, the local
policy (actions.py), and renders our Authentication-Results. It does no I/O of its own: DNS goes
through the resolver passed in. The milter adapter and ``authmilter check`` both build a
:class:`Transaction` and call it, so every decision can be tested without a socket.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from authmilter.actions import decide_action, internal_error_decision
from authmilter.authresults import find_forged_authentication_results, render_authentication_results
from authmilter.config import Config
from authmilter.dkim_verify import verify_dkim
from authmilter.dmarc import evaluate_dmarc, from_header_error
from authmilter.message import ParsedMessage, parse_from
from authmilter.model import DkimResult, DmarcVerdict, SpfResult, Verdict
from authmilter.resolver import Resolver
from authmilter.spf_check import check_helo, check_mail_from

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Connection:
    """What the MTA told us about the SMTP client.

    Attributes:
        client_ip: the client's address as text ("" when unknown, e.g. a local submission).
        helo: the HELO/EHLO name.
        client_name: the verified PTR name the MTA found ("" or "unknown" when none).
        macros: milter macros of interest (``{daemon_name}``, ``{auth_type}``, ``j`` ...).
    """

    client_ip: str
    helo: str
    client_name: str = ""
    macros: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Transaction:
    """One message: the connection, the envelope and the message itself."""

    connection: Connection
    mail_from: str
    recipients: tuple[str, ...]
    message: ParsedMessage
    queue_id: str = ""


def evaluate(transaction: Transaction, resolver: Resolver, config: Config) -> Verdict:
    """Check one message and decide what to do with it.

    Never raises: an internal failure becomes a verdict with the configured failure action
    (tempfail by default), logged with the queue id and traceback.
    """
    try:
        return _evaluate(transaction, resolver, config)
    except Exception as e:
        log.exception(
            "queue_id=%s internal error checking the message from %s: %s",
            transaction.queue_id or "-",
            transaction.connection.client_ip or "-",
            e,
        )
        decision = internal_error_decision(type(e).__name__, config.policy)
        try:
            # Forged A-R are hostile whatever else failed; with internal_error = "accept" they must go.
            forged = find_forged_authentication_results(transaction.message.headers, config.authserv_id)
        except Exception:
            log.exception("queue_id=%s cannot inspect Authentication-Results", transaction.queue_id or "-")
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


def _evaluate(transaction: Transaction, resolver: Resolver, config: Config) -> Verdict:
    connection = transaction.connection
    spf: SpfResult | None = None
    helo: SpfResult | None = None
    if config.spf.enabled:
        spf = check_mail_from(
            connection.client_ip, connection.helo, transaction.mail_from, resolver, config.spf
        )
        if config.spf.check_helo:
            helo = check_helo(connection.client_ip, connection.helo, resolver, config.spf)
    dkim: tuple[DkimResult, ...] = ()
    if config.dkim.enabled:
        dkim = verify_dkim(transaction.message.raw, resolver, config.dkim)
    dmarc = (
        _evaluate_dmarc(transaction.message, spf, dkim, resolver, config) if config.dmarc.enabled else None
    )
    decision = decide_action(connection.client_ip, spf, dmarc, config.policy)
    headers = transaction.message.headers
    return Verdict(
        spf=spf,
        helo=helo,
        dkim=dkim,
        dmarc=dmarc,
        action=decision.action,
        reply=decision.reply,
        reason=decision.reason,
        authentication_results=render_authentication_results(config.authserv_id, spf, helo, dkim, dmarc),
        forged_authentication_results=find_forged_authentication_results(headers, config.authserv_id),
    )


def _evaluate_dmarc(
    message: ParsedMessage,
    spf: SpfResult | None,
    dkim: tuple[DkimResult, ...],
    resolver: Resolver,
    config: Config,
) -> DmarcVerdict:
    authors = parse_from(message.headers)
    if authors.error:
        return from_header_error(authors.error)
    return evaluate_dmarc(authors.domains, spf, dkim, resolver, config.dmarc)

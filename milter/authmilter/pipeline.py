"""The order of the checks and the one place a verdict is made.

``evaluate()`` first decides the direction (:func:`outbound_reason`). Inbound mail gets the checks
of :data:`CHECKS` in their declared order (SPF for MAIL FROM, then HELO, DKIM verification, ARC
chain validation, DMARC over SPF and DKIM: checks.py), each measured and each contained (an
exception in one is its temperror), then the local policy (actions.py), the trusted-forwarder step
(a trusted ARC sealer may lift a DMARC failure), our Authentication-Results from every check's
results, and our ARC Set when we seal inbound mail. Outbound mail (an internal host, a
SASL-authenticated client, a signing ``{daemon_name}``) is not verified and gets no
Authentication-Results; it is signed when the SigningTable has an entry for it
(:func:`sign_transaction`, which ``authmilter sign`` calls too), and sealed when configured.
Forged Authentication-Results are listed for deletion in both directions (RFC 8601 §5).

Nothing here does I/O of its own: DNS goes through the resolver passed in, private keys through
the key cache passed in. The milter adapter and the CLI both build a :class:`Transaction` and call
this module, so every decision can be tested without a socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, NamedTuple

from authmilter.actions import Decision, decide_action, internal_error_decision
from authmilter.arc_check import ArcCheck, ArcCheckSettings, arc_body_hashes, trusted_forwarder, with_override
from authmilter.arc_seal import (
    SEAL_BODY_HASH,
    Sealer,
    SealOutcome,
    own_results,
    recorded_status,
    seal_message,
)
from authmilter.authresults import find_forged_authentication_results, render_authentication_results
from authmilter.checks import Check, Decided, Question, Registration, Registry
from authmilter.config import Config
from authmilter.dkim_body import BodyHashSpec
from authmilter.dkim_sign import HEADER_NAME as SIGNATURE_HEADER
from authmilter.dkim_sign import (
    KeyProvider,
    SigningError,
    plan_signatures,
    sign_message,
    signing_address,
    signing_body_hash,
)
from authmilter.dkim_verify import DkimCheck, body_hashes_needed
from authmilter.dmarc import DmarcCheck
from authmilter.keys import KeyCache, PrivateKey
from authmilter.message import HeaderField, MessageHeaders
from authmilter.model import (
    Action,
    ArcResult,
    AuthResult,
    CheckTiming,
    Disposition,
    DkimResult,
    DmarcVerdict,
    SpfResult,
    Verdict,
)
from authmilter.resolver import DnsBudget, Resolver
from authmilter.spf_check import HeloCheck, MailFromCheck
from authmilter.tables import HostEntry, KeyEntry
from authmilter.transaction import Connection as Connection
from authmilter.transaction import Transaction as Transaction

log = logging.getLogger(__name__)

# A local submission (Postfix non_smtpd_milters, no client address) is judged as loopback for the
# internal-hosts check, as OpenDKIM does.
LOCAL_SUBMISSION_ADDRESS = "127.0.0.1"
# The macros that say the client authenticated with SASL (Postfix sends them at MAIL FROM).
AUTH_MACROS = ("{auth_authen}", "{auth_type}")
DAEMON_NAME_MACRO = "{daemon_name}"

# The checks of inbound mail, in the order they run and their resinfos appear (RFC 8601 §2.2 sets
# no order; this is OpenDKIM's and authentication_milter's). Adding a check: one module with a
# checks.Check subclass, one line here.
CHECKS = Registry(
    (
        Registration(MailFromCheck(), lambda config: config.spf),
        Registration(HeloCheck(), lambda config: config.spf),
        Registration(DkimCheck(), lambda config: config.dkim),
        Registration(ArcCheck(), lambda config: ArcCheckSettings(config.arc, config.dkim)),
        Registration(DmarcCheck(), lambda config: config.dmarc),
    )
)


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


def body_hashes(
    connection: Connection, headers: MessageHeaders, config: Config, why_outbound: str | None = None
) -> frozenset[BodyHashSpec]:
    """The DKIM body hashes this message will need, known at the end of its header block.

    Args:
        connection: the client (outbound mail is signed, inbound mail verified).
        headers: the header fields, with the DKIM-Signature fields to verify.
        config: ``[dkim]`` and ``[signing]``.
        why_outbound: :func:`outbound_reason` for ``connection``, when the caller knows it already.

    Returns:
        For outbound mail, the hash our signatures carry; for inbound mail, one per distinct body
        canonicalization, l= and hash of the signatures that will be checked (RFC 6376 §3.7), and
        of the ARC-Message-Signatures (RFC 8617 §4.1.2); the hash of our ARC seal when we seal.
    """
    outbound = bool(outbound_reason(connection, config) if why_outbound is None else why_outbound)
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
    registry: Registry = CHECKS,
    prefetched: int | None = None,
) -> Verdict:
    """Check (inbound) or sign (outbound) one message and decide what to do with it.

    Args:
        transaction: the message, its envelope and connection.
        resolver: the only way to DNS.
        config: the configuration.
        keys: the worker's key cache, for outbound mail; None loads keys for this call only.
        now: the signing time for outbound mail; None = the clock.
        registry: the checks of inbound mail (a test may add its own).
        prefetched: queries already prefetched for this message as its callbacks told the names
            (:func:`envelope_questions`, :func:`field_questions`; they count against its DNS
            budget); None: a message read whole, whose names are all prefetched now, up to
            ``[dns] prefetch_queries``.

    Returns:
        The verdict. Never raises: an internal failure (a key file gone unreadable included)
        becomes a verdict with the configured failure action (tempfail by default), logged with
        the queue id and traceback.
    """
    try:
        why_outbound = transaction.outbound
        if why_outbound is None:
            why_outbound = outbound_reason(transaction.connection, config)
        if why_outbound:
            return _evaluate_outbound(transaction, config, why_outbound, keys, now)
        return _evaluate(transaction, resolver, config, registry, keys, now, prefetched)
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
        authentication_results=render_authentication_results(config.authserv_id, ()),
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
    transaction: Transaction,
    resolver: Resolver,
    config: Config,
    registry: Registry,
    keys: KeyCache | None,
    now: float | None,
    prefetched: int | None,
) -> Verdict:
    early = _prechecks(transaction, config, registry)
    if early:
        # A result known without DNS that the policy rejects on (DMARC's structural caps on the
        # From field) is final: the message is rejected without a single query.
        decision = _decide(transaction, early, config)
        if decision.action is Action.REJECT:
            return _inbound_verdict(transaction, config, registry, early, (), decision)
    dns_config = config.dns
    budget = DnsBudget(
        dns_config.message_time_budget,
        dns_config.message_query_budget,
        transaction.queue_id,
        sent=prefetched or 0,
    )
    message_resolver = resolver.for_message(budget)
    if prefetched is None:
        # A message read whole tells all its names now: they are asked together first, so the
        # checks, which still ask in their own order (RFC 7208 §4.6.4's limits stay exact), mostly
        # find them answered or on their way.
        with message_resolver.prefetch(dns_config.prefetch_queries) as lookups:
            lookups.start(prefetch_questions(registry, transaction, config))
            outcomes, timings = run_checks(registry, transaction, message_resolver, config, budget)
    else:  # the milter: its callbacks prefetched the names as they told them
        outcomes, timings = run_checks(registry, transaction, message_resolver, config, budget)
    decision = _decide(transaction, outcomes, config)
    if decision.action in (Action.REJECT, Action.QUARANTINE):
        decision = _trusted_forwarder_override(transaction, outcomes, decision, message_resolver, config)
    verdict = _inbound_verdict(transaction, config, registry, outcomes, timings, decision)
    return _sealed_inbound(verdict, transaction, config, keys, now)


def _trusted_forwarder_override(
    transaction: Transaction,
    outcomes: dict[str, object],
    decision: Decision,
    resolver: Resolver,
    config: Config,
) -> Decision:
    """A trusted sealer vouches for the message (arc_check.trusted_forwarder): the decision as if
    DMARC had asked for nothing, and ARC's outcome names the sealer (outcomes is updated). Only
    DMARC's part is lifted: a reject for another reason stands."""
    arc, dmarc = _arc_of(outcomes), _dmarc_of(outcomes)
    if arc is None or dmarc is None:
        return decision
    sealer = trusted_forwarder(arc, dmarc, config.arc, resolver, config.dmarc)
    if not sealer:
        return decision
    lifted = replace(dmarc, disposition=Disposition.NONE)
    client_ip = transaction.connection.client_ip
    relaxed = decide_action(client_ip, _spf_of(outcomes, "spf"), lifted, config.policy)
    if relaxed.action is decision.action:
        return decision
    outcomes["arc"] = with_override(arc, sealer)
    reason = relaxed.reason or f"dmarc=fail not applied: arc=pass sealed by trusted forwarder {sealer}"
    return Decision(relaxed.action, relaxed.reply, reason)


def _sealed_inbound(
    verdict: Verdict, transaction: Transaction, config: Config, keys: KeyCache | None, now: float | None
) -> Verdict:
    """The verdict with our ARC Set when we seal inbound mail that is delivered (RFC 8617 §5.1):
    the chain status we found and the A-R we wrote."""
    delivered = verdict.action in (Action.ACCEPT, Action.QUARANTINE)
    if verdict.arc is None or not delivered or not config.arc.seals(outbound=False):
        return verdict
    seal = _seal(transaction, verdict.arc.result, verdict.authentication_results, config, keys, now)
    return replace(verdict, arc_seal=seal.fields)


def _prechecks(transaction: Transaction, config: Config, registry: Registry) -> dict[str, object]:
    early: dict[str, object] = {}
    for check, settings in enabled_checks(registry, config).prechecking:
        try:
            outcome = check.precheck(transaction, settings)
        except Exception as e:
            # Only a shortcut is lost: the check still runs in full, and stands or fails alone.
            log.exception(
                "queue_id=%s internal error in the %s check's precheck, checked in full instead: %s: %s",
                transaction.queue_id or "-",
                check.label,
                type(e).__name__,
                e,
            )
            continue
        if outcome is not None:
            early[check.name] = outcome
    return early


class EnabledChecks(NamedTuple):
    """The checks of a registry that are on under one configuration.

    Attributes:
        config: the configuration.
        registry: the registry.
        checks: each enabled check with its settings, in the registry's order.
        prefetch_fields: the header field names (lower case) that tell one of them a DNS name.
        prechecking: the checks of ``checks`` with a :meth:`Check.precheck` of their own.
        envelope_askers: those with :meth:`Check.envelope_questions` of their own.
        field_askers: by header field name (lower case), those that name it in ``prefetch_fields``.
    """

    config: Config
    registry: Registry
    checks: tuple[tuple[Check[Any, Any], Any], ...]
    prefetch_fields: frozenset[str]
    prechecking: tuple[tuple[Check[Any, Any], Any], ...]
    envelope_askers: tuple[tuple[Check[Any, Any], Any], ...]
    field_askers: Mapping[str, tuple[tuple[Check[Any, Any], Any], ...]]


# The last answer of enabled_checks(): a worker asks with the same configuration and registry for
# every callback and message, and picking each check's settings (a new ArcCheckSettings each time)
# and asking enabled() cost more than the checks' own work at a header callback. Both are
# immutable, so one compared by identity cannot go stale; another configuration (a test, a
# reload's new workers) is looked at anew.
_last_enabled: EnabledChecks | None = None


def enabled_checks(registry: Registry, config: Config) -> EnabledChecks:
    """The checks of ``registry`` that are on under ``config``, with their settings, in order."""
    global _last_enabled
    known = _last_enabled
    if known is None or known.config is not config or known.registry is not registry:
        checks = tuple(
            (registration.check, settings)
            for registration in registry
            if registration.check.enabled(settings := registration.settings(config))
        )
        fields = frozenset().union(*(check.prefetch_fields for check, _ in checks))
        known = _last_enabled = EnabledChecks(
            config,
            registry,
            checks,
            fields,
            prechecking=tuple(entry for entry in checks if _overrides(entry[0], "precheck")),
            envelope_askers=tuple(entry for entry in checks if _overrides(entry[0], "envelope_questions")),
            field_askers=MappingProxyType(
                {
                    name: tuple(entry for entry in checks if name in entry[0].prefetch_fields)
                    for name in fields
                }
            ),
        )
    return known


def _overrides(check: Check[Any, Any], method: str) -> bool:
    # Found once, as aiosmtpd finds its hooks: a check without its own method gets the default,
    # which declares nothing, so it is not asked at every message (STYLE.md §3).
    return getattr(type(check), method) is not getattr(Check, method)


def prefetch_questions(registry: Registry, transaction: Transaction, config: Config) -> list[Question]:
    """The DNS questions the enabled checks declare for a whole message (:meth:`Check.prefetch`)."""
    return _declared(
        enabled_checks(registry, config).checks,
        transaction.queue_id,
        lambda check, settings: check.prefetch(transaction, settings),
    )


def envelope_questions(
    connection: Connection, mail_from: str, config: Config, registry: Registry = CHECKS
) -> list[Question]:
    """The DNS questions the enabled checks declare at MAIL FROM (see :meth:`Check.envelope_questions`)."""
    return _declared(
        enabled_checks(registry, config).envelope_askers,
        "",
        lambda check, settings: check.envelope_questions(connection, mail_from, settings),
    )


def field_questions(field: HeaderField, config: Config, registry: Registry = CHECKS) -> list[Question]:
    """The DNS questions the enabled checks declare for one header field (see
    :meth:`Check.field_questions`)."""
    askers = enabled_checks(registry, config).field_askers.get(field.name.lower(), ())
    return _declared(askers, "", lambda check, settings: check.field_questions(field, settings))


def prefetch_fields(config: Config, registry: Registry = CHECKS) -> frozenset[str]:
    """The header field names (lower case) that tell an enabled check a DNS name."""
    return enabled_checks(registry, config).prefetch_fields


def _declared(
    checks: Iterable[tuple[Check[Any, Any], Any]],
    queue_id: str,
    declare: Callable[[Check[Any, Any], Any], list[Question]],
) -> list[Question]:
    """What ``declare`` gives for each of the enabled ``checks`` with its settings, in order.

    Only a hint: a check whose declaration fails (a hostile header it cannot read) declares
    nothing here and meets the problem again, contained, when it runs.
    """
    questions: list[Question] = []
    for check, settings in checks:
        try:
            questions.extend(declare(check, settings))
        except Exception as e:
            log.debug("queue_id=%s %s declared no DNS names: %s", queue_id or "-", check.name, e)
    return questions


def run_checks(
    registry: Registry, transaction: Transaction, resolver: Resolver, config: Config, budget: DnsBudget
) -> tuple[dict[str, object], tuple[CheckTiming, ...]]:
    """Run every enabled check in the registry's order, each measured and each contained.

    An exception in one check becomes that check's temperror (:meth:`Check.failed`), logged with
    the queue id and its traceback once; the checks after it run on as usual and see that
    temperror (authentication_milter's ``top_eom_callback``).

    Args:
        registry: the checks, in order.
        transaction: the message.
        resolver: the message's view of the resolver.
        config: where each check's settings are.
        budget: the message's DNS budget, told which check is asking.

    Returns:
        The outcomes by check name (checks that are off have none) and one timing per check run.
    """
    outcomes: dict[str, object] = {}
    timings: list[CheckTiming] = []
    for check, settings in enabled_checks(registry, config).checks:
        budget.start(check.label)
        started = time.perf_counter()
        try:
            outcomes[check.name] = check.evaluate(transaction, outcomes, resolver, settings)
            failed = False
        except Exception as e:
            log.exception(
                "queue_id=%s internal error in the %s check, taken as its temperror: %s: %s",
                transaction.queue_id or "-",
                check.label,
                type(e).__name__,
                e,
            )
            outcomes[check.name] = check.failed(transaction, settings, f"internal error: {type(e).__name__}")
            failed = True
        timings.append(CheckTiming(check.name, (time.perf_counter() - started) * 1000, failed))
    return outcomes, tuple(timings)


def _decide(transaction: Transaction, outcomes: Mapping[str, object], config: Config) -> Decision:
    return decide_action(
        transaction.connection.client_ip, _spf_of(outcomes, "spf"), _dmarc_of(outcomes), config.policy
    )


# The built-in checks' typed outcomes are the Verdict's stable fields (docs/verdict-json.md,
# history records); any other check reaches the verdict through its method results and timing.


def _spf_of(outcomes: Mapping[str, object], name: str) -> SpfResult | None:
    outcome = outcomes.get(name)
    return outcome if isinstance(outcome, SpfResult) else None


def _dmarc_of(outcomes: Mapping[str, object]) -> DmarcVerdict | None:
    outcome = outcomes.get("dmarc")
    return outcome if isinstance(outcome, DmarcVerdict) else None


def _arc_of(outcomes: Mapping[str, object]) -> ArcResult | None:
    outcome = outcomes.get("arc")
    return outcome if isinstance(outcome, ArcResult) else None


def _dkim_of(outcomes: Mapping[str, object]) -> tuple[DkimResult, ...]:
    outcome = outcomes.get("dkim", ())
    return tuple(r for r in outcome if isinstance(r, DkimResult)) if isinstance(outcome, tuple) else ()


def _inbound_verdict(
    transaction: Transaction,
    config: Config,
    registry: Registry,
    outcomes: Mapping[str, object],
    timings: tuple[CheckTiming, ...],
    decision: Decision,
) -> Verdict:
    decided = Decided(decision.action, transaction.connection.client_ip, outcomes)
    results = tuple(
        result
        for registration in registry.header_order()
        if registration.check.name in outcomes
        for result in registration.check.method_results(outcomes[registration.check.name], decided)
    )
    return Verdict(
        spf=_spf_of(outcomes, "spf"),
        helo=_spf_of(outcomes, "helo"),
        dkim=_dkim_of(outcomes),
        dmarc=_dmarc_of(outcomes),
        action=decision.action,
        reply=decision.reply,
        reason=decision.reason,
        authentication_results=render_authentication_results(config.authserv_id, results),
        forged_authentication_results=_removed_authentication_results(transaction.message.headers, config),
        results=results,
        timings=timings,
        arc=_arc_of(outcomes),
    )

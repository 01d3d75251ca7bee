"""From results and local policy to one action and its SMTP reply.

Every reply authmilter can give is in :data:`REPLIES`, one table, tested as a table
(codes match their class, enhanced codes exist in the IANA registry).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from authmilter.domains import is_within
from authmilter.model import Action, AuthResult, Disposition, DmarcVerdict, Reply, SpfResult
from authmilter.settings import one_of, validate

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ReplyName(StrEnum):
    DMARC_REJECT = "dmarc_reject"
    FROM_INVALID = "from_invalid"
    FROM_MULTIPLE_DOMAINS = "from_multiple_domains"
    SPF_REJECT = "spf_reject"
    DNS_TEMPFAIL = "dns_tempfail"
    INTERNAL_ERROR = "internal_error"
    INTERNAL_REJECT = "internal_reject"


# (code, enhanced code, text template). Enhanced codes: RFC 7372 §3.2-3.3 for authentication
# failures (X.7.23 SPF validation failed, X.7.26 multiple authentication checks failed: DMARC
# fails only when neither SPF nor DKIM passed aligned), RFC 3463 X.4.3 for a directory (DNS)
# failure and X.3.0 for a local problem, X.7.1 for a message refused by policy.
REPLIES: dict[ReplyName, tuple[str, str, str]] = {
    ReplyName.DMARC_REJECT: (
        "550",
        "5.7.26",
        "Rejected by the DMARC policy of {domain}: {reason}",
    ),
    ReplyName.FROM_INVALID: (
        "550",
        "5.7.1",
        "Rejected: {reason}; a message needs exactly one From header with a domain (RFC 5322 3.6.2)",
    ),
    ReplyName.FROM_MULTIPLE_DOMAINS: (
        "550",
        "5.7.1",
        "Rejected by local policy: the From field names authors in different domains; "
        "send one message per author domain ({domains})",
    ),
    ReplyName.SPF_REJECT: (
        "550",
        "5.7.23",
        "Rejected by the SPF policy of {domain}: {reason}",
    ),
    ReplyName.DNS_TEMPFAIL: (
        "451",
        "4.4.3",
        "Cannot check the DMARC policy of {domain} now (DNS: {reason}); please try again later",
    ),
    ReplyName.INTERNAL_ERROR: (
        "451",
        "4.3.0",
        "Temporary local problem checking this message ({reason}); please try again later",
    ),
    ReplyName.INTERNAL_REJECT: (
        "550",
        "5.3.0",
        "Rejected: local problem checking this message ({reason})",
    ),
}

# Reply text is echoed to the client and into logs: keep it one printable line of bounded length.
MAX_REPLY_TEXT = 400


def make_reply(name: ReplyName, **fields: str) -> Reply:
    code, enhanced, template = REPLIES[name]
    text = template.format(**{k: _printable(v) for k, v in fields.items()})
    return Reply(code, enhanced, text[:MAX_REPLY_TEXT])


def _printable(value: str) -> str:
    """Only printable ASCII reaches an SMTP reply (RFC 5321 §4.2: text is printable US-ASCII)."""
    return "".join(c if " " <= c <= "~" and c != "%" else "?" for c in value)


class FailureAction(StrEnum):
    """What to do when a check cannot decide (DNS failure, invalid From, our own error)."""

    ACCEPT = "accept"
    TEMPFAIL = "tempfail"
    REJECT = "reject"
    QUARANTINE = "quarantine"


class MultipleFromDomains(StrEnum):
    """What to do with one From field whose mailboxes name different domains."""

    EVALUATE = "evaluate"  # RFC 9989 §5.3.1: every Author Domain is evaluated, the strictest wins
    REJECT = "reject"  # OpenDMARC's RejectMultiValueFrom


# The choices each failure setting accepts (config.py validates against these): a reply must fit
# its action, so e.g. a DNS failure may defer but not reject.
ALLOWED_FAILURE_ACTIONS: dict[str, frozenset[FailureAction]] = {
    "dmarc_temperror": frozenset({FailureAction.ACCEPT, FailureAction.TEMPFAIL, FailureAction.QUARANTINE}),
    "from_error": frozenset({FailureAction.ACCEPT, FailureAction.REJECT, FailureAction.QUARANTINE}),
    "internal_error": frozenset({FailureAction.ACCEPT, FailureAction.TEMPFAIL, FailureAction.REJECT}),
    "spf_fail": frozenset({FailureAction.ACCEPT, FailureAction.REJECT, FailureAction.QUARANTINE}),
}
# The same choices as words, as the settings field declares them (settings.py).
_ALLOWED_WORDS = {name: frozenset(a.value for a in ok) for name, ok in ALLOWED_FAILURE_ACTIONS.items()}


@dataclass(frozen=True)
class PolicySettings:
    """Local policy on top of the published ones (config section ``[policy]``).

    Attributes:
        enforce: apply DMARC reject/quarantine; false only annotates (a trial mode).
        dmarc_temperror: action when DMARC cannot be evaluated because DNS failed.
        from_error: action for no From, several From headers, or an author without a domain.
        internal_error: action when authmilter itself fails outside its checks (a check that
            raises gives its own temperror: pipeline.run_checks).
        spf_fail: action for an SPF ``fail`` of the MAIL FROM identity on its own (policyd-spf's
            behaviour); "accept" leaves SPF to DMARC.
        never_reject_domains: From or policy domains never rejected or quarantined (local override).
        never_reject_networks: client networks never rejected or quarantined.
        from_multiple_domains: a From field with mailboxes in different domains is evaluated
            per domain ("evaluate") or rejected ("reject"); several mailboxes of one domain are
            always evaluated. Applies with ``enforce`` false too, as ``from_error`` does.
    """

    enforce: bool = True
    dmarc_temperror: FailureAction = one_of(FailureAction.TEMPFAIL, _ALLOWED_WORDS["dmarc_temperror"])
    from_error: FailureAction = one_of(FailureAction.REJECT, _ALLOWED_WORDS["from_error"])
    internal_error: FailureAction = one_of(FailureAction.TEMPFAIL, _ALLOWED_WORDS["internal_error"])
    spf_fail: FailureAction = one_of(FailureAction.ACCEPT, _ALLOWED_WORDS["spf_fail"])
    never_reject_domains: tuple[str, ...] = ()
    never_reject_networks: tuple[Network, ...] = ()
    from_multiple_domains: MultipleFromDomains = MultipleFromDomains.EVALUATE

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class Decision:
    action: Action
    reply: Reply | None
    reason: str


ACCEPT = Decision(Action.ACCEPT, None, "")

_FAILURE_TO_ACTION = {
    FailureAction.ACCEPT: Action.ACCEPT,
    FailureAction.TEMPFAIL: Action.TEMPFAIL,
    FailureAction.REJECT: Action.REJECT,
    FailureAction.QUARANTINE: Action.QUARANTINE,
}


def _failure(choice: FailureAction, replies: dict[Action, Reply], reason: str) -> Decision:
    action = _FAILURE_TO_ACTION[choice]
    return Decision(action, replies.get(action), reason)


def is_overridden(client_ip: str, domains: Sequence[str], settings: PolicySettings) -> bool:
    """The client network or one of the domains is on the local never-reject list."""
    for domain in domains:
        if any(is_within(domain, listed) for listed in settings.never_reject_domains):
            return True
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in network for network in settings.never_reject_networks)


def decide_action(
    client_ip: str,
    spf: SpfResult | None,
    dmarc: DmarcVerdict | None,
    settings: PolicySettings,
) -> Decision:
    """The action for a message from its results and the local policy.

    Args:
        client_ip: the SMTP client's address, for the network override list.
        spf: the MAIL FROM identity's SPF result.
        dmarc: the DMARC verdict.
        settings: local policy.

    Returns:
        The action, the reply to give for reject and tempfail, and the reason in words.
    """
    decision = _decide_unchecked(spf, dmarc, settings)
    if decision.action in (Action.REJECT, Action.QUARANTINE):
        domains = [d for d in ((*dmarc.from_domains, dmarc.policy_domain) if dmarc else ()) if d]
        if is_overridden(client_ip, domains, settings):
            return Decision(Action.ACCEPT, None, f"local override ({decision.reason})")
    return decision


def _nothing_to_enforce(dmarc: DmarcVerdict) -> bool:
    """A policy was found that asks nothing of a failing message (p=none, or quarantine under t=y).

    Then an aligned identifier that could not be checked (dmarc.py, RFC 9989 §5.3.2) cannot change
    what happens to the message, so it is not deferred for a DNS error: the result stays
    ``temperror`` in the header and the history, and the message is accepted.
    """
    if dmarc.policy is None or dmarc.record is None:
        return False  # the policy itself is unknown (discovery failed): deferring is the point
    return dmarc.policy.on_failure(dmarc.record.testing) is Disposition.NONE


def _decide_unchecked(
    spf: SpfResult | None, dmarc: DmarcVerdict | None, settings: PolicySettings
) -> Decision:
    if dmarc is not None:
        if len(dmarc.from_domains) > 1 and settings.from_multiple_domains is MultipleFromDomains.REJECT:
            domains = ", ".join(dmarc.from_domains)
            reply = make_reply(ReplyName.FROM_MULTIPLE_DOMAINS, domains=domains)
            return Decision(Action.REJECT, reply, f"From field with several author domains: {domains}")
        domain = dmarc.from_domain or "the sender"
        if dmarc.result is AuthResult.TEMPERROR and not _nothing_to_enforce(dmarc):
            return _failure(
                settings.dmarc_temperror,
                {Action.TEMPFAIL: make_reply(ReplyName.DNS_TEMPFAIL, domain=domain, reason=dmarc.reason)},
                f"dmarc=temperror: {dmarc.reason}",
            )
        if dmarc.result is AuthResult.PERMERROR and not dmarc.from_domain:
            return _failure(
                settings.from_error,
                {Action.REJECT: make_reply(ReplyName.FROM_INVALID, reason=dmarc.reason)},
                f"dmarc=permerror: {dmarc.reason}",
            )
        if dmarc.result is AuthResult.FAIL and settings.enforce:
            reason = f"dmarc=fail: {dmarc.reason}"
            if dmarc.disposition is Disposition.REJECT:
                reply = make_reply(ReplyName.DMARC_REJECT, domain=domain, reason=dmarc.reason)
                return Decision(Action.REJECT, reply, reason)
            if dmarc.disposition is Disposition.QUARANTINE:
                return Decision(Action.QUARANTINE, None, reason)
    if spf is not None and spf.result is AuthResult.FAIL and settings.spf_fail is not FailureAction.ACCEPT:
        reason = spf.explanation or f"{spf.identity or spf.domain} is not allowed to send from this host"
        return _failure(
            settings.spf_fail,
            {Action.REJECT: make_reply(ReplyName.SPF_REJECT, domain=spf.domain, reason=reason)},
            f"spf=fail: {reason}",
        )
    return ACCEPT


def internal_error_decision(reason: str, settings: PolicySettings) -> Decision:
    """The decision when authmilter itself failed: never accept silently unless configured so."""
    replies = {
        Action.TEMPFAIL: make_reply(ReplyName.INTERNAL_ERROR, reason=reason),
        Action.REJECT: make_reply(ReplyName.INTERNAL_REJECT, reason=reason),
    }
    return _failure(settings.internal_error, replies, f"internal error: {reason}")

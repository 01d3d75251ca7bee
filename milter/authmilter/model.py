"""Plain values shared by every check: result words, actions and the typed results.

Everything here is immutable and free of I/O. Checks return these; the pipeline composes them;
the milter adapter and the CLI only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

# Version of the JSON verdict (`authmilter check --json`, docs/verdict-json.md). Bump on any
# change that is not a pure addition of keys.
VERDICT_JSON_VERSION = 1


class AuthResult(StrEnum):
    """Result words of RFC 8601 §2.7 (shared by SPF §2.7.2, DKIM §2.7.1 and DMARC).

    The string value is the word written into Authentication-Results and the JSON verdict.
    """

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"
    POLICY = "policy"


class Action(StrEnum):
    """What happens to the message, decided once per message (actions.py)."""

    ACCEPT = "accept"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


class Disposition(StrEnum):
    """DMARC policy values (RFC 9989 `p=`/`sp=`/`np=`) and the disposition applied."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    def on_failure(self, testing: bool) -> Disposition:
        """What this policy asks for a failing message: one level lower in test mode (RFC 9989
        §4.7, ``t=y``: reject -> quarantine, quarantine -> none; none stays none)."""
        if not testing or self is Disposition.NONE:
            return self
        return Disposition.QUARANTINE if self is Disposition.REJECT else Disposition.NONE


class SpfScope(StrEnum):
    """Which identity an SPF result is about (RFC 7208 §2.3, §2.4; RFC 9990 `scope`)."""

    MFROM = "mfrom"
    HELO = "helo"


@dataclass(frozen=True)
class SpfResult:
    """One SPF evaluation (RFC 7208 §2.6).

    Attributes:
        result: the RFC 7208 result word.
        domain: the domain checked (MAIL FROM domain, or the HELO name).
        scope: which identity was checked.
        identity: the full identity as checked (``postmaster@helo`` for the null sender).
        explanation: the `exp=` text or pyspf's reason, for logs and reject replies.
    """

    result: AuthResult
    domain: str
    scope: SpfScope
    identity: str = ""
    explanation: str = ""


@dataclass(frozen=True)
class DkimResult:
    """One DKIM-Signature's verification (RFC 6376 §6, RFC 8601 §2.7.1).

    Attributes:
        result: pass, fail, neutral, policy, temperror, permerror (none is not per-signature).
        domain: the signature's `d=`, lower-cased ("" when the tag is unreadable).
        selector: `s=`.
        algorithm: `a=` as written (e.g. ``rsa-sha256``, ``ed25519-sha256``).
        reason: why it is not a pass, in a few words (empty on pass).
        header_b: the first characters of `b=` (RFC 6008 ``header.b``) to tell signatures apart.
        identity: the `i=` tag, if any.
        testing: the key record carries `t=y` (RFC 6376 §3.6.1).
    """

    result: AuthResult
    domain: str
    selector: str
    algorithm: str
    reason: str = ""
    header_b: str = ""
    identity: str = ""
    testing: bool = False


@dataclass(frozen=True)
class DmarcRecord:
    """A parsed DMARC policy record (RFC 9989 §4.7). Unknown tags are dropped."""

    policy: Disposition | None
    subdomain_policy: Disposition | None = None
    nonexistent_policy: Disposition | None = None
    adkim_strict: bool = False
    aspf_strict: bool = False
    testing: bool = False
    psd: str = "u"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    failure_options: str = "0"
    pct: int | None = None
    raw: str = ""


@dataclass(frozen=True)
class DmarcVerdict:
    """The DMARC evaluation of one message, with everything an aggregate report row needs.

    Attributes:
        result: pass, fail, none, temperror or permerror.
        from_domain: the RFC5322.From domain that decided the result ("" if none could be found).
        policy_domain: where the record was found ("" when none).
        org_domain: the organisational domain of ``from_domain``.
        policy: the policy that applies to ``from_domain`` (p, sp or np), or None without a record.
        disposition: what the policy asks for after test mode and alignment (none when it passes).
        spf_aligned / dkim_aligned: which identifiers aligned.
        record: the record that applied.
        reason: why, in words, for logs and the reject text.
        from_domains: every From domain evaluated (several for a multi-mailbox From).
    """

    result: AuthResult
    from_domain: str = ""
    policy_domain: str = ""
    org_domain: str = ""
    policy: Disposition | None = None
    disposition: Disposition = Disposition.NONE
    spf_aligned: bool = False
    dkim_aligned: bool = False
    record: DmarcRecord | None = None
    reason: str = ""
    from_domains: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ArcResult:
    """The validation of a message's Authenticated Received Chain (RFC 8617 §5.2; arc_check.py).

    Attributes:
        result: the Chain Validation Status: pass, fail or none (no ARC Set at all).
        instances: the highest instance number seen (0 without ARC header fields).
        oldest_pass: on pass, the instance of the oldest ARC-Message-Signature that still
            validates, 0 when all do (RFC 8617 §5.2 step 5, ``header.oldest-pass``); None otherwise.
        sealers: the ARC-Seal ``d=`` of each instance, oldest first (as read, even on fail).
        reason: why the chain failed, in a few words ("" on pass and none).
        latest_results: the ARC-Authentication-Results payload of the highest instance, without
            its ``i=`` tag, for the trusted-sealer check ("" unless the chain passed).
        override: the trusted sealer whose chain made us not apply a failing DMARC policy, or "".
    """

    result: AuthResult
    instances: int = 0
    oldest_pass: int | None = None
    sealers: tuple[str, ...] = ()
    reason: str = ""
    latest_results: str = ""
    override: str = ""


ARC_NONE = ArcResult(AuthResult.NONE)


# Why a DMARC disposition was not applied: in the A-R comment and the history record's
# local_policy reason alike (docs/history-schema.md).
NOT_ENFORCED_NOTE = "not enforced by local configuration"


@dataclass(frozen=True)
class Reply:
    """An SMTP reply for reject or tempfail: basic code (RFC 5321 §4.2), enhanced code (RFC 3463), text."""

    code: str
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True)
class MethodResult:
    """One resinfo of our Authentication-Results (RFC 8601 §2.2), as a check reports it.

    Values are as found (possibly hostile): the renderer (authresults.py) sanitises them.

    Attributes:
        method: the RFC 8601 method (``spf``, ``dkim``, ``dmarc``, ...).
        result: the result word.
        properties: ``(ptype, property, value)`` triples in header order, e.g.
            ``("smtp", "mailfrom", "bob@example.org")`` or ``("header", "d", "example.org")``
            (RFC 8601 §2.3); an empty value is left out of the header.
        comment: the comment after the result (RFC 8601 §2.2 ``reasonspec`` is not used).
    """

    method: str
    result: AuthResult
    properties: tuple[tuple[str, str, str], ...] = ()
    comment: str = ""


class CheckTiming(NamedTuple):
    """How long one check took on one message (each check run is measured by the pipeline).

    A named tuple, not a frozen dataclass: one is made per check per message, at a third of the cost.

    Attributes:
        check: the check's registry name (``spf``, ``helo``, ``dkim``, ``dmarc``, ...).
        ms: wall-clock milliseconds, DNS waits included.
        failed: the check raised: its results are the temperror it stands for.
    """

    check: str
    ms: float
    failed: bool = False


@dataclass(frozen=True)
class Verdict:
    """Everything decided about one message; the milter adapter and `authmilter check` only apply it.

    Attributes:
        spf: the MAIL FROM identity's SPF result (None when SPF is off).
        helo: the HELO identity's SPF result (None when not checked).
        dkim: one result per DKIM-Signature, in header order.
        dmarc: the DMARC verdict (None when DMARC is off).
        action: what to do with the message.
        reply: the SMTP reply for reject and tempfail.
        reason: why the action was chosen, for the log.
        authentication_results: our Authentication-Results header value.
        forged_authentication_results: indices of A-R fields to delete, highest first.
        outbound: the message is outbound mail (internal host, SASL-authenticated, or a signing
            daemon_name): it was not verified, and ``authentication_results`` is empty.
        signatures: DKIM-Signature values to add (without the name), the first on top.
        results: every check's per-method results in the registry's order: what
            ``authentication_results`` was rendered from.
        timings: one entry per check run, in the order they ran (for logs and metrics); not
            part of :meth:`as_json`.
        arc: the ARC chain validation (None when ``[arc] verify`` is off or the mail is outbound).
        arc_seal: the ARC Set to add (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results
            values without the names, in that order, for the top of the header), or ().
    """

    spf: SpfResult | None
    helo: SpfResult | None
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcVerdict | None
    action: Action
    reply: Reply | None
    reason: str
    authentication_results: str
    forged_authentication_results: tuple[int, ...] = ()
    outbound: bool = False
    signatures: tuple[str, ...] = ()
    results: tuple[MethodResult, ...] = ()
    timings: tuple[CheckTiming, ...] = field(default=(), compare=False)
    arc: ArcResult | None = None
    arc_seal: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The stable, documented JSON form (docs/verdict-json.md)."""
        return {
            "version": VERDICT_JSON_VERSION,
            "spf": _spf_json(self.spf),
            "helo": _spf_json(self.helo),
            "dkim": [
                {
                    "result": d.result.value,
                    "domain": d.domain,
                    "selector": d.selector,
                    "algorithm": d.algorithm,
                    "reason": d.reason,
                    "header_b": d.header_b,
                    "identity": d.identity,
                    "testing": d.testing,
                }
                for d in self.dkim
            ],
            "dmarc": _dmarc_json(self.dmarc),
            "action": self.action.value,
            "smtp_reply": (
                None
                if self.reply is None
                else {"code": self.reply.code, "enhanced_code": self.reply.enhanced, "text": self.reply.text}
            ),
            "reason": self.reason,
            "authentication_results": self.authentication_results,
            "arc": _arc_json(self.arc),
        }


def _arc_json(arc: ArcResult | None) -> dict[str, Any] | None:
    if arc is None:
        return None
    return {
        "result": arc.result.value,
        "instances": arc.instances,
        "oldest_pass": arc.oldest_pass,
        "sealers": list(arc.sealers),
        "override": arc.override or None,
        "reason": arc.reason,
    }


def _spf_json(spf: SpfResult | None) -> dict[str, Any] | None:
    if spf is None:
        return None
    return {
        "result": spf.result.value,
        "domain": spf.domain,
        "identity": spf.identity,
        "explanation": spf.explanation,
    }


def _dmarc_json(dmarc: DmarcVerdict | None) -> dict[str, Any] | None:
    if dmarc is None:
        return None
    return {
        "result": dmarc.result.value,
        "policy": dmarc.policy.value if dmarc.policy else None,
        "disposition": dmarc.disposition.value,
        "from_domain": dmarc.from_domain,
        "from_domains": list(dmarc.from_domains),
        "policy_domain": dmarc.policy_domain,
        "org_domain": dmarc.org_domain,
        "spf_aligned": dmarc.spf_aligned,
        "dkim_aligned": dmarc.dkim_aligned,
        "testing": dmarc.record.testing if dmarc.record else False,
        "reason": dmarc.reason,
    }

"""The reply table and the action decision (actions.py)."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from authmilter.actions import (
    REPLIES,
    FailureAction,
    PolicySettings,
    ReplyName,
    decide_action,
    internal_error_decision,
    make_reply,
)
from authmilter.model import Action, AuthResult, Disposition, DmarcRecord, DmarcVerdict, SpfResult, SpfScope

# Enhanced status codes we may use, from the IANA "Enumerated Status Codes" registry
# (RFC 3463, RFC 7372).
REGISTERED = {"X.3.0", "X.4.3", "X.7.1", "X.7.23", "X.7.26"}


@pytest.mark.parametrize("name", list(ReplyName))
def test_reply_table_is_consistent(name: ReplyName) -> None:
    code, enhanced, text = REPLIES[name]
    assert code[0] in "45" and len(code) == 3 and code.isdigit()
    assert enhanced.split(".")[0] == code[0], "enhanced class must match the reply class (RFC 3463 §2)"
    assert "X." + enhanced.split(".", 1)[1] in REGISTERED
    assert text and "\n" not in text


def test_reply_text_is_printable_ascii_and_bounded() -> None:
    reply = make_reply(ReplyName.DMARC_REJECT, domain="ex\r\nample.com", reason="é" * 1000 + "%s")
    assert all(" " <= c <= "~" for c in reply.text)
    assert "%" not in reply.text
    assert len(reply.text) <= 400


def dmarc(
    result: AuthResult,
    disposition: Disposition = Disposition.NONE,
    domain: str = "example.com",
    reason: str = "no aligned identifier",
) -> DmarcVerdict:
    return DmarcVerdict(
        result=result,
        from_domain=domain,
        policy_domain=domain,
        org_domain=domain,
        disposition=disposition,
        reason=reason,
        from_domains=(domain,) if domain else (),
    )


SPF_FAIL = SpfResult(AuthResult.FAIL, "example.com", SpfScope.MFROM, "bob@example.com", "not allowed")


def test_dmarc_reject_gives_550_naming_the_domain() -> None:
    decision = decide_action("192.0.2.1", None, dmarc(AuthResult.FAIL, Disposition.REJECT), PolicySettings())
    assert decision.action is Action.REJECT
    assert decision.reply is not None
    assert (decision.reply.code, decision.reply.enhanced) == ("550", "5.7.26")
    assert "example.com" in decision.reply.text and "no aligned identifier" in decision.reply.text


def test_dmarc_quarantine() -> None:
    decision = decide_action(
        "192.0.2.1", None, dmarc(AuthResult.FAIL, Disposition.QUARANTINE), PolicySettings()
    )
    assert decision.action is Action.QUARANTINE and decision.reply is None


def test_dmarc_fail_with_policy_none_is_accepted() -> None:
    assert decide_action("192.0.2.1", None, dmarc(AuthResult.FAIL), PolicySettings()).action is Action.ACCEPT


def test_enforce_off_only_annotates() -> None:
    settings = PolicySettings(enforce=False)
    assert (
        decide_action("192.0.2.1", None, dmarc(AuthResult.FAIL, Disposition.REJECT), settings).action
        is Action.ACCEPT
    )


def test_temperror_tempfails_by_default_with_451() -> None:
    decision = decide_action(
        "192.0.2.1", None, dmarc(AuthResult.TEMPERROR, reason="timeout"), PolicySettings()
    )
    assert decision.action is Action.TEMPFAIL
    assert decision.reply is not None and decision.reply.code == "451" and "timeout" in decision.reply.text
    accept = PolicySettings(dmarc_temperror=FailureAction.ACCEPT)
    assert decide_action("192.0.2.1", None, dmarc(AuthResult.TEMPERROR), accept).action is Action.ACCEPT


@pytest.mark.parametrize(
    ("policy", "testing", "action"),
    [
        (Disposition.REJECT, False, Action.TEMPFAIL),
        (Disposition.REJECT, True, Action.TEMPFAIL),  # t=y: a fail would still be quarantined
        (Disposition.QUARANTINE, False, Action.TEMPFAIL),
        (Disposition.QUARANTINE, True, Action.ACCEPT),  # t=y: a fail would be delivered as it is
        (Disposition.NONE, False, Action.ACCEPT),
    ],
)
def test_an_unchecked_identifier_defers_only_when_a_failure_would_be_acted_on(
    policy: Disposition, testing: bool, action: Action
) -> None:
    """dmarc=temperror from an aligned identifier whose DNS failed (the policy is known): a domain
    whose failing mail is delivered anyway (p=none) does not have its mail deferred for it."""
    verdict = dataclasses.replace(
        dmarc(AuthResult.TEMPERROR, reason="DKIM key lookup timed out"),
        policy=policy,
        record=DmarcRecord(policy=policy, testing=testing),
    )
    assert decide_action("192.0.2.1", None, verdict, PolicySettings()).action is action


def test_invalid_from_rejects_with_reason() -> None:
    verdict = dmarc(AuthResult.PERMERROR, domain="", reason="several From header fields")
    decision = decide_action("192.0.2.1", None, verdict, PolicySettings())
    assert decision.action is Action.REJECT
    assert decision.reply is not None and decision.reply.code == "550"
    assert "several From header fields" in decision.reply.text
    accept = PolicySettings(from_error=FailureAction.ACCEPT)
    assert decide_action("192.0.2.1", None, verdict, accept).action is Action.ACCEPT


def test_bad_dmarc_record_permerror_is_accepted() -> None:
    verdict = dmarc(AuthResult.PERMERROR, reason="invalid record")
    assert decide_action("192.0.2.1", None, verdict, PolicySettings()).action is Action.ACCEPT


def test_spf_fail_alone_only_when_configured() -> None:
    assert decide_action("192.0.2.1", SPF_FAIL, None, PolicySettings()).action is Action.ACCEPT
    decision = decide_action("192.0.2.1", SPF_FAIL, None, PolicySettings(spf_fail=FailureAction.REJECT))
    assert decision.action is Action.REJECT
    assert decision.reply is not None and decision.reply.enhanced == "5.7.23"


@pytest.mark.parametrize(
    ("client", "settings"),
    [
        ("192.0.2.1", PolicySettings(never_reject_domains=("example.com",))),
        ("192.0.2.1", PolicySettings(never_reject_domains=("com",))),
        ("198.51.100.7", PolicySettings(never_reject_networks=(ipaddress.ip_network("198.51.100.0/24"),))),
        ("2001:db8::5", PolicySettings(never_reject_networks=(ipaddress.ip_network("2001:db8::/32"),))),
    ],
)
def test_local_override_never_rejects(client: str, settings: PolicySettings) -> None:
    decision = decide_action(client, None, dmarc(AuthResult.FAIL, Disposition.REJECT), settings)
    assert decision.action is Action.ACCEPT
    assert decision.reason.startswith("local override")


def test_override_does_not_match_lookalike_domain() -> None:
    settings = PolicySettings(never_reject_domains=("example.com",))
    verdict = dmarc(AuthResult.FAIL, Disposition.REJECT, domain="badexample.com")
    assert decide_action("192.0.2.1", None, verdict, settings).action is Action.REJECT


@pytest.mark.parametrize(
    ("choice", "action", "code"),
    [
        (FailureAction.TEMPFAIL, Action.TEMPFAIL, "451"),
        (FailureAction.REJECT, Action.REJECT, "550"),
        (FailureAction.ACCEPT, Action.ACCEPT, None),
    ],
)
def test_internal_error_decision(choice: FailureAction, action: Action, code: str | None) -> None:
    decision = internal_error_decision("KeyError", PolicySettings(internal_error=choice))
    assert decision.action is action
    assert (decision.reply.code if decision.reply else None) == code

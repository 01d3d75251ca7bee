"""pipeline.evaluate(): composition, failure containment, and hostile input ending in defined results."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import dns.name
import dns.rdatatype
import pytest

from authmilter.actions import FailureAction, MultipleFromDomains
from authmilter.checks import Check, Decided, Outcomes, Question, Registration, Registry
from authmilter.config import Config, default_config
from authmilter.dkim_body import BodyHashSpec, digest_body
from authmilter.dkim_sign import SigningSettings
from authmilter.dkim_verify import DkimCheck
from authmilter.dmarc import DmarcCheck
from authmilter.history import Envelope, make_record
from authmilter.keys import KeyCache
from authmilter.message import HeaderField, parse_message
from authmilter.model import Action, AuthResult, Disposition, MethodResult, SpfResult, Verdict
from authmilter.pipeline import (
    CHECKS,
    Connection,
    Transaction,
    body_hashes,
    envelope_questions,
    evaluate,
    field_questions,
    match_internal_host,
    outbound_reason,
    sign_transaction,
)
from authmilter.resolver import DnsAnswer, Resolver, ZoneFileSource, tempfail
from authmilter.spf_check import MailFromCheck
from signing import SigningKey, make_message, rsa_key, sign, zone_txt

SOA = "$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return rsa_key(2048)


@pytest.fixture(scope="module")
def resolver(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Resolver:
    folder = tmp_path_factory.mktemp("zones")
    (folder / "sender.example.zone").write_text(
        SOA + '@ IN TXT "v=spf1 ip4:192.0.2.0/24 -all"\n'
        '_dmarc IN TXT "v=DMARC1; p=reject; junk=yes; ;; nonsense ; adkim=r"\n'
        f"s1._domainkey IN TXT {zone_txt(key.txt_record())}\n"
        'badkey._domainkey IN TXT "v=DKIM1; k=rsa; p=MIIB!!not*base64"\n'
    )
    (folder / "twospf.example.zone").write_text(
        SOA + '@ IN TXT "v=spf1 ip4:192.0.2.0/24 -all"\n@ IN TXT "v=spf1 -all"\n'
    )
    return Resolver(ZoneFileSource(sorted(folder.glob("*.zone"))))


CONFIG = dataclasses.replace(
    default_config(), milter=dataclasses.replace(default_config().milter, authserv_id="mx.receiver.example")
)


def run(
    raw: bytes,
    resolver: Resolver,
    config: Config = CONFIG,
    client_ip: str = "192.0.2.10",
    mail_from: str = "bob@sender.example",
    queue_id: str = "4XyZ1",
    registry: Registry = CHECKS,
) -> Verdict:
    transaction = Transaction(
        connection=Connection(client_ip=client_ip, helo="mx.sender.example"),
        mail_from=mail_from,
        recipients=("alice@receiver.example",),
        message=parse_message(raw, max_headers=config.milter.max_headers),
        queue_id=queue_id,
    )
    return evaluate(transaction, resolver, config, registry=registry)


def test_signed_message_passes_everything(resolver: Resolver, key: SigningKey) -> None:
    verdict = run(sign(make_message(), key, "sender.example", "s1"), resolver)
    assert verdict.spf is not None and verdict.spf.result is AuthResult.PASS
    assert [d.result for d in verdict.dkim] == [AuthResult.PASS]
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.PASS
    assert verdict.action is Action.ACCEPT
    assert verdict.authentication_results.startswith("mx.receiver.example;")


def test_disabled_checks_are_absent(resolver: Resolver) -> None:
    config = dataclasses.replace(
        CONFIG,
        spf=dataclasses.replace(CONFIG.spf, enabled=False),
        dmarc=dataclasses.replace(CONFIG.dmarc, enabled=False),
    )
    verdict = run(make_message(), resolver, config)
    assert verdict.spf is None and verdict.helo is None and verdict.dmarc is None
    assert "spf=" not in verdict.authentication_results and "dmarc=" not in verdict.authentication_results


def test_forged_authentication_results_are_listed_highest_index_first(resolver: Resolver) -> None:
    extra = (
        "Authentication-Results: mx.receiver.example; dkim=pass header.d=sender.example\r\n"
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=x@y.example\r\n"
        "Authentication-Results: MX.Receiver.Example; dmarc=pass header.from=sender.example\r\n"
    )
    verdict = run(make_message(extra_headers=extra), resolver)
    assert verdict.forged_authentication_results == (3, 1)


def test_authentication_results_of_the_sites_other_ids_are_removed_too(resolver: Resolver) -> None:
    extra = (
        "Authentication-Results: MX-Old.Receiver.Example; dmarc=pass header.from=sender.example\r\n"
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=x@y.example\r\n"
    )
    config = dataclasses.replace(
        CONFIG, milter=dataclasses.replace(CONFIG.milter, remove_authserv_ids=("mx-old.receiver.example",))
    )
    assert run(make_message(extra_headers=extra), resolver, config).forged_authentication_results == (1,)
    assert run(make_message(extra_headers=extra), resolver).forged_authentication_results == ()


def with_policy(**settings: object) -> Config:
    return dataclasses.replace(CONFIG, policy=dataclasses.replace(CONFIG.policy, **settings))


def test_trial_mode_header_says_what_was_done_as_the_history_record_does(resolver: Resolver) -> None:
    # Spoofed sender.example (p=reject) from outside: DMARC asks for reject; enforce = false accepts.
    verdict = run(make_message(), resolver, with_policy(enforce=False), client_ip="203.0.113.5")
    assert verdict.action is Action.ACCEPT
    assert verdict.dmarc is not None and verdict.dmarc.disposition is Disposition.REJECT
    assert "dmarc=fail (p=reject dis=none, reject not enforced by local configuration)" in " ".join(
        verdict.authentication_results.split()
    )
    envelope = Envelope("203.0.113.5", "bob@sender.example", (), "mx.sender.example", "4XyZ1")
    record = make_record(verdict, envelope, "mx.receiver.example", 0, "treewalk")
    assert record["dmarc"]["disposition"] == "reject"  # what the policy asked for
    assert record["policy_evaluated"]["disposition"] == "none"  # what was done, as dis= says
    assert record["policy_evaluated"]["reasons"] == [
        {"type": "local_policy", "comment": "DMARC policy not enforced by local configuration"}
    ]
    enforced = run(make_message(), resolver, client_ip="203.0.113.5")
    assert enforced.action is Action.REJECT
    assert "dmarc=fail (p=reject dis=reject)" in " ".join(enforced.authentication_results.split())


@pytest.mark.parametrize(
    "from_header, choice, action",
    [
        ("bob@sender.example, eve@other.example", "evaluate", Action.ACCEPT),
        ("bob@sender.example, eve@other.example", "reject", Action.REJECT),
        ("bob@sender.example, Ann <ann@Sender.Example>", "reject", Action.ACCEPT),
    ],
)
def test_from_field_with_several_domains(
    resolver: Resolver, from_header: str, choice: str, action: Action
) -> None:
    config = with_policy(from_multiple_domains=MultipleFromDomains(choice))
    verdict = run(make_message(from_header=from_header), resolver, config)
    assert verdict.action is action
    if action is Action.REJECT:
        assert verdict.reply is not None
        assert str(verdict.reply) == (
            "550 5.7.1 Rejected by local policy: the From field names authors in different domains; "
            "send one message per author domain (sender.example, other.example)"
        )


class ExplodingDmarc:
    """The test zones, but a bug in the resolver trips on every _dmarc name."""

    def __init__(self, resolver: Resolver) -> None:
        self.source = resolver.source

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        if name.labels[0] == b"_dmarc":
            raise RuntimeError("resolver bug")
        return self.source.lookup(name, rdtype)


def test_a_check_that_raises_is_its_temperror_and_the_others_stand(
    resolver: Resolver, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    raw = sign(make_message(), key, "sender.example", "s1")
    with caplog.at_level(logging.ERROR):
        verdict = run(raw, Resolver(ExplodingDmarc(resolver)), queue_id="QID42")
    assert verdict.spf is not None and verdict.spf.result is AuthResult.PASS
    assert [d.result for d in verdict.dkim] == [AuthResult.PASS]
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.TEMPERROR
    assert verdict.dmarc.from_domains == ("sender.example",)
    # [policy] dmarc_temperror decides (tempfail by default), not internal_error.
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.enhanced) == ("451", "4.4.3")
    assert "spf=pass" in verdict.authentication_results and "dkim=pass" in verdict.authentication_results
    assert "dmarc=temperror" in verdict.authentication_results
    assert [(t.check, t.failed) for t in verdict.timings] == [
        ("spf", False),
        ("helo", False),
        ("dkim", False),
        ("arc", False),
        ("dmarc", True),
    ]
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]  # one traceback, once
    assert "QID42" in error.getMessage() and "DMARC" in error.getMessage() and error.exc_info is not None


def test_a_dmarc_temperror_from_a_bug_follows_the_policy(resolver: Resolver, key: SigningKey) -> None:
    accepting = dataclasses.replace(
        CONFIG, policy=dataclasses.replace(CONFIG.policy, dmarc_temperror=FailureAction.ACCEPT)
    )
    raw = sign(make_message(), key, "sender.example", "s1")
    verdict = run(raw, Resolver(ExplodingDmarc(resolver)), accepting)
    assert verdict.action is Action.ACCEPT and "dmarc=temperror" in verdict.authentication_results


class BrokenSpf(MailFromCheck):
    def evaluate(self, transaction: Transaction, earlier: Outcomes, resolver: Resolver, settings: Any) -> Any:
        raise RuntimeError("spf bug")


def test_dmarc_sees_the_temperror_of_a_check_that_raised(resolver: Resolver) -> None:
    registry = Registry(
        (
            Registration(BrokenSpf(), lambda config: config.spf),
            Registration(DkimCheck(), lambda config: config.dkim),
            Registration(DmarcCheck(), lambda config: config.dmarc),
        )
    )
    verdict = run(make_message(), resolver, registry=registry)
    assert verdict.spf is not None and verdict.spf.result is AuthResult.TEMPERROR
    assert verdict.spf.identity == "bob@sender.example"
    assert "spf=temperror smtp.mailfrom=bob@sender.example" in verdict.authentication_results
    # No DKIM signature, SPF unknown: DMARC cannot say fail, so it says temperror too (RFC 9989 §5.3).
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.TEMPERROR
    assert verdict.action is Action.TEMPFAIL


class BrokenPrecheck(DmarcCheck):
    def precheck(self, transaction: Transaction, settings: Any) -> Any:
        raise RuntimeError("precheck bug")


def test_a_precheck_that_raises_only_loses_the_shortcut(
    resolver: Resolver, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(
        (*list(CHECKS)[:-1], Registration(BrokenPrecheck(), lambda config: config.dmarc))
    )
    raw = sign(make_message(), key, "sender.example", "s1")
    with caplog.at_level(logging.ERROR):
        verdict = run(raw, resolver, queue_id="QPRE", registry=registry)
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.PASS
    assert verdict.action is Action.ACCEPT
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "QPRE" in error.getMessage() and "precheck" in error.getMessage() and error.exc_info is not None


def test_internal_error_outside_the_checks_tempfails_and_logs_queue_id(
    resolver: Resolver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def policy_bug(*args: object) -> None:
        raise RuntimeError("policy bug")

    monkeypatch.setattr("authmilter.pipeline.decide_action", policy_bug)
    forged = "Authentication-Results: mx.receiver.example; dmarc=pass header.from=sender.example\r\n"
    with caplog.at_level(logging.ERROR):
        verdict = run(make_message(extra_headers=forged), resolver, queue_id="QID42")
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.enhanced) == ("451", "4.3.0")
    assert "QID42" in caplog.text and "policy bug" in caplog.text
    assert verdict.authentication_results == "mx.receiver.example; none"
    assert verdict.forged_authentication_results == (1,)


class XTestCheck(Check[None, str]):
    """A check of the tests' own: one module's worth, registered with one line."""

    name = "x-test"
    label = "X-TEST"
    requires = ("spf",)

    def evaluate(self, transaction: Transaction, earlier: Outcomes, resolver: Resolver, settings: None) -> str:  # noqa: E501
        spf = earlier["spf"]
        return "pass" if isinstance(spf, SpfResult) and spf.result is AuthResult.PASS else "fail"

    def failed(self, transaction: Transaction, settings: None, reason: str) -> str:
        return "temperror"

    def method_results(self, outcome: str, decided: Decided) -> tuple[MethodResult, ...]:
        return (MethodResult("x-test", AuthResult(outcome), (("header", "x", "probe.example"),), "seen"),)


def test_a_check_is_one_class_and_one_registration(resolver: Resolver, key: SigningKey) -> None:
    registry = CHECKS.register(XTestCheck(), lambda config: None)
    raw = sign(make_message(), key, "sender.example", "s1")
    verdict = run(raw, resolver, registry=registry)
    clauses = [" ".join(clause.split()) for clause in verdict.authentication_results.split(";")]
    assert [c.split("=")[0] for c in clauses[1:]] == ["spf", "spf", "dkim", "dmarc", "arc", "x-test"]
    assert clauses[-1] == "x-test=pass (seen) header.x=probe.example"
    assert verdict.results[-1].method == "x-test" and verdict.timings[-1].check == "x-test"
    # The JSON verdict (docs/verdict-json.md) is that of the built-in checks, and the A-R theirs plus ours.
    without = run(raw, resolver).as_json()
    assert {**verdict.as_json(), "authentication_results": ""} == {**without, "authentication_results": ""}
    assert verdict.authentication_results.startswith(without["authentication_results"] + ";")


class AskingCheck(XTestCheck):
    """A check of the tests' own that tells DNS names at MAIL FROM and from a field of its own."""

    name = "x-asking"
    prefetch_fields = frozenset({"x-probe"})

    def envelope_questions(self, connection: Connection, mail_from: str, settings: None) -> list[Question]:
        return [(f"envelope.{connection.helo}", dns.rdatatype.TXT)]

    def field_questions(self, field: HeaderField, settings: None) -> list[Question]:
        return [(f"field.{field.value.strip()}", dns.rdatatype.A)]


def test_a_check_of_its_own_is_asked_its_questions_as_the_built_in_ones() -> None:
    # The checks that declare nothing are found once and not asked per message: one that does
    # declare, defined outside the pipeline, must still be asked at MAIL FROM and per field.
    registry = CHECKS.register(AskingCheck(), lambda config: None)
    connection = Connection(client_ip="192.0.2.10", helo="mx.sender.example")
    assert envelope_questions(connection, "bob@sender.example", CONFIG, registry) == [
        ("sender.example", dns.rdatatype.TXT),
        ("mx.sender.example", dns.rdatatype.TXT),
        ("envelope.mx.sender.example", dns.rdatatype.TXT),
    ]
    (probe,) = parse_message(b"X-Probe: probe.example\r\n\r\n").headers.fields
    assert field_questions(probe, CONFIG, registry) == [("field.probe.example", dns.rdatatype.A)]
    assert field_questions(probe, CONFIG) == []


def test_checks_name_the_dns_questions_they_will_ask(key: SigningKey) -> None:
    raw = sign(make_message(), key, "sender.example", "s1")
    transaction = Transaction(
        connection=Connection(client_ip="192.0.2.10", helo="mx.sender.example"),
        mail_from="<bob@sender.example>",
        recipients=(),
        message=parse_message(raw),
    )
    asked = {r.check.name: r.check.prefetch(transaction, r.settings(CONFIG)) for r in CHECKS}
    assert asked == {
        "spf": [("sender.example", dns.rdatatype.TXT)],
        "helo": [("mx.sender.example", dns.rdatatype.TXT)],
        "dkim": [("s1._domainkey.sender.example", dns.rdatatype.TXT)],
        "arc": [],  # no ARC Set: nothing to ask
        # RFC 9989 §4.10: every name of the tree walk.
        "dmarc": [("_dmarc.sender.example", dns.rdatatype.TXT), ("_dmarc.example", dns.rdatatype.TXT)],
    }


def test_a_registry_refuses_a_check_before_one_it_requires() -> None:
    with pytest.raises(ValueError, match="'dmarc' requires spf, which must be registered before it"):
        Registry((Registration(DkimCheck(), lambda c: c.dkim), Registration(DmarcCheck(), lambda c: c.dmarc)))
    with pytest.raises(ValueError, match="'x-test' requires spf"):
        Registry().register(XTestCheck(), lambda c: None)
    with pytest.raises(ValueError, match="'dkim' is registered twice"):
        CHECKS.register(DkimCheck(), lambda c: c.dkim)


class AfterArcCheck(XTestCheck):
    """Wants its resinfo after ARC's, which wants its own after DMARC's: fine, a chain."""

    name = "x-after-arc"
    results_after = ("arc",)


class BeforeArcCheck(XTestCheck):
    """Wants its resinfo after ARC's while ARC wants its own after this one's: no order exists."""

    name = "dmarc"
    requires = ()
    results_after = ("arc",)


def test_the_header_order_places_a_check_after_the_results_it_follows() -> None:
    chained = Registry((*CHECKS, Registration(AfterArcCheck(), lambda c: None)))
    assert [r.check.name for r in CHECKS] == ["spf", "helo", "dkim", "arc", "dmarc"]
    in_header = [r.check.name for r in chained.header_order()]
    assert in_header == ["spf", "helo", "dkim", "dmarc", "arc", "x-after-arc"]
    arc = next(r for r in CHECKS if r.check.name == "arc")
    with pytest.raises(ValueError, match="checks arc, dmarc each want their results after another's"):
        Registry((arc, Registration(BeforeArcCheck(), lambda c: None)))


class FailingKeys:
    """The test zones, but the DKIM key names answer SERVFAIL (a DNS blip at the sender's servers)."""

    def __init__(self, resolver: Resolver) -> None:
        self.source = resolver.source

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        if b"_domainkey" in name.labels:
            return tempfail("SERVFAIL from 192.0.2.53")
        return self.source.lookup(name, rdtype)


def test_an_unreachable_aligned_key_defers_instead_of_rejecting(resolver: Resolver, key: SigningKey) -> None:
    """RFC 9989 §5.3.2: the only aligned identifier could not be checked; SPF fails: 451, not 550."""
    signed = sign(make_message(), key, "sender.example", "s1")
    verdict = run(signed, Resolver(FailingKeys(resolver)), client_ip="203.0.113.9", queue_id="QTEMP")
    assert [d.result for d in verdict.dkim] == [AuthResult.TEMPERROR]
    assert verdict.spf is not None and verdict.spf.result is AuthResult.FAIL
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.TEMPERROR
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.enhanced) == ("451", "4.4.3")
    assert "dmarc=temperror" in verdict.authentication_results
    envelope = Envelope("203.0.113.9", "bob@sender.example", ("alice@receiver.example",), "mx", "QTEMP")
    record = make_record(verdict, envelope, "mx.receiver.example", 0.0, "treewalk")
    assert (record["dmarc"]["result"], record["action"]) == ("temperror", "tempfail")
    # A signature that was checked and failed is a permanent answer: the policy applies.
    tampered = signed.replace(b"Hello", b"Jello")
    assert tampered != signed
    rejected = run(tampered, resolver, client_ip="203.0.113.9")
    assert [d.result for d in rejected.dkim] == [AuthResult.FAIL]
    assert rejected.action is Action.REJECT and rejected.reply is not None and rejected.reply.code == "550"


# --- Bad input: each ends in a defined result, never a traceback. ---


def test_message_without_header_body_separator(resolver: Resolver) -> None:
    verdict = run(b"From: bob@sender.example\r\nSubject: no body", resolver)
    assert verdict.dmarc is not None and verdict.dmarc.from_domain == "sender.example"
    assert verdict.action is Action.ACCEPT  # SPF passes aligned


def test_bare_lf_message_verifies(resolver: Resolver, key: SigningKey) -> None:
    signed = sign(make_message(), key, "sender.example", "s1").replace(b"\r\n", b"\n")
    verdict = run(signed, resolver, client_ip="203.0.113.9")
    assert [d.result for d in verdict.dkim] == [AuthResult.PASS]
    assert verdict.action is Action.ACCEPT


def test_eight_bit_headers(resolver: Resolver) -> None:
    raw = b"From: =?utf-8?q?B=C3=B6b?= <bob@sender.example>\r\nSubject: caf\xc3\xa9 \xff\xfe\r\n\r\nbody\r\n"
    verdict = run(raw, resolver)
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.PASS


def test_ten_thousand_headers(resolver: Resolver) -> None:
    raw = b"From: bob@sender.example\r\n" + b"X-Junk: 1\r\n" * 10000 + b"\r\nbody\r\n"
    verdict = run(raw, resolver)
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.PASS


def test_fifty_megabyte_body(resolver: Resolver, key: SigningKey) -> None:
    raw = make_message(body="x" * 998 + "\r\n") + (b"y" * 998 + b"\r\n") * 50_000
    verdict = run(sign(raw, key, "sender.example", "s1"), resolver, client_ip="203.0.113.9")
    assert [d.result for d in verdict.dkim] == [AuthResult.PASS]


def test_two_spf_records_are_permerror(resolver: Resolver) -> None:
    verdict = run(make_message(from_header="a@twospf.example"), resolver, mail_from="a@twospf.example")
    assert verdict.spf is not None and verdict.spf.result is AuthResult.PERMERROR


def test_dmarc_record_with_junk_tags_still_applies(resolver: Resolver) -> None:
    verdict = run(make_message(), resolver, client_ip="203.0.113.9")
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.FAIL
    assert verdict.action is Action.REJECT


def test_dkim_key_with_bad_base64_is_permerror(resolver: Resolver, key: SigningKey) -> None:
    verdict = run(sign(make_message(), key, "sender.example", "badkey"), resolver)
    assert [d.result for d in verdict.dkim] == [AuthResult.PERMERROR]


def test_several_from_fields_reject(resolver: Resolver) -> None:
    raw = b"From: bob@sender.example\r\nFrom: eve@evil.example\r\nSubject: x\r\n\r\nbody\r\n"
    verdict = run(raw, resolver)
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.PERMERROR
    assert verdict.action is Action.REJECT and verdict.reply is not None and verdict.reply.code == "550"


def test_empty_message(resolver: Resolver, tmp_path: Path) -> None:
    verdict = run(b"", resolver)
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.PERMERROR


# --- outbound mail: the direction, and signing ----------------------------------------------------


@pytest.fixture(scope="module")
def signing_config(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Config:
    folder = tmp_path_factory.mktemp("tables")
    (folder / "s1.private").write_bytes(key.private)
    (folder / "s1.private").chmod(0o600)
    (folder / "KeyTable").write_text(f"s1 sender.example:s1:{folder}/s1.private\n")
    (folder / "SigningTable").write_text("sender.example s1\n")
    signing = SigningSettings(
        key_table=str(folder / "KeyTable"),
        signing_table=str(folder / "SigningTable"),
        sign_daemon_names=("submission",),
    )
    return dataclasses.replace(CONFIG, signing=signing)


def outbound(connection: Connection, raw: bytes = b"") -> Transaction:
    message = parse_message(raw or make_message(extra_headers=FORGED_AR))
    return Transaction(connection=connection, mail_from="bob@sender.example", recipients=(), message=message)


FORGED_AR = "Authentication-Results: mx.receiver.example; dmarc=pass\r\n"
LOOPBACK = Connection(client_ip="", helo="", internal_host=match_internal_host("", "", CONFIG))


def outside(macros: dict[str, str]) -> Connection:
    return Connection("203.0.113.9", "mx.sender.example", macros=macros)


@pytest.mark.parametrize(
    ("connection", "why"),
    [
        (LOOPBACK, "internal host (127.0.0.1 at <default>:1)"),
        (outside({"{auth_authen}": "bob", "{auth_type}": "PLAIN"}), "authenticated as bob"),
        (outside({"{auth_type}": "EXTERNAL"}), "authenticated as an unnamed user (EXTERNAL)"),
        (outside({"{daemon_name}": "submission"}), "daemon_name submission"),
    ],
)  # fmt: skip
def test_outbound_mail_is_signed_not_verified(
    resolver: Resolver, signing_config: Config, connection: Connection, why: str
) -> None:
    before = resolver.queries
    verdict = evaluate(outbound(connection), resolver, signing_config, now=1_790_000_000)
    assert verdict.outbound and verdict.action is Action.ACCEPT
    assert verdict.reason.startswith(
        f"outbound: {why}; signed for bob@sender.example: d=sender.example s=s1 ("
    )
    assert (verdict.spf, verdict.dkim, verdict.dmarc, verdict.authentication_results) == (None, (), None, "")
    assert verdict.forged_authentication_results == (1,)
    [signature] = verdict.signatures
    assert "t=1790000000;" in signature.replace("\n ", "")
    assert resolver.queries == before  # nothing verified


def test_inbound_when_nothing_says_outbound(resolver: Resolver, signing_config: Config) -> None:
    matched = Connection("127.0.0.1", "h", internal_host=match_internal_host("127.0.0.1", "", CONFIG))
    assert outbound_reason(matched, signing_config).startswith("internal host")
    for connection in (
        Connection("203.0.113.9", "h", macros={"{daemon_name}": "smtpd"}),
        Connection("127.0.0.1", "h"),  # no match recorded: check builds connections like this
    ):
        assert outbound_reason(connection, signing_config) == ""
        assert not evaluate(outbound(connection), resolver, signing_config).outbound
    authenticated = Connection("203.0.113.9", "h", macros={"{auth_authen}": "bob"})
    config = dataclasses.replace(
        signing_config, milter=dataclasses.replace(signing_config.milter, skip_authenticated=False)
    )
    assert outbound_reason(authenticated, config) == ""


def test_outbound_without_entry_is_unsigned_with_the_reason(
    resolver: Resolver, signing_config: Config
) -> None:
    raw = make_message(from_header="olga@other.example")
    verdict = evaluate(outbound(LOOPBACK, raw), resolver, signing_config)
    assert verdict.signatures == () and verdict.action is Action.ACCEPT
    assert verdict.reason.endswith(
        "not signed: no SigningTable entry for olga@other.example (tried keys olga@other.example, "
        "other.example, olga@.example, .example, olga@*, *)"
    )
    several = evaluate(
        outbound(LOOPBACK, b"From: a@sender.example\r\nFrom: b@sender.example\r\n\r\nx\r\n"),
        resolver,
        signing_config,
    )
    assert (
        several.signatures == ()
        and "no from address to sign for: From: 2 From header fields" in several.reason
    )


def test_sign_transaction_shares_the_path_and_a_lost_key_is_an_internal_error(
    resolver: Resolver, signing_config: Config, tmp_path: Path, key: SigningKey
) -> None:
    outcome = sign_transaction(outbound(Connection("", "")), signing_config, KeyCache(), now=1_790_000_000)
    assert len(outcome.signatures) == 1 and outcome.reason.startswith("signed for bob@sender.example")
    (tmp_path / "k.private").write_bytes(key.private)
    (tmp_path / "k.private").chmod(0o600)
    (tmp_path / "KeyTable").write_text(f"s1 sender.example:s1:{tmp_path}/k.private\n")
    (tmp_path / "SigningTable").write_text("* s1\n")
    signing = dataclasses.replace(
        signing_config.signing,
        key_table=str(tmp_path / "KeyTable"),
        signing_table=str(tmp_path / "SigningTable"),
    )
    config = dataclasses.replace(signing_config, signing=signing)
    assert config.signing_table is not None
    (tmp_path / "k.private").chmod(0o644)  # now refused: others may read it
    verdict = evaluate(outbound(LOOPBACK), resolver, config)
    assert verdict.action is Action.TEMPFAIL and verdict.signatures == ()
    assert verdict.forged_authentication_results == (1,)


# --- cheap caps before expensive work, and the per-message DNS budget -------------------------------


class CountingSource:
    """Counts the lookups that reach it; answers from the test zones."""

    def __init__(self, resolver: Resolver) -> None:
        self.source = resolver.source
        self.asked: list[str] = []

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        self.asked.append(f"{name}/{rdtype.name}")
        return self.source.lookup(name, rdtype)


THIRTY_TWO_AUTHORS = ", ".join(f"a{n}@d{n}.unanswering.example" for n in range(32)).encode()


def test_a_from_with_too_many_domains_is_rejected_without_any_dns_query(resolver: Resolver) -> None:
    counting = CountingSource(resolver)
    raw = b"From: " + THIRTY_TWO_AUTHORS + b"\r\nSubject: x\r\n\r\nbody\r\n"
    verdict = run(raw, Resolver(counting))
    assert counting.asked == []
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.enhanced) == ("550", "5.7.1")
    assert verdict.dmarc is not None and "32 From domains" in verdict.dmarc.reason
    assert verdict.spf is None and verdict.dkim == ()
    # When the policy does not reject such a From, the message is checked (within its DNS budget).
    accepting = dataclasses.replace(CONFIG, policy=dataclasses.replace(CONFIG.policy, from_error="accept"))
    checked = run(raw, Resolver(counting), config=accepting)
    assert checked.action is Action.ACCEPT and checked.spf is not None
    assert checked.dmarc is not None and checked.dmarc.result is AuthResult.PERMERROR
    assert not any("unanswering" in asked for asked in counting.asked)


def test_a_message_past_its_dns_query_budget_ends_in_temperror(
    tmp_path: Path, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    includes = " ".join(f"include:i{n}.sender.example" for n in range(10))
    zone = tmp_path / "sender.example.zone"
    zone.write_text(
        SOA
        + f"@ IN TXT {zone_txt(f'v=spf1 {includes} -all')}\n"
        + "".join(f'i{n} IN TXT "v=spf1 ip4:198.51.100.{n} -all"\n' for n in range(10))
        + '_dmarc IN TXT "v=DMARC1; p=reject"\n'
        + f"s1._domainkey IN TXT {zone_txt(key.txt_record())}\n"
    )
    counting = CountingSource(Resolver(ZoneFileSource([zone])))
    config = dataclasses.replace(CONFIG, dns=dataclasses.replace(CONFIG.dns, message_query_budget=10))
    with caplog.at_level(logging.WARNING):
        verdict = run(
            sign(make_message(), key, "sender.example", "s1"), Resolver(counting), config, queue_id="QB"
        )
    assert len(counting.asked) == 10
    assert verdict.spf is not None and verdict.spf.result is AuthResult.TEMPERROR
    assert [d.result for d in verdict.dkim] == [AuthResult.TEMPERROR]
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.TEMPERROR
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.enhanced) == ("451", "4.4.3")
    [line] = [m for m in caplog.messages if "budget" in m]
    assert "queue_id=QB" in line and "DNS query budget of this message spent (10 queries)" in line
    assert "during SPF (MAIL FROM)" in line


def test_body_hashes_are_known_at_the_end_of_the_header_block(resolver: Resolver, key: SigningKey) -> None:
    raw = sign(make_message(), key, "sender.example", "s1", canonicalize=(b"simple", b"relaxed"))
    message = parse_message(raw)
    inbound = Connection(client_ip="192.0.2.10", helo="mx.sender.example")
    assert body_hashes(inbound, message.headers, CONFIG) == {BodyHashSpec("relaxed", None, "sha256")}
    # Outbound mail is not verified: only our own signing hash (c= relaxed/relaxed by default).
    assert body_hashes(LOOPBACK, message.headers, CONFIG) == {BodyHashSpec("relaxed", None, "sha256")}
    simple = dataclasses.replace(CONFIG, signing=SigningSettings(canonicalization="relaxed/simple"))
    assert body_hashes(LOOPBACK, message.headers, simple) == {BodyHashSpec("simple", None, "sha256")}
    unchecked = dataclasses.replace(CONFIG, dkim=dataclasses.replace(CONFIG.dkim, enabled=False))
    assert body_hashes(inbound, message.headers, unchecked) == frozenset()
    # The milter's transaction: the header block and the hashes; the same verdict as the whole message.
    head = raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    streamed = Transaction(
        connection=inbound,
        mail_from="bob@sender.example",
        recipients=(),
        message=parse_message(head),
        body=digest_body(body_hashes(inbound, message.headers, CONFIG), message.body),
    )
    assert [d.result for d in evaluate(streamed, resolver, CONFIG).dkim] == [AuthResult.PASS]

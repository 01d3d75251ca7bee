"""dkim_sign.py: signing plans from OpenDKIM tables, and signatures independent verifiers accept.

Every signature made here is verified twice, through the same zone files: by dkimpy's own
``DKIM.verify`` (an independent verifier: it shares only the canonicalization code with the signer
path we call) and by our ``verify_dkim``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import dkim
import pytest

from authmilter import dkim_rsa
from authmilter.dkim_body import BodyHashSpec, digest_body
from authmilter.dkim_sign import (
    DEFAULT_HEADERS,
    SigningError,
    SigningSettings,
    check_header_names,
    plan_signatures,
    sign_message,
    signing_address,
    signing_body_hash,
)
from authmilter.dkim_verify import DkimSettings, verify_dkim
from authmilter.keys import KeyCache, PrivateKey, dns_record, generate_key
from authmilter.message import parse_message
from authmilter.model import AuthResult
from authmilter.resolver import DnsStatus, Resolver, ZoneFileSource
from authmilter.tables import KeyEntry, KeyTable, SigningTable
from signing import make_message, zone_txt

SOA = "$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n"
NOW = 1_790_000_000.0  # 2026-09-21: within dkimpy's own clock check (t= at most 10 hours ahead)


@dataclasses.dataclass
class Setup:
    folder: Path
    keys: dict[str, PrivateKey]
    resolver: Resolver
    cache: KeyCache

    def key_of(self, entry: KeyEntry) -> PrivateKey:
        return self.cache.get(entry.key_path, entry.algorithm, "refuse")

    def tables(self, key_table: str, signing_table: str, refile: bool = True) -> SigningTable:
        (self.folder / "KeyTable").write_text(key_table)
        (self.folder / "SigningTable").write_text(signing_table)
        prefix = "refile:" if refile else ""
        return SigningTable.load(
            f"{prefix}{self.folder / 'SigningTable'}", KeyTable.load(str(self.folder / "KeyTable"))
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    dkim_rsa.install()
    folder = tmp_path_factory.mktemp("signing")
    keys: dict[str, PrivateKey] = {}
    for name, kind in (("rsa", "rsa"), ("ed", "ed25519")):
        pem, key = generate_key(kind)
        path = folder / f"{name}.private"
        path.write_bytes(pem)
        os.chmod(path, 0o600)
        keys[name] = key
    records = "".join(f"{name}._domainkey IN TXT {zone_txt(dns_record(key))}\n" for name, key in keys.items())
    for domain in ("sender.example", "other.example"):
        (folder / f"{domain}.zone").write_text(SOA + records)
    resolver = Resolver(ZoneFileSource(sorted(folder.glob("*.zone"))))
    return Setup(folder, keys, resolver, KeyCache())


DUAL_KEYS = "rsa sender.example:rsa:./rsa.private\ned sender.example:ed:./ed.private\n"
DUAL_SIGNING = "*@sender.example rsa\n*@sender.example ed\n"


def with_signatures(message: bytes, values: tuple[str, ...]) -> bytes:
    """The message as the MTA delivers it: each value prepended, its LF folds written as CRLF."""
    fields = b"".join(b"DKIM-Signature: " + v.replace("\n", "\r\n").encode() + b"\r\n" for v in values)
    return fields + message


def dkimpy_verifies(message: bytes, resolver: Resolver, index: int) -> bool:
    def txt(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.txt(name.decode().rstrip("."))
        return answer.texts[0].encode() if answer.status is DnsStatus.OK else b""

    verified: bool = dkim.DKIM(message).verify(idx=index, dnsfunc=txt)
    return verified


def our_results(message: bytes, resolver: Resolver, now: float = NOW) -> list[AuthResult]:
    return [r.result for r in verify_dkim(message, resolver, DkimSettings(), now=now)]


def tags(value: str) -> dict[str, str]:
    unfolded = re.sub(r"\s+", "", value)
    return dict(item.split("=", 1) for item in unfolded.split(";") if item)


def sign(
    setup: Setup,
    message: bytes,
    table: SigningTable,
    address: str = "bob@sender.example",
    multiple: bool = True,
    **settings: object,
) -> tuple[str, ...]:
    plan = plan_signatures(table, address, multiple)
    assert plan.signers, plan.reason
    return sign_message(message, plan.signers, setup.key_of, SigningSettings(**settings), NOW)  # type: ignore[arg-type]


# --- signatures that verify ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "canonicalization", ["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"]
)
def test_dual_rsa_and_ed25519_in_one_pass_verify(setup: Setup, canonicalization: str) -> None:
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    message = make_message(extra_headers="Cc: carol@receiver.example,\r\n\tdave@receiver.example\r\n")
    values = sign(setup, message, table, canonicalization=canonicalization)
    assert [tags(v)["a"] for v in values] == ["rsa-sha256", "ed25519-sha256"]
    assert all(tags(v)["c"] == canonicalization and "\r" not in v for v in values)
    signed = with_signatures(message, values)
    assert dkimpy_verifies(signed, setup.resolver, 0) and dkimpy_verifies(signed, setup.resolver, 1)
    assert our_results(signed, setup.resolver) == [AuthResult.PASS, AuthResult.PASS]


def test_first_match_only_without_multiple_signatures(setup: Setup) -> None:
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    values = sign(setup, make_message(), table, multiple=False)
    assert [tags(v)["s"] for v in values] == ["rsa"]


def test_tags_t_always_x_when_configured_and_no_i_by_default(setup: Setup) -> None:
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    message = make_message()
    [plain, _] = sign(setup, message, table)
    assert tags(plain)["t"] == str(int(NOW)) and "x" not in tags(plain) and "i" not in tags(plain)
    assert tags(plain)["d"] == "sender.example" and tags(plain)["v"] == "1"
    [expiring, _] = sign(setup, message, table, expire_after=3600)
    assert tags(expiring)["x"] == str(int(NOW) + 3600)
    signed = with_signatures(message, (expiring,))
    assert our_results(signed, setup.resolver, now=NOW + 60) == [AuthResult.PASS]
    assert our_results(signed, setup.resolver, now=NOW + 7200) == [AuthResult.FAIL]


def test_identity_from_the_signing_table(setup: Setup) -> None:
    table = setup.tables(DUAL_KEYS, "*@sender.example rsa:bob=x@mail.%\n")
    message = make_message()
    [value] = sign(setup, message, table)
    assert tags(value)["i"] == "bob=3Dx@mail.sender.example"  # dkim-quoted-printable, RFC 6376 §2.11
    signed = with_signatures(message, (value,))
    assert dkimpy_verifies(signed, setup.resolver, 0)
    [result] = verify_dkim(signed, setup.resolver, DkimSettings(), now=NOW)
    assert result.result is AuthResult.PASS and result.identity == "bob=3Dx@mail.sender.example"


def test_percent_domain_signs_for_the_sender_domain(setup: Setup) -> None:
    table = setup.tables("shared %:rsa:./rsa.private\n", "*@* shared\n")
    message = make_message(from_header="Olga <olga@Other.Example>")
    address, problem = signing_address(parse_message(message).headers, "", "from")
    assert (address, problem) == ("olga@other.example", "")
    [value] = sign(setup, message, table, address=address)
    assert tags(value)["d"] == "other.example"
    assert our_results(with_signatures(message, (value,)), setup.resolver) == [AuthResult.PASS]


def test_percent_key_name_takes_the_key_named_after_the_domain(setup: Setup) -> None:
    table = setup.tables("sender.example sender.example:ed:./ed.private\n", "*@* %\n")
    [signer] = plan_signatures(table, "bob@sender.example", True).signers
    assert (signer.key.name, signer.domain, signer.selector) == ("sender.example", "sender.example", "ed")
    plan = plan_signatures(table, "olga@other.example", True)
    assert plan.signers == ()
    assert "names key '%' but the KeyTable has no key named other.example" in plan.reason


# --- which header fields are signed -----------------------------------------------------------------


def test_default_header_list_and_oversigning(setup: Setup) -> None:
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    extra = (
        "Received: from x\r\nAuthentication-Results: mx.sender.example; none\r\n"
        "X-Mailer: y\r\nList-Id: <l.example>\r\n"
    )
    [value, _] = sign(setup, make_message(extra_headers=extra), table)
    signed = tags(value)["h"].split(":")
    # Present fields of the default list; the oversigned ones listed once more than they occur.
    assert sorted(signed) == sorted(
        [
            "from",
            "from",
            "to",
            "to",
            "subject",
            "subject",
            "date",
            "date",
            "message-id",
            "message-id",
            "list-id",
        ]
    )
    assert not {"received", "authentication-results", "x-mailer", "cc", "reply-to"} & set(signed)


def test_configured_header_list(setup: Setup) -> None:
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    [value, _] = sign(setup, make_message(), table, headers=("from", "subject"), oversign_headers=("from",))
    assert tags(value)["h"] == "from:from:subject"


@pytest.mark.parametrize("added", ["From: Eve <eve@evil.example>", "Subject: Urgent: wire the money"])
def test_oversigning_breaks_on_an_added_field(setup: Setup, added: str) -> None:
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    message = make_message()
    tampered = with_signatures(added.encode() + b"\r\n" + message, sign(setup, message, table))
    assert not dkimpy_verifies(tampered, setup.resolver, 0) and not dkimpy_verifies(
        tampered, setup.resolver, 1
    )
    assert our_results(tampered, setup.resolver) == [AuthResult.FAIL, AuthResult.FAIL]


def test_without_oversigning_an_added_subject_goes_unnoticed(setup: Setup) -> None:
    """What the extra h= entry is for. (A second From is caught anyway: dkimpy's verifier, which
    verify_dkim uses, always counts one From more than h= lists.)"""
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    message = make_message()
    weak = sign(setup, message, table, oversign_headers=())
    tampered = with_signatures(b"Subject: Urgent: wire the money\r\n" + message, weak)
    assert dkimpy_verifies(tampered, setup.resolver, 0)
    assert our_results(tampered, setup.resolver) == [AuthResult.PASS, AuthResult.PASS]


def test_every_occurrence_is_signed(setup: Setup) -> None:
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    message = make_message(extra_headers="Reply-To: a@sender.example\r\nReply-To: b@sender.example\r\n")
    [value, _] = sign(setup, message, table)
    assert tags(value)["h"].split(":").count("reply-to") == 3
    assert our_results(with_signatures(message, sign(setup, message, table)), setup.resolver) == [
        AuthResult.PASS,
        AuthResult.PASS,
    ]


def test_header_names_are_checked() -> None:
    assert check_header_names(["From", "Subject", "from"], require_from=True) == ("from", "subject")
    assert "list-unsubscribe-post" in DEFAULT_HEADERS and "from" in DEFAULT_HEADERS
    for bad, problem in [
        (["From", "Received"], "must not be signed"),
        (["from", "Authentication-Results"], "must not be signed"),
        (["from", "Sub ject"], "not a header field name"),
        (["subject"], "must include From"),
    ]:
        with pytest.raises(ValueError, match=problem):
            check_header_names(bad, require_from=True)


# --- who signs, and why not -----------------------------------------------------------------------------


def test_no_matching_entry_says_what_was_tried(setup: Setup) -> None:
    table = setup.tables(DUAL_KEYS, "sender.example rsa\n", refile=False)
    plan = plan_signatures(table, "bob@else.example", True)
    assert plan.signers == ()
    assert plan.reason == (
        "no SigningTable entry for bob@else.example (tried keys bob@else.example, else.example, "
        "bob@.example, .example, bob@*, *)"
    )
    assert plan_signatures(None, "bob@sender.example", True).reason.startswith("no signing tables configured")


def test_a_key_named_twice_signs_once(setup: Setup) -> None:
    table = setup.tables(DUAL_KEYS, "*@sender.example rsa\nbob@* rsa\n")
    assert len(plan_signatures(table, "bob@sender.example", True).signers) == 1


@pytest.mark.parametrize(
    ("source", "extra", "mail_from", "expected"),
    [
        ("from", "Sender: Sec <sec@other.example>\r\n", "env@env.example", ("bob@sender.example", "")),
        ("sender", "Sender: Sec <sec@other.example>\r\n", "env@env.example", ("sec@other.example", "")),
        ("sender", "", "env@env.example", ("bob@sender.example", "")),
        ("envelope", "", "env@env.example", ("env@env.example", "")),
        ("envelope", "", "", ("", "null or domainless envelope sender")),
        (
            "sender",
            "Sender: a@x.example\r\nSender: b@y.example\r\n",
            "",
            ("", "Sender: 2 Sender header fields"),
        ),
    ],
)
def test_signing_address(source: str, extra: str, mail_from: str, expected: tuple[str, str]) -> None:
    headers = parse_message(make_message(extra_headers=extra)).headers
    assert signing_address(headers, mail_from, source) == expected


def test_from_problems_are_reasons() -> None:
    headers = parse_message(b"From: a@x.example\r\nFrom: b@y.example\r\n\r\nbody\r\n").headers
    assert signing_address(headers, "", "from") == ("", "From: 2 From header fields")


def test_message_without_from_cannot_be_signed(setup: Setup) -> None:
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    plan = plan_signatures(table, "bob@sender.example", True)
    with pytest.raises(SigningError, match="no From field"):
        sign_message(b"Subject: x\r\n\r\nbody\r\n", plan.signers, setup.key_of, SigningSettings(), NOW)
    with pytest.raises(SigningError, match="not parseable"):
        sign_message(
            b"From: a@sender.example\r\n\x00bad\r\n\r\nb\r\n",
            plan.signers,
            setup.key_of,
            SigningSettings(),
            NOW,
        )


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_body_hash_computed_as_the_body_streams_in_signs_the_same(
    setup: Setup, canonicalization: str
) -> None:
    table = setup.tables(DUAL_KEYS, DUAL_SIGNING)
    message = make_message(body="line \t one  \r\n\r\nline two\r\n \r\n\r\n")
    head, _, body = message.partition(b"\r\n\r\n")
    settings = SigningSettings(canonicalization=canonicalization)
    spec = signing_body_hash(settings)
    assert spec == BodyHashSpec(canonicalization.partition("/")[2], None, "sha256")
    plan = plan_signatures(table, "bob@sender.example", True)
    whole = sign_message(message, plan.signers, setup.key_of, settings, NOW)  # type: ignore[arg-type]
    streamed = sign_message(  # the header block only, as the milter has it
        head + b"\r\n\r\n",
        plan.signers,
        setup.key_of,  # type: ignore[arg-type]
        settings,
        NOW,
        digest_body([spec], body),
    )
    assert streamed == whole
    assert our_results(with_signatures(message, streamed), setup.resolver) == [AuthResult.PASS] * 2

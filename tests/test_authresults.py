"""authresults.py: golden renders, round trips through authres, injection, forged A-R detection."""

from __future__ import annotations

import random
from dataclasses import replace

import authres
import authres.core
import pytest

from authmilter.authresults import (
    _ALREADY_SAFE,
    MAX_INCOMING_FIELDS,
    MAX_INCOMING_LENGTH,
    MAX_PROPERTY_VALUE_LENGTH,
    _property_piece,
    _sanitized,
    find_forged_authentication_results,
    inspect_authentication_results,
    sanitize_authserv_id,
    sanitize_property_value,
)
from authmilter.authresults import render_authentication_results as render_results
from authmilter.checks import Decided
from authmilter.dkim_verify import DkimCheck
from authmilter.dmarc import DmarcCheck
from authmilter.message import headers_from_pairs, parse_message, unfold
from authmilter.model import (
    Action,
    AuthResult,
    Disposition,
    DkimResult,
    DmarcVerdict,
    MethodResult,
    SpfResult,
    SpfScope,
)
from authmilter.spf_check import HeloCheck, MailFromCheck

SPF_PASS = SpfResult(AuthResult.PASS, "sender.example", SpfScope.MFROM, "bob@sender.example")
HELO_NONE = SpfResult(AuthResult.NONE, "mx.sender.example", SpfScope.HELO, "postmaster@mx.sender.example")
DKIM_PASS = DkimResult(AuthResult.PASS, "sender.example", "s1", "rsa-sha256", header_b="abcdEFGH")
DMARC_PASS = DmarcVerdict(AuthResult.PASS, from_domain="sender.example", policy=Disposition.REJECT)


# The action that applies what a DMARC disposition asks (nothing overridden by local policy).
_APPLIED = {
    Disposition.NONE: Action.ACCEPT,
    Disposition.QUARANTINE: Action.QUARANTINE,
    Disposition.REJECT: Action.REJECT,
}


def render_authentication_results(
    authserv_id: str,
    spf: SpfResult | None,
    helo: SpfResult | None,
    dkim: list[DkimResult],
    dmarc: DmarcVerdict | None,
) -> str:
    """The header the pipeline writes when the checks given (not None) ran, DKIM with any of them."""
    decided = Decided(_APPLIED[dmarc.disposition] if dmarc else Action.ACCEPT)
    found: list[MethodResult] = []
    if spf is not None:
        found.extend(MailFromCheck().method_results(spf, decided))
    if helo is not None:
        found.extend(HeloCheck().method_results(helo, decided))
    if dkim or found or dmarc is not None:
        found.extend(DkimCheck().method_results(tuple(dkim), decided))
    if dmarc is not None:
        found.extend(DmarcCheck().method_results(dmarc, decided))
    return render_results(authserv_id, found)


def parse(value: str) -> authres.AuthenticationResultsHeader:
    return authres.all_features().parse_value(unfold(value))


def results(value: str) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    return [
        (r.method, r.result, [(p.type, p.name, str(p.value)) for p in r.properties])
        for r in parse(value).results
    ]


def mail_from(identity: str) -> SpfResult:
    return SpfResult(AuthResult.PASS, "sender.example", SpfScope.MFROM, identity)


# --- golden renders ---------------------------------------------------------------------------


def test_golden_typical_pass() -> None:
    value = render_authentication_results("mx.example", SPF_PASS, HELO_NONE, [DKIM_PASS], DMARC_PASS)
    assert value == (
        "mx.example;\n"
        "\tspf=pass smtp.mailfrom=bob@sender.example;\n"
        "\tspf=none smtp.helo=mx.sender.example;\n"
        "\tdkim=pass header.d=sender.example header.s=s1 header.a=rsa-sha256\n"
        "\theader.b=abcdEFGH;\n"
        "\tdmarc=pass (p=reject dis=none) header.from=sender.example"
    )


def test_golden_failures_with_reasons_and_testing() -> None:
    dkim = [
        DkimResult(
            AuthResult.FAIL,
            "sender.example",
            "s1",
            "rsa-sha256",
            reason="body hash mismatch",
            header_b="abcd/EF+",
        ),
        DkimResult(
            AuthResult.PERMERROR,
            "other.example",
            "k",
            "ed25519-sha256",
            reason="no key",
            testing=True,
            identity="@other.example",
        ),
    ]
    dmarc = DmarcVerdict(
        AuthResult.FAIL,
        from_domain="sender.example",
        policy=Disposition.QUARANTINE,
        disposition=Disposition.QUARANTINE,
    )
    spf = SpfResult(AuthResult.SOFTFAIL, "sender.example", SpfScope.MFROM, "bob@sender.example")
    value = render_authentication_results("mx.example", spf, None, dkim, dmarc)
    assert value == (
        "mx.example;\n"
        "\tspf=softfail smtp.mailfrom=bob@sender.example;\n"
        "\tdkim=fail (body hash mismatch) header.d=sender.example header.s=s1\n"
        '\theader.a=rsa-sha256 header.b="abcd/EF+";\n'
        "\tdkim=permerror (no key, test mode) header.d=other.example\n"
        "\theader.i=@other.example header.s=k header.a=ed25519-sha256;\n"
        "\tdmarc=fail (p=quarantine dis=quarantine) header.from=sender.example"
    )


def test_nothing_evaluated_is_none() -> None:
    assert render_authentication_results("MX.Example.", None, None, [], None) == "mx.example; none"


def test_no_signature_is_dkim_none() -> None:
    value = render_authentication_results("mx.example", SPF_PASS, None, [], None)
    assert value == "mx.example;\n\tspf=pass smtp.mailfrom=bob@sender.example;\n\tdkim=none"


def test_dmarc_without_policy_has_no_comment_and_empty_values_are_left_out() -> None:
    value = render_authentication_results("mx.example", None, None, [], DmarcVerdict(AuthResult.NONE))
    assert value == "mx.example;\n\tdkim=none;\n\tdmarc=none"


def test_spf_falls_back_to_domain_without_identity() -> None:
    spf = SpfResult(AuthResult.FAIL, "sender.example", SpfScope.MFROM)
    assert "spf=fail smtp.mailfrom=sender.example" in render_authentication_results(
        "mx.example", spf, None, [], None
    )


def test_lines_are_folded_within_78_characters() -> None:
    dkim = [
        DkimResult(AuthResult.PASS, f"d{i}.example", "selector" * 3, "rsa-sha256", header_b="x" * 12)
        for i in range(5)
    ]
    value = render_authentication_results("mx.example", SPF_PASS, HELO_NONE, dkim, DMARC_PASS)
    lines = ("Authentication-Results: " + value).split("\n")
    assert len(lines) > 8
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith("\t") for line in lines[1:])
    assert "\r" not in value  # the milter adds CR itself


def test_signatures_that_differ_only_in_header_b_each_get_their_own() -> None:
    # header.b is rendered per message, the rest of the clause is kept: b must never be reused,
    # and it still counts when folding (with the ";" of a clause that is not the last).
    signature = DkimResult(AuthResult.PASS, "a.example", "s", "rsa-sha256", header_b="abcdEFGH")
    last = "\tdkim=pass header.d=a.example header.s=s header.a=rsa-sha256 header.b=abcdEFGH"
    head = "mx.example;\n\tdkim=pass header.d=a.example header.s=s header.a=rsa-sha256"
    for header_b, first in [
        ("abcdEFGH", "\n\theader.b=abcdEFGH;"),
        ("zy/x+VUT", '\n\theader.b="zy/x+VUT";'),
        ("", ";"),
    ]:
        other = replace(signature, header_b=header_b)
        value = render_authentication_results("mx.example", None, None, [other, signature], None)
        assert value == f"{head}{first}\n{last}"


# --- round trip through authres ---------------------------------------------------------------


def test_round_trip_properties() -> None:
    dkim = [DKIM_PASS, DkimResult(AuthResult.FAIL, "b.example", "s2", "ed25519-sha256", header_b="ab/+=cd")]
    value = render_authentication_results("mx.example", SPF_PASS, HELO_NONE, dkim, DMARC_PASS)
    header = parse(value)
    assert header.authserv_id == "mx.example"
    assert results(value) == [
        ("spf", "pass", [("smtp", "mailfrom", "bob@sender.example")]),
        ("spf", "none", [("smtp", "helo", "mx.sender.example")]),
        (
            "dkim",
            "pass",
            [
                ("header", "d", "sender.example"),
                ("header", "s", "s1"),
                ("header", "a", "rsa-sha256"),
                ("header", "b", "abcdEFGH"),
            ],
        ),
        (
            "dkim",
            "fail",
            [
                ("header", "d", "b.example"),
                ("header", "s", "s2"),
                ("header", "a", "ed25519-sha256"),
                ("header", "b", "ab/+=cd"),
            ],
        ),
        ("dmarc", "pass", [("header", "from", "sender.example")]),
    ]


def test_round_trip_folded_value_without_unfolding() -> None:
    value = render_authentication_results("mx.example", SPF_PASS, None, [DKIM_PASS], DMARC_PASS)
    assert len(authres.all_features().parse_value(value).results) == 3


@pytest.mark.parametrize("result", list(AuthResult))
def test_round_trip_every_result_word(result: AuthResult) -> None:
    dkim = DkimResult(result, "sender.example", "s1", "rsa-sha256")
    assert (
        results(render_authentication_results("mx.example", None, None, [dkim], None))[0][1] == result.value
    )


# --- injection ---------------------------------------------------------------------------------

HOSTILE = [
    "bob@sender.example; dkim=pass header.d=bank.example",
    "bob@sender.example\r\nAuthentication-Results: mx.example; dmarc=pass",
    "bob@sender.example\n\tdmarc=pass",
    "bob@sender.example (comment; dkim=pass)",
    'bob@sender.example" ; dkim=pass "',
    '"bob; dkim=pass"@sender.example',
    'bob\\"@sender.example',
    "bób@séndér.example",
    "\udcff\udcfe@sender.example",
    "a@b@c; spf=pass",
    "x" * 10_000 + "; dkim=pass",
    "; dkim=pass",
    "=?utf-8?q?a?=@x.example",
]


@pytest.mark.parametrize("identity", HOSTILE)
def test_hostile_mail_from_stays_in_one_property(identity: str) -> None:
    value = render_authentication_results("mx.example", mail_from(identity), None, [DKIM_PASS], None)
    parsed = results(value)
    assert [(method, result) for method, result, _ in parsed] == [("spf", "pass"), ("dkim", "pass")]
    spf_props = parsed[0][2]
    assert len(spf_props) <= 1
    assert value.count(";") == 2  # after the authserv-id and after the spf resinfo, nothing else
    assert "\r" not in value
    assert all(line.startswith("\t") for line in value.split("\n")[1:])  # only our own folds
    assert value.isascii()


@pytest.mark.parametrize("identity", HOSTILE)
def test_sanitized_values_are_safe(identity: str) -> None:
    clean = sanitize_property_value(identity)
    assert clean.isascii()
    assert not set(clean) & set(' \t\r\n;()"\\<>,:[]')
    assert clean.count("@") <= 1
    assert len(clean) <= MAX_PROPERTY_VALUE_LENGTH


def test_sanitize_examples() -> None:
    assert sanitize_property_value("bob@sender.example") == "bob@sender.example"
    assert sanitize_property_value("bob@Bücher.example") == "bob@xn--bcher-kva.example"
    assert sanitize_property_value("mx.bücher.example") == "mx.xn--bcher-kva.example"
    assert sanitize_property_value("a; b") == "ab"
    assert sanitize_property_value("a@b@c") == "ab@c"
    assert sanitize_property_value("@") == ""
    assert sanitize_property_value("") == ""
    assert sanitize_property_value("ab/c+d=") == "ab/c+d="


def test_sanitized_address_keeps_a_valid_domain() -> None:
    assert sanitize_property_value("x/@/=/../") == "x/"  # no domain left: no "@" either
    assert sanitize_property_value("a..b.@.x..example.") == "a.b@x.example"
    assert sanitize_property_value("a@" + "d" * 300) == "@" + "d" * (MAX_PROPERTY_VALUE_LENGTH - 1)
    long_local = sanitize_property_value("l" * 300 + "@x.example")
    assert long_local.endswith("@x.example") and len(long_local) == MAX_PROPERTY_VALUE_LENGTH


def test_random_hostile_values_always_render_parseable() -> None:
    # Seeded fuzzing: whatever a value holds, the field parses back to exactly our four resinfos.
    rng = random.Random(8601)
    alphabet = [
        "a",
        "@",
        ";",
        " ",
        "\r",
        "\n",
        "(",
        ")",
        '"',
        "\\",
        "é",
        "\udcff",
        ".",
        "=",
        "/",
        "ü.example",
    ]
    for _ in range(500):
        v = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        value = render_authentication_results(
            "mx.example",
            SpfResult(AuthResult.PASS, v, SpfScope.MFROM, v),
            SpfResult(AuthResult.NONE, v, SpfScope.HELO),
            [DkimResult(AuthResult.FAIL, v, v, v, reason=v, header_b=v, identity=v)],
            DmarcVerdict(AuthResult.FAIL, from_domain=v, policy=Disposition.NONE),
        )
        assert [(m, r) for m, r, _ in results(value)] == [
            ("spf", "pass"),
            ("spf", "none"),
            ("dkim", "fail"),
            ("dmarc", "fail"),
        ], value
        assert value.isascii() and "\r" not in value


def test_hostile_dkim_fields_and_reason() -> None:
    dkim = DkimResult(
        AuthResult.FAIL,
        "evil.example; dmarc=pass",
        "s1) dkim=pass (",
        "rsa-sha256\r\nX-Injected: yes",
        reason='bad) ; dmarc=pass (x\r\n"',
        header_b='ab"; dkim=pass',
        identity="@evil.example (x)",
    )
    value = render_authentication_results("mx.example", None, None, [dkim], None)
    assert [(m, r) for m, r, _ in results(value)] == [("dkim", "fail")]
    assert value.count("(") == value.count(")") == 1
    assert "\r" not in value and value.count(";") == 1
    assert "X-Injected:" not in value


def test_hostile_dmarc_from_domain() -> None:
    dmarc = DmarcVerdict(AuthResult.FAIL, from_domain="x.example; dmarc=pass", policy=Disposition.REJECT)
    parsed = results(render_authentication_results("mx.example", None, None, [], dmarc))
    assert [(m, r) for m, r, _ in parsed] == [("dkim", "none"), ("dmarc", "fail")]


def test_sanitize_authserv_id() -> None:
    assert sanitize_authserv_id(" MX.Example.COM. ") == "mx.example.com"
    assert sanitize_authserv_id("mx.bücher.example") == "mx.xn--bcher-kva.example"
    for bad in [
        "",
        "mx.example; spf=pass",
        "mx example",
        "mx..example",
        "-mx.example",
        "a" * 64 + ".example",
    ]:
        with pytest.raises(ValueError):
            sanitize_authserv_id(bad)


# --- forged incoming headers -----------------------------------------------------------------


def ar_headers(*values: str) -> list[tuple[str, str]]:
    return [("Received", "from x"), *(("Authentication-Results", value) for value in values)]


def test_forged_ours_deleted_foreign_kept_in_reverse_order() -> None:
    headers = headers_from_pairs(
        [
            ("Authentication-Results", "mx.example; spf=pass smtp.mailfrom=a@b.example"),  # 1 ours
            ("Subject", "x"),
            ("Authentication-Results", "other.example; dkim=pass header.d=b.example"),  # 2 foreign
            ("authentication-results", "MX.EXAMPLE; dmarc=pass header.from=b.example"),  # 3 ours
            ("Authentication-Results", "this is ; not = valid ((("),  # 4 unparseable
            ("Authentication-Results", "other.example; none"),  # 5 foreign
        ]
    )
    assert find_forged_authentication_results(headers, "mx.example") == (4, 3, 1)
    assert [
        (e.index, e.authserv_id, e.forged) for e in inspect_authentication_results(headers, "MX.example")
    ] == [
        (1, "mx.example", True),
        (2, "other.example", False),
        (3, "mx.example", True),
        (4, "", True),
        (5, "other.example", False),
    ]


@pytest.mark.parametrize(
    "value",
    [
        "mx.example; none",
        "Mx.Example; spf=pass smtp.mailfrom=a@b.example",
        "mx.example 1; dkim=pass header.d=b.example",  # RFC 8601 §2.2 version
        "(comment) mx.example; dkim=pass",
        "mx.example (a comment);\n\tdkim=pass\n\theader.d=b.example",
        "\n\tmx.example;\r\n spf=pass smtp.mailfrom=a@b.example",
        "mx.example.; none",
        "mx.example 2; none",  # unknown version: authres refuses it, so it is unparseable
        "",
        ";",
        "; spf=pass",
        "mx.example",  # no resinfo at all
        "spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=b.example; dkim=none",  # no authserv-id
        "(" * 5000,
        "mx.example; dkim=pass header.d=" + "x" * MAX_INCOMING_LENGTH,
    ],
)
def test_forged_or_unparseable_values(value: str) -> None:
    headers = headers_from_pairs(ar_headers(value))
    assert find_forged_authentication_results(headers, "mx.example") == (1,)


@pytest.mark.parametrize(
    "value",
    [
        "other.example; none",
        "mx.example.other.example; spf=pass smtp.mailfrom=a@b.example",
        "other.example 1; dkim=pass header.d=mx.example",
        "(mx.example) other.example; dmarc=pass header.from=mx.example",
        "other.example;\n\tspf=pass smtp.mailfrom=a@mx.example;\n\tdkim=none",
        'mx.google.example; dkim=pass header.i=@b.example header.s=s header.b="abc/de+f"; '
        "spf=pass (mx.google.example: domain of a@b.example designates 192.0.2.1 as permitted sender) "
        "smtp.mailfrom=a@b.example; dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=b.example",
    ],
)
def test_foreign_values_kept(value: str) -> None:
    headers = headers_from_pairs(ar_headers(value))
    assert find_forged_authentication_results(headers, "mx.example") == ()


def test_our_own_rendering_is_recognised_as_ours() -> None:
    value = render_authentication_results("mx.example", SPF_PASS, HELO_NONE, [DKIM_PASS], DMARC_PASS)
    message = parse_message(f"Authentication-Results: {value}\r\n\r\n".replace("\n\t", "\r\n\t").encode())
    assert find_forged_authentication_results(message.headers, "mx.example") == (1,)
    assert find_forged_authentication_results(message.headers, "other.example") == ()


def test_too_many_fields_past_the_limit_count_as_forged() -> None:
    values = ["other.example; none"] * (MAX_INCOMING_FIELDS + 3)
    headers = headers_from_pairs(ar_headers(*values))
    forged = find_forged_authentication_results(headers, "mx.example")
    assert forged == tuple(range(MAX_INCOMING_FIELDS + 3, MAX_INCOMING_FIELDS, -1))


def test_forged_field_hidden_behind_junk_is_found() -> None:
    raw = (
        b"Authentication-Results: other.example; none\r\n"
        + b"X-Junk: v\r\n" * 2000
        + b"Authentication-Results: mx.example; dmarc=pass header.from=bank.example\r\n\r\n"
    )
    headers = parse_message(raw).headers
    assert headers.truncated
    assert find_forged_authentication_results(headers, "mx.example") == (2,)


def test_no_authentication_results() -> None:
    assert find_forged_authentication_results(headers_from_pairs([("Subject", "x")]), "mx.example") == ()


def _generated_values(rng: random.Random, count: int) -> list[str]:
    """Values around what the sanitizer keeps as it is: dots, "@", safe and unsafe characters."""
    pieces = [*"aaaaaaaaZ9..-_", "@", "/", "=", "+", "!", "~", " ", ";", '"', "é", "ü"]
    def part() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))

    values = [part() + rng.choice(["", "@"]) + part() for _ in range(count)]
    values += ["news@s1.bench.example", "s1.bench.example", "rsa-sha256", "a" * 256, "a" * 257]
    values += ["l" * 200 + "@" + "d" * 55, "l" * 200 + "@" + "d" * 56, "x.@y", "@x", "x@", ".x@y"]
    return values


def test_values_already_safe_are_kept_as_the_full_sanitizer_keeps_them() -> None:
    values = _generated_values(random.Random(2045), 20000)
    kept = [value for value in values if _ALREADY_SAFE.fullmatch(value)]
    assert len(kept) > 1000 and sum("@" in value for value in kept) > 300, "both forms are tried"
    for value in values:
        assert sanitize_property_value(value) == _sanitized(value), repr(value)


def test_property_pieces_are_what_authres_writes() -> None:
    for raw in _generated_values(random.Random(8601), 5000):
        value = sanitize_property_value(raw)
        expected = str(authres.core.AuthenticationResultProperty("smtp", "mailfrom", value)) if value else ""
        assert _property_piece("smtp", "mailfrom", raw) == expected, repr(raw)

"""Hostile RFC5322.From values: the author domain DMARC evaluates, or an error (RFC 9989 §4.4).

Each row is (From field values as the MTA would pass them, expected domains, expected error
substring). A DMARC bypass is a row where we would report a domain other than the one a mail
reader shows, or any domain at all where a reader could disagree.
"""

from __future__ import annotations

import random

import pytest

from authmilter.message import (
    MAX_FROM_MAILBOXES,
    FromAuthors,
    MessageHeaders,
    headers_from_pairs,
    parse_from,
    parse_message,
)


def authors(*values: str | bytes) -> FromAuthors:
    return parse_from(headers_from_pairs([("Subject", "x"), *(("From", value) for value in values)]))


OK = ""

CASES: list[tuple[str, tuple[str | bytes, ...], tuple[str, ...], str]] = [
    # --- baseline
    ("plain addr-spec", ("alice@good.example",), ("good.example",), OK),
    ("name-addr", ("Alice <alice@good.example>",), ("good.example",), OK),
    ("case and trailing dot", ("<Alice@Good.EXAMPLE.>",), ("good.example",), OK),
    # --- the classic bypasses
    ("two From fields", ("alice@good.example", "evil@x.example"), (), "2 From header fields"),
    ("two identical From fields", ("a@good.example", "a@good.example"), (), "2 From header fields"),
    ("unquoted address as display name", ("evil@x.example <alice@good.example>",), (), "unexpected '<'"),
    ("quoted address as display name", ('"evil@x.example" <alice@good.example>',), ("good.example",), OK),
    ("quoted comma and brackets", ('"Alice, <evil@x.example>" <alice@good.example>',), ("good.example",), OK),
    ("angle brackets inside quotes only", ('"<evil@x.example>" alice@good.example',), (), "unexpected atom"),
    ("comment holding an address", ("alice@good.example (evil@x.example)",), ("good.example",), OK),
    ("comment before the address", ("(evil@x.example) alice@good.example",), ("good.example",), OK),
    ("nested comments, @, )", ("(a (b@x.example \\) c) d) <alice@good.example>",), ("good.example",), OK),
    ("comment inside the domain", ("alice@(evil.example)good.example",), ("good.example",), OK),
    ("quoted local part with @", ('"a@b.example"@c.example',), ("c.example",), OK),
    ("quoted local part with brackets", ('"<evil@x.example>"@good.example',), ("good.example",), OK),
    ("encoded word with address (q)", ("=?utf-8?q?evil@x.example?= <alice@good.example>",), (), "label"),
    (
        "encoded word hiding an address (b)",
        ("=?utf-8?b?ZXZpbEB4LmV4YW1wbGU=?= <alice@good.example>",),
        ("good.example",),
        OK,
    ),
    ("encoded word as the domain", ("alice@=?utf-8?q?good.example?=",), (), "invalid domain label"),
    ("two addresses, no comma", ("alice@good.example evil@x.example",), (), "unexpected"),
    ("two angle addresses", ("A <a@good.example> <evil@x.example>",), (), "unexpected '<'"),
    ("two mailboxes", ("a@good.example, b@other.example",), ("good.example", "other.example"), OK),
    ("two mailboxes, same domain", ("a@good.example, B@GOOD.example",), ("good.example",), OK),
    # --- unbalanced and malformed
    ("unbalanced quote", ('"Alice <alice@good.example>',), (), "unbalanced quotes"),
    ("unbalanced comment", ("(evil <alice@good.example>",), (), "unbalanced parentheses"),
    ("stray closing parenthesis", ("evil) <alice@good.example>",), (), "unbalanced parentheses"),
    ("missing >", ("Alice <alice@good.example",), (), "unbalanced angle brackets"),
    ("missing <", ("Alice alice@good.example>",), (), "unexpected"),
    ("empty angle address", ("Alice <>",), (), "empty angle address"),
    ("address without a domain", ("alice",), (), "address without a domain"),
    ("angle address without a domain", ("Alice <alice>",), (), "address without a domain"),
    ("empty domain", ("alice@",), (), "expected a domain"),
    ("domain literal", ("alice@[192.0.2.1]",), (), "domain literal"),
    ("unterminated domain literal", ("alice@[192.0.2.1",), (), "unbalanced brackets"),
    ("double dot in domain", ("alice@good..example",), (), "unexpected '.'"),
    ("invalid domain character", ("alice@good!.example",), (), "invalid domain label"),
    ("empty From", ("",), (), "no mailbox"),
    ("whitespace-only From", (" \t ",), (), "no mailbox"),
    ("comment-only From", ("(nobody)",), (), "no mailbox"),
    # --- groups (RFC 6854 allows them in From)
    ("empty group", ("undisclosed-recipients:;",), (), "no mailbox"),
    ("group members", ("Team: a@good.example, b@other.example ;",), ("good.example", "other.example"), OK),
    ("group not closed", ("Team: a@good.example",), (), "closing ';'"),
    ("nested group", ("Outer: Inner: a@good.example;;",), (), "address without a domain"),
    # --- obsolete syntax (RFC 5322 §4.4)
    ("obsolete route", ("Alice <@relay.example,@evil.example:alice@good.example>",), ("good.example",), OK),
    ("empty list elements", (", alice@good.example ,",), ("good.example",), OK),
    ("spaces around the @", ("alice @ good . example",), ("good.example",), OK),
    # --- folding, whitespace and bytes
    ("folded between name and address", ("Alice\r\n <alice@good.example>",), ("good.example",), OK),
    ("folded with bare LF from the milter", ("Alice\n\t<alice@good.example>",), ("good.example",), OK),
    ("bare CR inside", ("Alice\r<alice@good.example>",), (), "invalid character"),
    ("NUL in the display name", ("Ali\x00ce <alice@good.example>",), (), "invalid character"),
    ("NUL in a quoted string", ('"Ali\x00ce" <alice@good.example>',), (), "invalid character"),
    ("NUL in the domain", ("alice@good.example\x00.evil.example",), (), "invalid character"),
    ("control character", ("alice@good.example\x01",), (), "invalid character"),
    ("8-bit latin-1 display name", (b"J\xf6rg <jorg@good.example>",), ("good.example",), OK),
    ("UTF-8 display name", ("Jörg <jorg@good.example>".encode(),), ("good.example",), OK),
    ("8-bit garbage in domain", (b"a@g\xf6od.example",), (), "internationalised"),
    # --- IDN
    ("U-label domain", ("a@Bücher.example".encode(),), ("xn--bcher-kva.example",), OK),
    ("A-label domain", ("a@XN--BCHER-KVA.example",), ("xn--bcher-kva.example",), OK),
    ("IDNA 2003/2008 deviation", ("a@faß.example".encode(),), (), "ambiguous"),
    # --- size
    ("very long display name", ('"' + "A" * 8000 + '" <a@good.example>',), ("good.example",), OK),
    ("too long", ("A" * 9000 + " <a@good.example>",), (), "too long"),
    ("very long label", ("a@" + "b" * 64 + ".example",), (), "invalid domain label"),
    ("deep comment nesting", ("(" * 3000 + ")" * 3000 + " a@good.example",), ("good.example",), OK),
    (
        "too many mailboxes",
        (", ".join(f"a@d{i}.example" for i in range(MAX_FROM_MAILBOXES + 1)),),
        (),
        "too many mailboxes",
    ),
]


@pytest.mark.parametrize(("values", "domains", "error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_from(values: tuple[str | bytes, ...], domains: tuple[str, ...], error: str) -> None:
    result = authors(*values)
    if error:
        assert error in result.error
        assert result.domains == () and result.addresses == ()
    else:
        assert result.error == ""
        assert result.domains == domains


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


def test_addresses_are_kept_as_written() -> None:
    result = authors('"a b"@Good.Example, Alice <x.y@other.example.>')
    assert result.addresses == ('"a b"@Good.Example', "x.y@other.example.")
    assert result.domains == ("good.example", "other.example")


def test_no_from_field() -> None:
    assert parse_from(headers_from_pairs([("Sender", "a@good.example")])).error == "no From header field"


def test_from_name_is_case_insensitive() -> None:
    headers = headers_from_pairs([("FROM", "a@good.example"), ("from", "b@evil.example")])
    assert parse_from(headers).error == "2 From header fields"


def test_from_hidden_past_the_header_limit_is_still_seen() -> None:
    raw = b"From: a@good.example\r\n" + b"X: y\r\n" * 5 + b"From: evil@x.example\r\n\r\n"
    message = parse_message(raw, max_headers=3)
    assert message.headers.truncated
    assert parse_from(message.headers).error == "2 From header fields"


def test_from_fields_beyond_twice_the_limit_cannot_be_trusted() -> None:
    pairs = [("From", "a@good.example")] * 3 + [("X", "y")] * 3 + [("From", "evil@x.example")] * 4
    headers = headers_from_pairs(pairs, max_headers=3)
    assert headers.key_fields_dropped
    assert "too many header fields" in parse_from(headers).error


def test_from_parsed_from_a_message_file() -> None:
    raw = b'From: "Evil, <evil@x.example>"\n  <alice@good.example>\nTo: b@c.example\n\nbody\n'
    assert parse_from(parse_message(raw).headers) == FromAuthors(
        addresses=("alice@good.example",), domains=("good.example",)
    )


def test_direct_headers_object() -> None:
    headers = MessageHeaders(fields=())
    assert parse_from(headers).error == "no From header field"


def test_random_from_values_never_raise() -> None:
    # Seeded fuzzing over the characters that structure an address: parse_from must always
    # answer, and any domain it gives must be a clean lower-case A-label name.
    rng = random.Random(5322)
    alphabet = [
        '"',
        "(",
        ")",
        "<",
        ">",
        "@",
        ",",
        ";",
        ":",
        ".",
        "[",
        "]",
        "\\",
        " ",
        "\r\n ",
        "\n",
        "\x00",
        "a",
        "B",
        "x.example",
        "=?",
        "?=",
        "ü",
        "ß",
        "\xff",
    ]
    for _ in range(3000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        result = authors(value.encode("utf-8", "surrogateescape"))
        assert bool(result.error) != bool(result.domains)
        for domain in result.domains:
            assert domain == domain.lower() and domain.isascii() and not domain.endswith(".")
            assert all(label for label in domain.split("."))

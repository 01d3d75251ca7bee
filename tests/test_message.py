"""message.py: splitting header and body, indices, limits, milter pairs and reassembly."""

from __future__ import annotations

import pytest

from authmilter.message import (
    MAX_HEADERS,
    HeaderCollector,
    HeaderField,
    MessageHeaders,
    assemble_message,
    headers_from_pairs,
    parse_message,
    unfold,
)


def test_simple_message() -> None:
    raw = b"From: a@b.example\r\nSubject: hi\r\n\r\nbody\r\n"
    message = parse_message(raw)
    assert [(f.name, f.value, f.index) for f in message.headers.fields] == [
        ("From", " a@b.example", 1),
        ("Subject", " hi", 1),
    ]
    assert message.has_separator
    assert message.raw is raw  # already CRLF: not copied
    assert message.body == b"body\r\n"
    assert message.raw[: message.body_offset].endswith(b"\r\n\r\n")


def test_bare_lf_is_normalised() -> None:
    message = parse_message(b"From: a@b.example\nSubject: hi\n\nline 1\nline 2\r\n")
    assert message.raw == b"From: a@b.example\r\nSubject: hi\r\n\r\nline 1\r\nline 2\r\n"
    assert message.body == b"line 1\r\nline 2\r\n"
    assert message.headers.get_all("subject")[0].value == " hi"


def test_no_separator_means_all_headers() -> None:
    message = parse_message(b"From: a@b.example\r\nSubject: hi\r\n")
    assert not message.has_separator
    assert message.body == b""
    assert message.body_offset == len(message.raw)
    assert len(message.headers.fields) == 2


def test_no_final_newline() -> None:
    message = parse_message(b"From: a@b.example\r\nSubject: hi")
    assert message.headers.get_all("Subject")[0].value == " hi"
    assert message.body == b""


def test_empty_message() -> None:
    message = parse_message(b"")
    assert message.headers.fields == () and message.body == b"" and not message.has_separator


def test_body_only_message() -> None:
    message = parse_message(b"\r\nbody\r\n")
    assert message.headers.fields == ()
    assert message.has_separator and message.body == b"body\r\n"


def test_non_header_line_starts_the_body() -> None:
    # Postfix: the first line that is neither a field nor a continuation begins the body.
    raw = b"From: a@b.example\r\nthis is not a header\r\nSubject: hidden\r\n\r\nrest\r\n"
    message = parse_message(raw)
    assert [f.name for f in message.headers.fields] == ["From"]
    assert not message.has_separator
    assert message.body.startswith(b"this is not a header\r\nSubject: hidden")


def test_leading_continuation_line_starts_the_body() -> None:
    message = parse_message(b" folded: nothing\r\nFrom: a@b.example\r\n\r\n")
    assert message.headers.fields == ()
    assert message.body_offset == 0


def test_invalid_field_name_starts_the_body() -> None:
    message = parse_message(b"From: a@b.example\r\nBad Name: x\r\n\r\n")
    assert [f.name for f in message.headers.fields] == ["From"]
    assert message.body.startswith(b"Bad Name")


def test_folding_is_kept_and_unfolds() -> None:
    message = parse_message(b"Subject: one\r\n two\r\n\tthree\r\nTo: x\r\n\r\n")
    value = message.headers.get_all("Subject")[0].value
    assert value == " one\r\n two\r\n\tthree"
    assert unfold(value) == " one two\tthree"


def test_whitespace_before_colon_and_empty_value() -> None:
    message = parse_message(b"Subject : x\r\nX-Empty:\r\n\r\n")
    assert [(f.name, f.value) for f in message.headers.fields] == [("Subject", " x"), ("X-Empty", "")]


def test_8bit_header_bytes_survive() -> None:
    raw = b"Subject: J\xf6rg \xff\x00\x80\r\n\r\n"
    message = parse_message(raw)
    value = message.headers.get_all("Subject")[0].value
    assert value.encode("latin-1") == b" J\xf6rg \xff\x00\x80"
    assert assemble_message(message.headers, message.body) == raw


def test_indices_per_name_case_insensitive() -> None:
    raw = b"Received: 1\r\nX-A: a\r\nreceived: 2\r\nRECEIVED: 3\r\nx-a: b\r\n\r\n"
    fields = parse_message(raw).headers.fields
    assert [(f.name, f.index) for f in fields] == [
        ("Received", 1),
        ("X-A", 1),
        ("received", 2),
        ("RECEIVED", 3),
        ("x-a", 2),
    ]
    headers = parse_message(raw).headers
    assert [f.value for f in headers.get_all("RECEIVED")] == [" 1", " 2", " 3"]
    assert headers.get_all("Missing") == ()


def test_named_fields_keep_message_order_across_names() -> None:
    raw = b"Received: 1\r\nX-A: a\r\nreceived: 2\r\nFrom: f\r\nx-a: b\r\n\r\n"
    headers = parse_message(raw).headers
    assert [f.value for f in headers.named({"x-a", "received"})] == [" 1", " a", " 2", " b"]
    assert headers.named({"missing"}) == ()
    assert headers.get_all("from") == headers.named({"from"})


def test_ten_thousand_headers_are_truncated() -> None:
    raw = b"".join(b"X-Junk-%d: v\r\n" % i for i in range(10_000)) + b"\r\nbody"
    message = parse_message(raw)
    assert message.headers.truncated
    assert len(message.headers.fields) == MAX_HEADERS
    assert message.headers.fields[-1].name == f"X-Junk-{MAX_HEADERS - 1}"
    assert message.body == b"body"  # the body is still found past the limit


def test_ten_thousand_same_name_headers() -> None:
    raw = b"Received: x\r\n" * 10_000 + b"\r\n"
    headers = parse_message(raw, max_headers=50).headers
    assert headers.truncated
    assert [f.index for f in headers.fields] == list(range(1, 51))


def test_from_and_authentication_results_are_kept_past_the_limit() -> None:
    raw = (
        b"Authentication-Results: a; none\r\n"
        + b"X-Junk: v\r\n" * 10
        + b"authentication-results: b; none\r\nFrom: a@b.example\r\nX-Late: v\r\n\r\n"
    )
    headers = parse_message(raw, max_headers=5).headers
    assert headers.truncated and not headers.key_fields_dropped
    assert [(f.name, f.index) for f in headers.fields] == [
        ("Authentication-Results", 1),
        ("X-Junk", 1),
        ("X-Junk", 2),
        ("X-Junk", 3),
        ("X-Junk", 4),
        ("authentication-results", 2),
        ("From", 1),
    ]
    assert headers.get_all("From")[0].value == " a@b.example"


def test_key_fields_are_bounded_too() -> None:
    pairs = [("Authentication-Results", "x; none")] * 25
    headers = headers_from_pairs(pairs, max_headers=10)
    assert len(headers.fields) == 20
    assert headers.truncated and headers.key_fields_dropped
    assert [f.index for f in headers.fields] == list(range(1, 21))


def test_header_collector_fed_like_a_milter_matches_the_parsed_file() -> None:
    """The milter adapter's path (one callback at a time) and the file's path keep the same fields."""
    raw = (
        b"Authentication-Results: a; none\r\n"
        + b"".join(b"X-Junk-%d: v\r\n" % i for i in range(10))
        + b"From: a@b.example\r\n"
        + b"Subject: folded\r\n more\r\n"
        + b"Authentication-Results: x; none\r\n" * 5
        + b"\r\n"
    )
    collector = HeaderCollector(max_headers=5)
    for field in parse_message(raw).headers.fields:  # as the MTA passes them: one space eaten, LF folds
        collector.add(field.name + " ", field.value[1:].replace("\r\n", "\n").encode("latin-1"))
    headers = collector.result()
    assert headers == parse_message(raw, max_headers=5).headers
    assert headers.truncated and headers.key_fields_dropped  # room for four of the last five A-R
    assert [f.index for f in headers.get_all("authentication-results")] == [1, 2, 3, 4, 5]
    assert [f.name for f in headers.fields[4:6]] == ["X-Junk-3", "From"]


def test_exactly_the_limit_is_not_truncated() -> None:
    raw = b"X: 1\r\n" * 5 + b"\r\n"
    assert not parse_message(raw, max_headers=5).headers.truncated
    assert parse_message(raw, max_headers=4).headers.truncated


def test_fifty_megabyte_body() -> None:
    head = b"From: a@b.example\r\nSubject: big\r\n\r\n"
    raw = head + b"x" * 78 + b"\r\n" + b"y" * (50 * 1024 * 1024)
    message = parse_message(raw)
    assert message.raw is raw
    assert message.body_offset == len(head)
    assert len(message.raw) - message.body_offset == 80 + 50 * 1024 * 1024


def test_large_bare_lf_body_is_normalised_once() -> None:
    raw = b"Subject: big\n\n" + b"line\n" * 1_000_000
    message = parse_message(raw)
    assert message.body_offset == len(b"Subject: big\r\n\r\n")
    assert len(message.raw) == len(raw) + 1_000_002
    assert b"\r\r" not in message.raw


def test_headers_from_pairs_restores_the_eaten_space_and_crlf() -> None:
    headers = headers_from_pairs([("From", "a@b.example"), ("Subject", "one\n two"), ("subject", "x")])
    assert [(f.name, f.value, f.index) for f in headers.fields] == [
        ("From", " a@b.example", 1),
        ("Subject", " one\r\n two", 1),
        ("subject", " x", 2),
    ]


def test_continuation_lines_become_crlf_whether_sent_with_lf_or_crlf() -> None:
    headers = headers_from_pairs(
        [("X-LF", "a\n b\n\tc"), ("X-CRLF", "a\r\n b"), ("X-Mixed", "a\r\n b\n c\r\n\td")]
    )
    assert [f.value for f in headers.fields] == [" a\r\n b\r\n\tc", " a\r\n b", " a\r\n b\r\n c\r\n\td"]


def test_headers_from_pairs_with_leading_space_negotiated() -> None:
    headers = headers_from_pairs([("Subject", "  two spaces")], leading_space_included=True)
    assert headers.fields[0].value == "  two spaces"


def test_headers_from_pairs_decodes_pymilter_strings_to_wire_bytes() -> None:
    wire = b"J\xc3\xb6rg \xff"  # UTF-8 then one invalid byte, as pymilter decodes it
    pymilter_value = wire.decode("utf-8", "surrogateescape")
    from_str = headers_from_pairs([("Subject", pymilter_value)])
    from_bytes = headers_from_pairs([("Subject", wire)])
    assert from_str == from_bytes
    assert from_str.fields[0].value.encode("latin-1") == b" " + wire


def test_headers_from_pairs_limit() -> None:
    headers = headers_from_pairs(((f"X-{i}", "v") for i in range(10_000)), max_headers=10)
    assert headers.truncated and len(headers.fields) == 10
    assert not headers.key_fields_dropped


def test_round_trip_file_to_milter_to_bytes() -> None:
    raw = (
        b"Received: from a by b;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"From: A <a@b.example>\r\n"
        b"Subject: J\xc3\xb6rg\r\n"
        b"\r\n"
        b"body line\r\n.\r\n"
    )
    message = parse_message(raw)
    assert assemble_message(message.headers, message.body) == raw
    # What Postfix would pass: one space eaten, continuation lines joined by LF, bytes decoded
    # the pymilter way.
    pairs = [
        (f.name, f.value[1:].replace("\r\n", "\n").encode("latin-1").decode("utf-8", "surrogateescape"))
        for f in message.headers.fields
    ]
    headers = headers_from_pairs(pairs)
    assert headers == message.headers
    assert assemble_message(headers, message.body) == raw


def test_assemble_with_no_headers() -> None:
    assert assemble_message(MessageHeaders(()), b"body") == b"\r\nbody"


def test_header_field_validates() -> None:
    with pytest.raises(ValueError):
        HeaderField("Subject", "snowman \u2603", 1)
    with pytest.raises(ValueError):
        HeaderField("Subject", "x", 0)

"""domains.py: one normalisation, one IDNA policy, one envelope-path parser; and where the old
variants disagreed, the one rule now taken everywhere."""

from __future__ import annotations

import random

import pytest

from authmilter.actions import is_overridden
from authmilter.authresults import sanitize_property_value
from authmilter.config import parse_config
from authmilter.domains import (
    MAX_CACHED_NAME_LENGTH,
    DomainError,
    _normalized,
    a_label,
    address_domain,
    is_within,
    normalize,
    path_address,
    to_a_labels,
)
from authmilter.history import Envelope, make_record
from authmilter.keys import key_record_name
from authmilter.message import headers_from_pairs, parse_from
from authmilter.model import Action, Verdict
from authmilter.spf_check import _checkable_domain
from authmilter.tables import HostSet


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Example.COM.", "example.com"),
        (" example.com ", "example.com"),
        ("Bücher.example", "xn--bcher-kva.example"),
        ("bücher\u3002example", "xn--bcher-kva.example"),  # RFC 3490 §3.1: IDNA's other full stops
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("faß.example", None),  # IDNA 2003 would say fass.example, IDNA 2008 another domain
        ("ex\xadample.com", None),  # nameprep maps the soft hyphen to nothing: not the text given
        ("a..example", None),
        ("", None),
        ("a b.example", None),
        ("a" * 64 + ".example", None),
        (".".join(["a" * 63] * 4), None),  # 255 characters
    ],
)
def test_normalize(name: str, expected: str | None) -> None:
    assert normalize(name) == expected


def test_to_a_labels_keeps_ascii_case_and_converts_u_labels() -> None:
    assert to_a_labels("Mail.Bücher.EXAMPLE.") == "Mail.xn--bcher-kva.EXAMPLE"
    with pytest.raises(DomainError, match="ambiguous internationalised domain label 'faß'"):
        to_a_labels("faß.example")
    with pytest.raises(DomainError, match="invalid domain label ''"):
        a_label("")


def test_is_within() -> None:
    assert is_within("a.example.com", "example.com") and is_within("example.com", "example.com")
    assert not is_within("badexample.com", "example.com")


def _generated_names(rng: random.Random, count: int) -> list[str]:
    pieces = [*"aB-. \t\x00\xe9\xdf\uff0e\u3002\xad\udcff", "xn--"]
    return [
        "".join(rng.choice(pieces) if rng.random() < 0.3 else "x" for _ in range(rng.choice([0, 3, 10, 70])))
        for _ in range(count)
    ]


def test_normalisation_cache_agrees_and_keeps_only_short_names() -> None:
    for name in _generated_names(random.Random(9989), 3000):
        expected = _normalized.__wrapped__(name)
        assert normalize(name) == expected == normalize(name), repr(name)
    # Leading spaces can make a long value a valid name: it gets the same answer, without a cache entry.
    padded = " " * MAX_CACHED_NAME_LENGTH + "Example.COM."
    before = _normalized.cache_info()
    assert normalize(padded) == "example.com"
    after = _normalized.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("<bob@x.example>", "bob@x.example"),
        ("<>", ""),
        ("bob@x.example", "bob@x.example"),
        (" <@relay.example,@b.example:bob@x.example> ", "bob@x.example"),
        # The milter's parser kept the spaces inside the brackets, SPF's dropped them: dropped.
        ("< bob@x.example >", "bob@x.example"),
        ("< >", ""),
        # The sign CLI's and the SigningTable's dropped one bracket alone: a broken path stays as it is.
        ("<bob@x.example", "<bob@x.example"),
    ],
)
def test_path_address(path: str, expected: str) -> None:
    assert path_address(path) == expected


@pytest.mark.parametrize(
    "address, expected",
    [
        ("<X@Bounce.Example.>", "bounce.example"),
        ("<>", ""),
        ("postmaster", ""),
        ("a@Bücher.example", "xn--bcher-kva.example"),
        ("a@b c", ""),
    ],
)
def test_address_domain(address: str, expected: str) -> None:
    assert address_domain(address) == expected


# --- where the variants disagreed -------------------------------------------------------------


def test_spf_refuses_a_domain_idna_2003_would_map_to_another() -> None:
    # spf_check.py encoded with the codec alone: "faß.example" was checked as "fass.example".
    assert _checkable_domain("faß.example") is None
    assert _checkable_domain("Bücher.Example") == "xn--bcher-kva.Example"


def test_authentication_results_drop_what_is_no_idn_rather_than_map_it() -> None:
    # authresults.py echoed "faß.example" as "fass.example", another domain.
    assert sanitize_property_value("bob@faß.example") == "bob@fa.example"
    assert sanitize_property_value("bob@bücher.example") == "bob@xn--bcher-kva.example"


def test_never_reject_domains_in_u_labels_match_the_from_domain() -> None:
    # config.py only lower-cased them: a U-label entry never matched the A-label From domain.
    config = parse_config('[policy]\nnever_reject_domains = ["Bücher.Example."]\n', "/etc/authmilter.toml")
    assert config.policy.never_reject_domains == ("xn--bcher-kva.example",)
    from_domains = parse_from(headers_from_pairs([("From", "a@bücher.example")])).domains
    assert is_overridden("192.0.2.1", from_domains, config.policy)


def test_never_reject_domains_refuse_what_is_no_domain() -> None:
    with pytest.raises(ValueError, match="never_reject_domains: 'a b' is not a domain name"):
        parse_config('[policy]\nnever_reject_domains = ["a b"]\n', "/etc/authmilter.toml")


def test_history_envelope_domains_are_a_labels() -> None:
    # history.py only lower-cased them (a U-label never matched the A-label From domain).
    verdict = Verdict(None, None, (), None, Action.ACCEPT, None, "", "mx.example; none")
    envelope = Envelope("192.0.2.1", "bob@Bücher.Example.", ("<a@Bücher.example>",), "mx.example", "Q1")
    record = make_record(verdict, envelope, "mx.example", 1.0e9, "treewalk")
    assert record["envelope_from"] == "xn--bcher-kva.example"
    assert record["envelope_to"] == ["xn--bcher-kva.example"]


def test_host_lists_take_u_labels_as_a_labels() -> None:
    # tables.py only lower-cased names: a U-label entry never matched the MTA's (A-label) PTR name.
    hosts = HostSet.parse(["Bücher.example", ".Mail.Example."], "internal_hosts")
    assert hosts.match("192.0.2.9", "xn--bcher-kva.example") is not None
    assert hosts.match("192.0.2.9", "mx.mail.example") is not None


def test_genkey_writes_a_u_label_domain_as_a_labels() -> None:
    # keys.py refused a U-label domain; DNS and d= want its A-labels (RFC 6376 §3.5).
    assert key_record_name("sel", "Bücher.example.") == "sel._domainkey.xn--bcher-kva.example"


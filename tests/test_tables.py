"""OpenDKIM tables: the cases of opendkim.conf(5) and opendkim(8) "DATA SETS", on real files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from authmilter import tables
from authmilter.tables import (
    DEFAULT_INTERNAL_HOSTS,
    HostSet,
    KeyTable,
    SigningTable,
    TableError,
)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def keytable(tmp_path: Path, text: str) -> KeyTable:
    return KeyTable.load(write(tmp_path, "KeyTable", text))


def raises_at(where: str, *words: str) -> pytest.RaisesExc[TableError]:
    """Expect a TableError whose message starts with ``where`` and contains every word."""
    pattern = "^" + re.escape(where) + ": " + "".join(f"(?=.*{re.escape(w)})" for w in words)
    return pytest.raises(TableError, match=pattern)


# A KeyTable with one key per place in the exact-lookup order, for the SigningTable tests.
KEYS = "".join(f"k{i} example.com:s{i}:/keys/{i}.key\n" for i in range(1, 9)) + (
    "dual-rsa example.com:rsa:/keys/rsa.key:rsa-sha256\n"
    "dual-ed example.com:ed:/keys/ed.key:ed25519-sha256\n"
    "example.org %:sel:/keys/org.key\n"
    "any %:any:/keys/any.key\n"
)


@pytest.fixture
def keys(tmp_path: Path) -> KeyTable:
    return keytable(tmp_path, KEYS)


# --- KeyTable -------------------------------------------------------------------------------------


def test_keytable_fields_comments_and_optional_algorithm(tmp_path: Path) -> None:
    table = keytable(
        tmp_path,
        "# comment line\n\n"
        "rsa\tExample.COM:Sel2026:/etc/keys/rsa.private   # trailing comment\n"
        "ed  example.com:ed2026:/etc/keys/ed.private:ED25519-SHA256\r\n",
    )
    assert len(table) == 2
    rsa, ed = table.get("rsa"), table.get("ed")
    assert rsa is not None and ed is not None
    assert (rsa.domain, rsa.selector, rsa.key_path, rsa.algorithm) == (
        "example.com",
        "sel2026",
        "/etc/keys/rsa.private",
        None,
    )
    assert ed.algorithm == "ed25519-sha256"
    assert rsa.source.endswith("KeyTable:3") and ed.source.endswith("KeyTable:4")
    assert [entry.name for entry in table] == ["rsa", "ed"]


def test_keytable_names_are_exact(tmp_path: Path) -> None:
    table = keytable(tmp_path, "Mail example.com:s:/k\n")
    assert table.get("Mail") is not None
    assert table.get("mail") is None


def test_keytable_percent_domain_is_the_sender_domain(tmp_path: Path) -> None:
    entry = keytable(tmp_path, "shared %:mail:/keys/shared.key\n").get("shared")
    assert entry is not None and entry.domain == "%"
    assert entry.domain_for("Customer.EXAMPLE") == "customer.example"


def test_keytable_relative_path_is_taken_from_the_table_directory(tmp_path: Path) -> None:
    entry = keytable(tmp_path, "k example.com:s:./keys/k.pem\n").get("k")
    assert entry is not None
    assert Path(entry.key_path) == tmp_path / "keys" / "k.pem"


@pytest.mark.parametrize("prefix", ["file:", "refile:"])
def test_keytable_accepts_dataset_prefixes(tmp_path: Path, prefix: str) -> None:
    path = write(tmp_path, "KeyTable", "k example.com:s:/k\n")
    assert KeyTable.load(prefix + path).get("k") is not None


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("k example.com:s:MIICXAIBAAKBgQC\n", ["inline private keys", "file"]),
        ("k example.com:s:-----BEGIN\n", ["inline private keys"]),
        ("k\n", ["no value", "DOMAIN:SELECTOR"]),
        ("k example.com:s\n", ["lacks a field"]),
        ("k example.com::/k\n", ["lacks a field"]),
        ("k example.com:s:/k:rsa-sha256:x\n", ["too many"]),
        ("k example.com:s:/k extra\n", ["unexpected text"]),
        ("k example.com:s:/k:rsa-sha1\n", ["unknown algorithm", "RFC 8301"]),
        ("k example.com:s:/k:rsa-sha512\n", ["unknown algorithm", "ed25519-sha256"]),
        ("k exa mple:s:/k\n", ["unexpected text"]),
        ("k exa_mple..com:s:/k\n", ["not a domain name"]),
        ("k example.com:bad/sel:/k\n", ["not a valid selector"]),
        ("k example.com:s:/keys/%.key\n", ["'%' in the key path"]),
        ("k* example.com:s:/k\n", ["exactly"]),
    ],
)
def test_keytable_errors_name_file_and_line(tmp_path: Path, line: str, words: list[str]) -> None:
    path = write(tmp_path, "KeyTable", "# header\n" + line)
    with raises_at(f"{path}:2", *words):
        KeyTable.load(path)


def test_keytable_duplicate_name_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "KeyTable", "k example.com:a:/a\nother example.com:b:/b\nk example.com:c:/c\n")
    with raises_at(f"{path}:3", "'k'", f"{path}:1"):
        KeyTable.load(path)


def test_unreadable_tables_are_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")
    with raises_at(missing, "cannot read"):
        KeyTable.load(missing)
    with raises_at(str(tmp_path), "cannot read"):
        KeyTable.load(str(tmp_path))  # a directory
    with raises_at(missing, "cannot read"):
        HostSet.load("refile:" + missing)


def test_line_and_size_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long_line = "k example.com:s:/" + "x" * tables.MAX_LINE_LENGTH + "\n"
    path = write(tmp_path, "KeyTable", "# ok\n" + long_line)
    with raises_at(f"{path}:2", "longer than"):
        KeyTable.load(path)
    monkeypatch.setattr(tables, "MAX_LINES", 3)
    path = write(tmp_path, "KeyTable", "# a\n# b\n# c\n# d\n")
    with raises_at(path, "more than 3 lines"):
        KeyTable.load(path)


def test_non_utf8_table_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "KeyTable"
    path.write_bytes(b"k example.com:s:/k\nk2 exampl\xe9.com:s:/k\n")
    with raises_at(f"{path}:2", "UTF-8"):
        KeyTable.load(str(path))


# --- SigningTable: refile ---------------------------------------------------------------------------


def signing(tmp_path: Path, keys: KeyTable, text: str, refile: bool) -> SigningTable:
    path = write(tmp_path, "SigningTable", text)
    return SigningTable.load(("refile:" if refile else "") + path, keys)


def names(rules: tuple[tables.SigningRule, ...]) -> list[str]:
    return [rule.key_name for rule in rules]


def test_refile_patterns_in_file_order(tmp_path: Path, keys: KeyTable) -> None:
    table = signing(
        tmp_path,
        keys,
        "ceo@example.com k1\n*@example.com k2\n*@*.example.com k3\n*example.com k4\n*  k5\n",
        refile=True,
    )
    assert table.refile
    assert names(table.lookup("ceo@example.com", multiple=False)) == ["k1"]
    assert names(table.lookup("ceo@example.com", multiple=True)) == ["k1", "k2", "k4", "k5"]
    assert names(table.lookup("bob@example.com", multiple=False)) == ["k2"]
    assert names(table.lookup("bob@lists.example.com", multiple=True)) == ["k3", "k4", "k5"]
    # "*example.com" is a plain wildcard: it also matches a look-alike domain, as in OpenDKIM.
    assert names(table.lookup("eve@badexample.com", multiple=True)) == ["k4", "k5"]
    assert names(table.lookup("eve@example.net", multiple=True)) == ["k5"]


def test_refile_matching_ignores_case_and_brackets(tmp_path: Path, keys: KeyTable) -> None:
    table = signing(tmp_path, keys, "*@Example.COM k1\n", refile=True)
    assert names(table.lookup("<Bob@EXAMPLE.com.>", multiple=False)) == ["k1"]


def test_refile_wildcard_backtracks(tmp_path: Path, keys: KeyTable) -> None:
    table = signing(tmp_path, keys, "a*b*c@x.example k1\n", refile=True)
    assert table.lookup("aXbYbZc@x.example", multiple=False)
    assert table.lookup("abc@x.example", multiple=False)
    assert not table.lookup("aXcYb@x.example", multiple=False)
    assert not table.lookup("abc@x.example.org", multiple=False)


def test_refile_dual_signing_one_pattern_two_keys(tmp_path: Path, keys: KeyTable) -> None:
    table = signing(tmp_path, keys, "*@example.com dual-rsa\n*@example.com dual-ed\n", refile=True)
    assert names(table.lookup("a@example.com", multiple=True)) == ["dual-rsa", "dual-ed"]
    assert names(table.lookup("a@example.com", multiple=False)) == ["dual-rsa"]


def test_refile_exact_duplicate_is_an_error(tmp_path: Path, keys: KeyTable) -> None:
    path = write(tmp_path, "SigningTable", "*@example.com k1\n*@EXAMPLE.com k1\n")
    with raises_at(f"{path}:2", "k1", f"{path}:1"):
        SigningTable.load("refile:" + path, keys)


# --- SigningTable: exact keys, OpenDKIM's order -----------------------------------------------------

# Written out of order on purpose: the lookup order, not the file order, decides.
EXACT = """\
*                       k8
user@*                  k7
.com                    k6
user@.com               k5
.example.com            k4
user@.example.com       k3
foo.example.com         k2
user@foo.example.com    k1
"""


def test_exact_lookup_order_user_host_parent_star(tmp_path: Path, keys: KeyTable) -> None:
    table = signing(tmp_path, keys, EXACT, refile=False)
    assert not table.refile
    # dkimf_apply_signtable: user@host, host, then per parent user@.parent and .parent, user@*, *.
    assert names(table.lookup("user@foo.example.com", multiple=True)) == [f"k{i}" for i in range(1, 9)]
    assert table.tried("user@foo.example.com") == (
        "keys user@foo.example.com, foo.example.com, user@.example.com, .example.com, "
        "user@.com, .com, user@*, *"
    )


@pytest.mark.parametrize(
    ("address", "first"),
    [
        ("user@foo.example.com", "k1"),
        ("bob@foo.example.com", "k2"),
        ("user@bar.example.com", "k3"),
        ("bob@bar.example.com", "k4"),
        ("user@example.com", "k5"),  # .example.com covers subdomains only, not example.com itself
        ("bob@example.com", "k6"),
        ("user@example.org", "k7"),
        ("bob@example.org", "k8"),
        ("USER@Foo.Example.Com", "k1"),  # OpenDKIM opens the SigningTable case-insensitively
    ],
)
def test_exact_lookup_first_match(tmp_path: Path, keys: KeyTable, address: str, first: str) -> None:
    table = signing(tmp_path, keys, EXACT, refile=False)
    assert names(table.lookup(address, multiple=False)) == [first]


def test_exact_parent_entry_does_not_match_the_domain_itself(tmp_path: Path, keys: KeyTable) -> None:
    table = signing(tmp_path, keys, ".example.com k1\n", refile=False)
    assert table.lookup("a@example.com", multiple=True) == ()
    assert names(table.lookup("a@deep.sub.example.com", multiple=True)) == ["k1"]


def test_exact_without_catch_all_is_unsigned(tmp_path: Path, keys: KeyTable) -> None:
    table = signing(tmp_path, keys, "example.com k1\n", refile=False)
    assert table.lookup("a@example.net", multiple=True) == ()
    assert table.lookup("not-an-address", multiple=True) == ()
    assert "not user@domain" in table.tried("not-an-address")


def test_exact_table_refuses_wildcard_patterns(tmp_path: Path, keys: KeyTable) -> None:
    path = write(tmp_path, "SigningTable", "example.com k1\n*@example.com k2\n")
    with raises_at(f"{path}:2", "wildcard pattern", "refile:"):
        SigningTable.load(path, keys)


def test_exact_duplicate_is_an_error_even_with_another_key(tmp_path: Path, keys: KeyTable) -> None:
    path = write(tmp_path, "SigningTable", "example.com dual-rsa\nEXAMPLE.COM dual-ed\n")
    with raises_at(f"{path}:2", f"{path}:1", "refile:"):
        SigningTable.load(path, keys)


def test_plain_file_prefix_is_exact_mode(tmp_path: Path, keys: KeyTable) -> None:
    path = write(tmp_path, "SigningTable", "example.com k1\n")
    assert not SigningTable.load("file:" + path, keys).refile


# --- SigningTable: key names, identities, "%" ---------------------------------------------------------


@pytest.mark.parametrize("refile", [True, False])
def test_unknown_key_name_names_file_and_line(tmp_path: Path, keys: KeyTable, refile: bool) -> None:
    path = write(tmp_path, "SigningTable", "example.com k1\nexample.net K1\n")
    with raises_at(f"{path}:2", "'K1'", "not in the KeyTable"):
        SigningTable.load(("refile:" if refile else "") + path, keys)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("example.com\n", ["no value"]),
        ("example.com :user@example.com\n", ["no key name"]),
        ("example.com k1:a@example.com:x\n", ["too many"]),
        ("example.com k1:example.com\n", ["lacks '@'", "RFC 6376"]),
        ("example.com k1:user@example.net\n", ["not within", "example.com"]),
        ("@example.com k1\n", ["empty local part"]),
        ("exa$mple.com k1\n", ["not a domain"]),
    ],
)
def test_signing_table_syntax_errors(tmp_path: Path, keys: KeyTable, line: str, words: list[str]) -> None:
    path = write(tmp_path, "SigningTable", "# signing\n" + line)
    with raises_at(f"{path}:2", *words):
        SigningTable.load(path, keys)


def test_identity_suffix_and_percent(tmp_path: Path, keys: KeyTable) -> None:
    table = signing(
        tmp_path,
        keys,
        "*@example.com k1:bounce@mail.example.com\n*@example.org example.org:@%\n",
        refile=True,
    )
    (rule,) = table.lookup("a@example.com", multiple=False)
    assert rule.identity == "bounce@mail.example.com"
    signer = table.resolve(rule, "example.com")
    assert signer is not None
    assert (signer.domain, signer.selector) == ("example.com", "s1")
    assert signer.identity == "bounce@mail.example.com"

    (rule,) = table.lookup("a@example.org", multiple=False)
    assert rule.identity == "@%"
    signer = table.resolve(rule, "Example.ORG")
    assert signer is not None
    assert (signer.domain, signer.identity) == ("example.org", "@example.org")


def test_percent_key_name_is_the_key_named_after_the_domain(tmp_path: Path, keys: KeyTable) -> None:
    table = signing(tmp_path, keys, "* %\n", refile=True)
    (rule,) = table.lookup("a@example.org", multiple=False)
    assert rule.key_name == "%"
    signer = table.resolve(rule, "example.org")
    assert signer is not None and signer.key.name == "example.org" and signer.domain == "example.org"
    # No KeyTable entry named "example.net": nothing to sign with (the caller logs why).
    (rule,) = table.lookup("a@example.net", multiple=False)
    assert table.resolve(rule, "example.net") is None


def test_percent_domain_identity_outside_d_is_dropped(tmp_path: Path, keys: KeyTable) -> None:
    # The KeyTable's "%" makes d= the sender domain; i= names another domain: OpenDKIM omits i=.
    table = signing(tmp_path, keys, "* any:postmaster@example.com\n", refile=True)
    (rule,) = table.lookup("a@example.org", multiple=False)
    signer = table.resolve(rule, "example.org")
    assert signer is not None
    assert (signer.domain, signer.selector, signer.identity) == ("example.org", "any", None)
    signer = table.resolve(rule, "example.com")
    assert signer is not None and signer.identity == "postmaster@example.com"


def test_unreadable_signing_table(tmp_path: Path, keys: KeyTable) -> None:
    missing = str(tmp_path / "nope")
    with raises_at(missing, "cannot read"):
        SigningTable.load("refile:" + missing, keys)


# --- Host datasets ----------------------------------------------------------------------------------


def hosts(tmp_path: Path, text: str, prefix: str = "") -> HostSet:
    return HostSet.load(prefix + write(tmp_path, "TrustedHosts", text))


NEGATION = "10.0.0.0/8\n!10.1.0.0/16\n10.1.2.3\n"


@pytest.mark.parametrize("order", [NEGATION, "".join(reversed(NEGATION.splitlines(keepends=True)))])
def test_negation_most_specific_wins_whatever_the_order(tmp_path: Path, order: str) -> None:
    table = hosts(tmp_path, order)
    assert table.contains("10.2.3.4")
    assert not table.contains("10.1.0.9")
    assert table.contains("10.1.2.3")
    assert not table.contains("11.0.0.1")
    decided = table.match("10.1.0.9")
    assert decided is not None and decided.text == "!10.1.0.0/16" and not decided.included


def test_ipv6_cidr_and_negation(tmp_path: Path) -> None:
    table = hosts(tmp_path, "2001:db8::/32\n!2001:db8:bad::/48\n::1\n")
    assert table.contains("2001:DB8:0:1::25")
    assert not table.contains("2001:db8:bad::1")
    assert table.contains("::1")
    assert not table.contains("2001:db9::1")
    assert not table.contains("10.0.0.1")


def test_names_and_dot_domains(tmp_path: Path) -> None:
    table = hosts(tmp_path, "mail.example.com\n.example.org\n!bad.example.org\nlocalhost\n")
    assert table.contains("192.0.2.1", "mail.example.com")
    assert table.contains("192.0.2.1", "MAIL.Example.Com.")
    assert not table.contains("192.0.2.1", "www.example.com")
    assert table.contains("192.0.2.1", "a.b.example.org")
    assert not table.contains("192.0.2.1", "example.org")  # ".example.org" is what is under it
    assert not table.contains("192.0.2.1", "bad.example.org")
    assert table.contains("192.0.2.1", "x.bad.example.org")  # "!" is exact; .example.org covers it
    assert table.contains("192.0.2.1", "localhost")


def test_name_decides_before_address(tmp_path: Path) -> None:
    table = hosts(tmp_path, "10.0.0.0/8\n!printer.example.com\n")
    assert table.contains("10.9.9.9", "mail.example.com")  # no name entry: the network decides
    assert not table.contains("10.9.9.9", "printer.example.com")


def test_unverified_names_are_ignored(tmp_path: Path) -> None:
    table = hosts(tmp_path, "unknown\n.example.com\n")
    assert not table.contains("192.0.2.1", "unknown")  # Postfix's word for "no verified name"
    assert not table.contains("192.0.2.1", "[192.0.2.1]")


def test_client_address_forms(tmp_path: Path) -> None:
    table = hosts(tmp_path, "[192.0.2.7]\n[198.51.100.0]/24\n10.0.0.0/8\n")
    assert table.contains("192.0.2.7")
    assert table.contains("[198.51.100.20]")
    assert table.contains("::ffff:10.1.2.3")  # IPv4-mapped IPv6 matches the IPv4 entries
    assert table.contains("IPv6:::ffff:10.1.2.3")
    assert not table.contains("not an address")
    assert not table.contains("")


def test_default_internal_hosts() -> None:
    assert DEFAULT_INTERNAL_HOSTS.contains("127.0.0.1")
    assert DEFAULT_INTERNAL_HOSTS.contains("::1")
    assert not DEFAULT_INTERNAL_HOSTS.contains("127.0.0.2")
    assert not DEFAULT_INTERNAL_HOSTS.contains("10.0.0.1", "localhost")
    assert len(DEFAULT_INTERNAL_HOSTS) == 2


def test_parse_from_configuration_list() -> None:
    table = HostSet.parse(["192.168.0.0/16  # office", "", "!192.168.99.0/24"], "<config>")
    assert table.contains("192.168.1.1") and not table.contains("192.168.99.1")
    with raises_at("<config>:2", "not a valid IP"):
        HostSet.parse(["127.0.0.1", "300.1.1.1"], "<config>")


def test_refile_host_wildcards(tmp_path: Path) -> None:
    table = hosts(tmp_path, "127.0.0.1\n*.example.pw\n", prefix="refile:")
    assert table.contains("192.0.2.1", "mx.example.pw")
    assert not table.contains("192.0.2.1", "example.pw")


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("10.0.0.0/33\n", ["not a valid IP address or CIDR"]),
        ("10.1.2.3/16\n", ["host bits set", "10.1.0.0/16"]),
        ("192.0.2/24\n", ["not a valid IP"]),
        ("10.0.0.256\n", ["not a valid IP"]),
        ("2001:db8::/129\n", ["not a valid IP"]),
        ("2001:zz8::1\n", ["not a valid IP"]),
        ("*.example.com\n", ["'.example.com'", "refile"]),
        ("10.0.0.1 10.0.0.2\n", ["one entry per line"]),
        ("bad_host!name\n", ["neither"]),
        ("!\n", ["neither"]),
        ("127.0.0.1/32\n", ["repeats", "127.0.0.1"]),
        ("!127.0.0.1\n", ["contradicts"]),
        ("LOCALHOST\n", ["repeats"]),
    ],
)
def test_host_list_errors_name_file_and_line(tmp_path: Path, line: str, words: list[str]) -> None:
    path = write(tmp_path, "TrustedHosts", "127.0.0.1\nlocalhost\n" + line)
    with raises_at(f"{path}:3", *words):
        HostSet.load(path)


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        (["10.0.0.0/8"], ["10.9.0.0/16"], ("10.9.0.0", "10.0.0.0/8", "10.9.0.0/16")),
        (["10.0.0.0/8", "!10.9.0.0/16"], ["10.9.0.0/16"], None),
        (["10.0.0.0/8", "!10.9.0.0/16"], ["10.8.0.0/15"], ("10.8.0.0", "10.0.0.0/8", "10.8.0.0/15")),
        (["10.0.0.0/8", "!10.0.0.0/16"], ["10.0.0.0/15"], ("10.1.0.0", "10.0.0.0/8", "10.0.0.0/15")),
        (["2001:db8::/32"], ["2001:db8:1::7"], ("2001:db8:1::7", "2001:db8::/32", "2001:db8:1::7")),
        (["192.0.2.1"], ["192.0.2.2", "::1"], None),
        ([".corp.example", "!bad.corp.example"], ["bad.corp.example"], None),
        ([".corp.example"], ["mx.corp.example"], ("mx.corp.example", ".corp.example", "mx.corp.example")),
        ([".corp.example"], [".example"], (".corp.example", ".corp.example", ".example")),
    ],
)
def test_shared_client_of_two_sets(
    first: list[str], second: list[str], shared: tuple[str, str, str] | None
) -> None:
    found = HostSet.parse(first, "a").shared_client(HostSet.parse(second, "b"))
    assert (found and (found[0], found[1].text, found[2].text)) == shared

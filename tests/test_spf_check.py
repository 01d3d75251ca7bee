"""SPF checks (spf_check.py) against real zone files served by ZoneFileSource."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from encodings.idna import ToUnicode
from pathlib import Path

import dns.name
import dns.rdatatype
import pytest
import spf

from authmilter.domains import MAX_LABEL_LENGTH, MAX_NAME_LENGTH
from authmilter.model import AuthResult, SpfResult, SpfScope
from authmilter.resolver import DnsAnswer, DnsSource, DnsStatus, Resolver, ZoneFileSource, tempfail
from authmilter.spf_check import (
    SpfSettings,
    _checkable_domain,
    _client_address,
    _ResolverQuery,
    check_helo,
    check_mail_from,
)

SETTINGS = SpfSettings()
GOOD_IP = "192.0.2.1"
BAD_IP = "198.51.100.9"

SENDER_ZONE = f"""\
$TTL 300
@            TXT "v=spf1 ip4:{GOOD_IP} -all"
soft         TXT "v=spf1 ip4:{GOOD_IP} ~all"
neutral      TXT "v=spf1 ip4:{GOOD_IP} ?all"
explained    TXT "v=spf1 ip4:{GOOD_IP} -all exp=why.%{{d}}"
why.explained TXT "%{{i}} may not send for %{{d}} as %{{l}}"
nospf        TXT "some other record"
two          TXT "v=spf1 ip4:{GOOD_IP} -all"
two          TXT "v=spf1 -all"
mta          A   {GOOD_IP}
mta          TXT "v=spf1 a -all"
postmaster-only TXT "v=spf1 exists:%{{l}}._ok.%{{d}} -all"
postmaster._ok.postmaster-only A 127.0.0.2
v6           TXT "v=spf1 ip6:2001:db8::/32 -all"
tempinclude  TXT "v=spf1 include:broken.elsewhere.example -all"
slow         TXT "v=spf1 a:h1.%{{d}} a:h2.%{{d}} a:h3.%{{d}} -all"
"""


def write_zone(directory: Path, origin: str, text: str) -> Path:
    path = directory / f"{origin}.zone"
    path.write_text(text, encoding="utf-8")
    return path


def zone_resolver(directory: Path, zones: dict[str, str]) -> Resolver:
    return Resolver(ZoneFileSource(write_zone(directory, o, t) for o, t in zones.items()))


@pytest.fixture
def resolver(tmp_path: Path) -> Resolver:
    return zone_resolver(tmp_path, {"sender.example": SENDER_ZONE})


class TempfailFor:
    """A source that fails temporarily for some names and asks the zone files for the rest."""

    def __init__(self, inner: DnsSource, failing: set[str]) -> None:
        self._inner = inner
        self._failing = {dns.name.from_text(n) for n in failing}

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        if name in self._failing:
            return tempfail("SERVFAIL (scripted)")
        return self._inner.lookup(name, rdtype)


class Hooked:
    """A source that runs a hook before each lookup (to slow lookups or line threads up)."""

    def __init__(self, inner: DnsSource, hook: Callable[[], object]) -> None:
        self._inner = inner
        self._hook = hook

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        self._hook()
        return self._inner.lookup(name, rdtype)


def mfrom(resolver: Resolver, sender: str, ip: str = GOOD_IP, helo: str = "mta.sender.example") -> SpfResult:
    return check_mail_from(ip, helo, sender, resolver, SETTINGS)


@pytest.mark.parametrize(
    ("sender", "ip", "expected"),
    [
        ("user@sender.example", GOOD_IP, AuthResult.PASS),
        ("user@sender.example", BAD_IP, AuthResult.FAIL),
        ("user@soft.sender.example", BAD_IP, AuthResult.SOFTFAIL),
        ("user@neutral.sender.example", BAD_IP, AuthResult.NEUTRAL),
        ("user@nospf.sender.example", GOOD_IP, AuthResult.NONE),
        ("user@absent.sender.example", GOOD_IP, AuthResult.NONE),
        ("user@mta.sender.example", GOOD_IP, AuthResult.PASS),
        ("user@mta.sender.example", BAD_IP, AuthResult.FAIL),
        ("user@v6.sender.example", "2001:db8::25", AuthResult.PASS),
        ("user@v6.sender.example", "2001:db9::25", AuthResult.FAIL),
        # An IPv4-mapped IPv6 client is its IPv4 address (RFC 7208 §5).
        ("user@sender.example", f"::ffff:{GOOD_IP}", AuthResult.PASS),
    ],
)
def test_results(resolver: Resolver, sender: str, ip: str, expected: AuthResult) -> None:
    got = mfrom(resolver, sender, ip)
    assert got.result is expected, got.explanation
    assert got.scope is SpfScope.MFROM
    assert got.identity == sender
    assert got.domain == sender.split("@")[1]


def test_fail_carries_the_exp_text(resolver: Resolver) -> None:
    got = mfrom(resolver, "joe@explained.sender.example", BAD_IP)
    assert got.result is AuthResult.FAIL
    assert got.explanation == f"{BAD_IP} may not send for explained.sender.example as joe"


def test_angle_brackets_and_source_route_are_dropped(resolver: Resolver) -> None:
    for sender in (
        "<user@sender.example>",
        " <user@sender.example> ",
        "<@relay.example:user@sender.example>",
    ):
        got = mfrom(resolver, sender, BAD_IP)
        assert (got.result, got.identity) == (AuthResult.FAIL, "user@sender.example"), sender


def test_domain_follows_the_last_at_sign(resolver: Resolver) -> None:
    got = mfrom(resolver, '"a@b"@sender.example', GOOD_IP)
    assert (got.result, got.domain, got.identity) == (
        AuthResult.PASS,
        "sender.example",
        '"a@b"@sender.example',
    )


def test_missing_local_part_becomes_postmaster(resolver: Resolver) -> None:
    # RFC 7208 §4.3; the record only passes %{l} = postmaster.
    got = mfrom(resolver, "@postmaster-only.sender.example")
    assert (got.result, got.identity) == (AuthResult.PASS, "postmaster@postmaster-only.sender.example")


@pytest.mark.parametrize("null_sender", ["", "<>", " <> "])
def test_null_sender_checks_postmaster_at_helo(resolver: Resolver, null_sender: str) -> None:
    got = mfrom(resolver, null_sender, helo="postmaster-only.sender.example")
    assert got.result is AuthResult.PASS, got.explanation
    assert got.scope is SpfScope.MFROM
    assert got.domain == "postmaster-only.sender.example"
    assert got.identity == "postmaster@postmaster-only.sender.example"


def test_null_sender_with_literal_helo_is_none(resolver: Resolver) -> None:
    got = mfrom(resolver, "<>", helo="[192.0.2.1]")
    assert (got.result, got.scope) == (AuthResult.NONE, SpfScope.MFROM)


def test_helo_check(resolver: Resolver) -> None:
    good = check_helo(GOOD_IP, "mta.sender.example", resolver, SETTINGS)
    bad = check_helo(BAD_IP, "mta.sender.example", resolver, SETTINGS)
    assert (good.result, good.scope, good.domain) == (AuthResult.PASS, SpfScope.HELO, "mta.sender.example")
    assert good.identity == "postmaster@mta.sender.example"
    assert (bad.result, bad.scope) == (AuthResult.FAIL, SpfScope.HELO)


@pytest.mark.parametrize(
    "helo", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "mta", "", "mta..sender.example", "-" * 64 + ".example"]
)
def test_helo_that_is_no_fqdn_gives_none(resolver: Resolver, helo: str) -> None:
    # RFC 7208 §2.3 / §4.3: only a valid multi-label domain name can be checked.
    got = check_helo(GOOD_IP, helo, resolver, SETTINGS)
    assert (got.result, got.scope) == (AuthResult.NONE, SpfScope.HELO)
    assert resolver.queries == 0


def test_settings_switch_checks_off(resolver: Resolver) -> None:
    no_helo = SpfSettings(check_helo=False)
    off = SpfSettings(enabled=False)
    assert check_helo(BAD_IP, "mta.sender.example", resolver, no_helo).result is AuthResult.NONE
    assert check_mail_from(BAD_IP, "x", "u@sender.example", resolver, no_helo).result is AuthResult.FAIL
    assert check_helo(BAD_IP, "mta.sender.example", resolver, off).result is AuthResult.NONE
    assert check_mail_from(BAD_IP, "x", "u@sender.example", resolver, off).result is AuthResult.NONE


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_settings_reject_a_timeout_that_is_not_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        SpfSettings(timeout=timeout)


def test_tempfail_is_temperror(tmp_path: Path) -> None:
    zones = ZoneFileSource([write_zone(tmp_path, "sender.example", SENDER_ZONE)])
    source = TempfailFor(zones, {"sender.example", "broken.elsewhere.example"})
    resolver = Resolver(source)
    top = mfrom(resolver, "user@sender.example")
    nested = mfrom(resolver, "user@tempinclude.sender.example")
    assert top.result is AuthResult.TEMPERROR
    assert nested.result is AuthResult.TEMPERROR
    assert "SERVFAIL" in nested.explanation


def test_two_spf_records_are_permerror(resolver: Resolver) -> None:
    # RFC 7208 §4.5: more than one record is a permerror, even when one would pass.
    got = mfrom(resolver, "user@two.sender.example", GOOD_IP)
    assert got.result is AuthResult.PERMERROR


def _hosts_zone(count: int) -> str:
    return "".join(f"h{n} A 203.0.113.{n}\n" for n in range(1, count + 1))


@pytest.mark.parametrize(("terms", "expected"), [(10, AuthResult.FAIL), (11, AuthResult.PERMERROR)])
def test_ten_dns_term_limit(tmp_path: Path, terms: int, expected: AuthResult) -> None:
    # RFC 7208 §4.6.4: at most 10 terms that query DNS; the 11th is a permerror.
    record = " ".join(f"a:h{n}.limits.example" for n in range(1, terms + 1))
    zone = f'$TTL 300\n@ TXT "v=spf1 {record} -all"\n' + _hosts_zone(terms)
    resolver = zone_resolver(tmp_path, {"limits.example": zone})
    assert mfrom(resolver, "user@limits.example", BAD_IP).result is expected


@pytest.mark.parametrize(("includes", "expected"), [(9, AuthResult.FAIL), (10, AuthResult.PERMERROR)])
def test_lookup_limit_counts_terms_of_included_records(
    tmp_path: Path, includes: int, expected: AuthResult
) -> None:
    # A chain of includes ending in one "a": 9 includes + 1 "a" is 10 terms, 10 + 1 is too many.
    lines = [f'i{n} TXT "v=spf1 include:i{n + 1}.chain.example -all"' for n in range(includes)]
    lines.append(f'i{includes} TXT "v=spf1 a:h1.chain.example -all"')
    zone = "$TTL 300\n" + "\n".join(lines) + "\n" + _hosts_zone(1)
    resolver = zone_resolver(tmp_path, {"chain.example": zone})
    got = mfrom(resolver, "user@i0.chain.example", BAD_IP)
    assert got.result is expected, got.explanation


@pytest.mark.parametrize(("voids", "expected"), [(2, AuthResult.FAIL), (3, AuthResult.PERMERROR)])
def test_void_lookup_limit(tmp_path: Path, voids: int, expected: AuthResult) -> None:
    # RFC 7208 §4.6.4: more than 2 lookups answering NXDOMAIN or no records is a permerror.
    record = " ".join(f"a:nx{n}.voids.example" for n in range(1, voids + 1))
    zone = f'$TTL 300\n@ TXT "v=spf1 {record} -all"\n'
    resolver = zone_resolver(tmp_path, {"voids.example": zone})
    got = mfrom(resolver, "user@voids.example", BAD_IP)
    assert got.result is expected, got.explanation


def test_internationalized_domain_is_checked_as_a_label(tmp_path: Path) -> None:
    # RFC 7208 §4.3: internationalized domain names are checked in A-label form.
    zone = f'$TTL 300\n@ TXT "v=spf1 ip4:{GOOD_IP} -all"\n'
    resolver = zone_resolver(tmp_path, {"xn--bcher-kva.example": zone})
    got = mfrom(resolver, "user@bücher.example")
    assert (got.result, got.domain) == (AuthResult.PASS, "xn--bcher-kva.example")


@pytest.mark.parametrize("ip", ["not-an-ip", "", "192.0.2.256", "2001:db8::g", "192.0.2.1/24"])
def test_bad_client_address_gives_none(resolver: Resolver, ip: str) -> None:
    # Nothing to authorize: no result, and not the sender domain's fault (so not permerror).
    assert mfrom(resolver, "user@sender.example", ip).result is AuthResult.NONE
    assert check_helo(ip, "mta.sender.example", resolver, SETTINGS).result is AuthResult.NONE


@pytest.mark.parametrize(
    "sender",
    [
        "user@s\udcffnder.example",
        "user@\x00",
        "user@sender\x00.example",
        "user@" + "a" * 64 + ".example",
        "user@" + "a." * 200 + "example",
        "user@sender..example",
        "user@[192.0.2.1]",
        "user@localhost",
        "user@",
        "user",
    ],
)
def test_junk_sender_domain_gives_none(resolver: Resolver, sender: str) -> None:
    # RFC 7208 §4.3: a malformed or single-label domain gives none.
    got = mfrom(resolver, sender)
    assert (got.result, got.scope) == (AuthResult.NONE, SpfScope.MFROM), got.explanation
    assert resolver.queries == 0, "a malformed domain is judged without asking DNS"


def _round_trips(a_label: str, u_label: str) -> bool:
    try:
        return bool(ToUnicode(a_label) == u_label.lower())
    except UnicodeError:
        return False


def _checkable_domain_by_codec(domain: str) -> str | None:
    """The domain check as it was before ASCII names skipped the codec: the reference, with the
    one IDNA policy (domains.py): IDNA's other full stops are dots (RFC 3490 §3.1), and a label
    IDNA 2003 maps to another text is refused."""
    domain = domain.replace("\u3002", ".").replace("\uff0e", ".")
    name = domain[:-1] if domain.endswith(".") else domain
    if not name or name.startswith("["):
        return None
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    if not name.isascii():
        pairs = zip(ascii_name.split("."), name.split("."), strict=False)
        if not all(_round_trips(a, u) for a, u in pairs if not u.isascii()):
            return None
    labels = ascii_name.split(".")
    if len(labels) < 2 or len(ascii_name) > MAX_NAME_LENGTH:
        return None
    if not all("!" <= c <= "~" for c in ascii_name):
        return None
    if any(not 0 < len(label) <= MAX_LABEL_LENGTH for label in labels):
        return None
    return ascii_name


def _generated_domains(rng: random.Random, count: int) -> list[str]:
    # Names near every boundary: empty, 63/64-character and 253/254-character names, single
    # labels, trailing and doubled dots, upper case, controls, spaces, DEL, "[", U-labels,
    # IDNA's other dots (U+3002, U+FF0E) and a character nameprep maps to nothing (U+00AD).
    pieces = [*"aZ0-_. \t\x00\x7f~![]%\xe9\xdf\u3002\uff0e\xad\udcff", "..", "xn--", "XN--bcher-kva"]
    names = []
    for _ in range(count):
        labels = []
        for _ in range(rng.choice([1, 2, 2, 3, 4, 5])):
            size = rng.choice([0, 1, 2, 5, 5, 9, 62, 63, 64])
            labels.append("".join(rng.choice(pieces) if rng.random() < 0.05 else "a" for _ in range(size)))
        name = ".".join(labels) + rng.choice(["", "", ".", ".."])
        names.append(name.upper() if rng.random() < 0.1 else name)
    names += ["a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * n for n in (60, 61, 62, 63)]
    return names


def test_checkable_domain_agrees_with_the_idna_codec() -> None:
    # ASCII names skip Python's "idna" codec; over generated and hostile names, the answer must be
    # what the codec path gives.
    names = _generated_domains(random.Random(7208), 5000)
    results = [(name.isascii(), _checkable_domain(name) is not None) for name in names]
    for ascii_name, valid in [(True, True), (True, False), (False, True), (False, False)]:
        assert results.count((ascii_name, valid)) > 30, "every path is exercised"
    for name in names:
        assert _checkable_domain(name) == _checkable_domain_by_codec(name), repr(name)


@pytest.mark.parametrize("local", ["us\xe9r", "us\udcffer", "a b", "%{l}", "x" * 300, "\x00", "postmaster%%"])
def test_odd_local_parts_never_raise(tmp_path: Path, local: str) -> None:
    # The local-part reaches DNS only through macros (%{l}); whatever it holds, a result comes back.
    zone = '$TTL 300\n@ TXT "v=spf1 exists:%{l}.x.%{d} -all exp=e.%{d}"\ne TXT "no %{l}"\n'
    resolver = zone_resolver(tmp_path, {"macros.example": zone})
    got = mfrom(resolver, f"{local}@macros.example", BAD_IP)
    assert (got.result, got.explanation) == (AuthResult.FAIL, f"no {local}")


def test_pyspf_raising_is_permerror_not_an_exception(tmp_path: Path) -> None:
    # %{L} URL-escapes the local-part as UTF-8; pyspf raises on one that is not (surrogateescape'd
    # bytes). The check must still return a result.
    zone = '$TTL 300\n@ TXT "v=spf1 exists:%{L}.x.%{d} -all"\n'
    resolver = zone_resolver(tmp_path, {"macros.example": zone})
    assert mfrom(resolver, "us\xe9r@macros.example", BAD_IP).result is AuthResult.FAIL
    got = mfrom(resolver, "us\udcffer@macros.example", BAD_IP)
    assert got.result is AuthResult.PERMERROR
    assert "UnicodeEncodeError" in got.explanation


def test_overall_timeout_gives_temperror(tmp_path: Path) -> None:
    zones = ZoneFileSource([write_zone(tmp_path, "sender.example", SENDER_ZONE)])
    # Four lookups (the record, h1, h2, h3); the smallest timeout [spf] allows runs out at the third.
    resolver = Resolver(Hooked(zones, lambda: time.sleep(0.4)))
    settings = SpfSettings(timeout=1)
    got = check_mail_from(BAD_IP, "x", "user@slow.sender.example", resolver, settings)
    assert got.result is AuthResult.TEMPERROR
    assert "time limit" in got.explanation


def test_threads_with_different_resolvers_get_their_own_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same domain allows GOOD_IP in one resolver's zone and nobody in the other's. Both threads
    # wait for each other before every lookup, so their evaluations interleave step by step.
    def must_not_be_called(*args: object, **kwargs: object) -> None:
        raise AssertionError("pyspf's global DNSLookup was used")

    monkeypatch.setattr(spf, "DNSLookup", must_not_be_called)
    mx = 'mx TXT "v=spf1 a:host.shared.example -all"\nhost A {ip}\n'
    allowing = f'$TTL 300\n@ TXT "v=spf1 include:mx.shared.example -all"\n{mx.format(ip=GOOD_IP)}'
    denying = f'$TTL 300\n@ TXT "v=spf1 include:mx.shared.example -all"\n{mx.format(ip="203.0.113.7")}'
    barrier = threading.Barrier(2, timeout=5)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    resolvers = {
        AuthResult.PASS: zone_resolver(tmp_path / "a", {"shared.example": allowing}),
        AuthResult.FAIL: zone_resolver(tmp_path / "b", {"shared.example": denying}),
    }
    results: dict[AuthResult, list[AuthResult]] = {}

    def run(expected: AuthResult) -> None:
        zones = resolvers[expected].source
        hooked = Resolver(Hooked(zones, barrier.wait), cache_size=0)
        results[expected] = [mfrom(hooked, "user@shared.example").result for _ in range(20)]

    threads = [threading.Thread(target=run, args=(expected,)) for expected in resolvers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {expected: [expected] * 20 for expected in resolvers}


def ours_and_pyspfs(resolver: Resolver, ip: str) -> tuple[spf.query, spf.query]:
    """Our query and pyspf's own for one client address and sender."""
    address = _client_address(ip)
    assert address is not None
    sender, helo = "user@sender.example", "mta.example"
    ours = _ResolverQuery(address, sender, "user", "sender.example", helo, resolver, 0)
    return ours, spf.query(i=ip, s=sender, h=helo, strict=True)


@pytest.mark.parametrize("ip", [GOOD_IP, "2001:db8::25", "2001:DB8:0::1", f"::ffff:{GOOD_IP}"])
def test_ready_made_client_address_is_what_pyspf_sets(resolver: Resolver, ip: str) -> None:
    # The client's attributes are set once per address; a query must hold what pyspf's own
    # constructor gives it (its clock reading "t" aside).
    ours, own = ours_and_pyspfs(resolver, ip)
    assert {k: v for k, v in vars(ours).items() if k in vars(own) and k != "t"} == {
        k: v for k, v in vars(own).items() if k != "t"
    }


@pytest.mark.parametrize(
    ("ip", "addresses", "length"),
    [
        (GOOD_IP, [GOOD_IP], 32),
        (GOOD_IP, ["192.0.2.200"], 24),
        (GOOD_IP, ["192.0.2.200"], 25),
        (GOOD_IP, ["198.51.100.1", GOOD_IP], 32),
        (GOOD_IP, [], 32),
        (GOOD_IP, [GOOD_IP, "192.0.2.256"], 32),  # matched first, but an invalid one is permerror
        (GOOD_IP, ["192.0.2.1/24"], 32),
        ("2001:db8::25", ["2001:db8::1"], 64),
        ("2001:db8::25", ["2001:db8::1"], 128),
        ("2001:db8::25", [GOOD_IP], 32),  # the other family never matches
    ],
)
def test_cidrmatch_is_pyspfs(resolver: Resolver, ip: str, addresses: list[str], length: int) -> None:
    ours, own = ours_and_pyspfs(resolver, ip)
    for _ in range(2):  # computed, then remembered
        outcomes = []
        for query in (ours, own):
            try:
                outcomes.append(query.cidrmatch(addresses, length))
            except spf.PermError as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1]


def test_names_that_cannot_exist_are_not_asked(resolver: Resolver) -> None:
    # dns() answers "no records" without asking for a name with an empty label or one longer than
    # 63 characters (after one final dot is dropped), whatever the labels hold, as pyspf does.
    asked: list[str] = []

    class Recording(Resolver):
        def query(self, name: str | dns.name.Name, rdtype: str | dns.rdatatype.RdataType) -> DnsAnswer:
            asked.append(str(name))
            return DnsAnswer(DnsStatus.NXDOMAIN, ttl=60)

    ours, _ = ours_and_pyspfs(Recording(resolver.source), GOOD_IP)
    ours._deadline = time.monotonic() + 60
    names = [*_generated_domains(random.Random(4), 3000), "\n.x", "a.\n", "é" * 63 + ".x", "é" * 64 + ".x"]
    for name in names:
        asked.clear()
        ours.void_lookups = 0
        ours.dns(name, "TXT")
        text = name[:-1] if name.endswith(".") else name
        possible = bool(text) and all(0 < len(label) <= MAX_LABEL_LENGTH for label in text.split("."))
        assert asked == ([text] if possible else []), repr(name)

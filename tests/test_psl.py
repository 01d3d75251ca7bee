"""The Public Suffix List test vectors (../shared/peer-suites/publicsuffix-tests/tests.txt, 78 cases)
through organizational_domain() in ``psl`` mode (RFC 7489 §3.2), with the list pinned to the
public_suffix_list.dat of that folder.

The vectors give the registrable domain, or ``null`` when there is none. Our function returns a
string, and RFC 7489 leaves the case of a From domain that is itself a public suffix implicit. We
decide (dmarc.py docstring) that such a domain is its own Organizational Domain, as RFC 9989 §4.10.2
does when its walk finds nothing: relaxed alignment then needs the identical name, and the policy is
looked up at the domain itself. So ``null`` means: the input itself (normalised) for a public
suffix, and "" for input that cannot be a domain name (null, a leading dot). Our results are
A-labels (RFC 9989 §5.3.1), so expected U-labels are compared in A-label form.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dns.name
import dns.rdatatype
import pytest

from authmilter.dmarc import DmarcSettings, organizational_domain
from authmilter.resolver import DnsAnswer, Resolver

SUITE = Path(__file__).resolve().parents[1].parent / "shared" / "peer-suites" / "publicsuffix-tests"
PSL_FILE = SUITE / "public_suffix_list.dat"
TESTS_FILE = SUITE / "tests.txt"
if not (PSL_FILE.is_file() and TESTS_FILE.is_file()):
    raise RuntimeError(f"Public Suffix List suite missing in {SUITE} (shared peer-suites)")
EXPECTED_CASE_COUNT = 78
SETTINGS = DmarcSettings(org_domain="psl", psl_file=str(PSL_FILE))


class NoDns:
    """psl mode needs no DNS: any query fails the test."""

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        raise AssertionError(f"psl mode asked DNS for {name}/{rdtype.name}")


def _cases() -> list[tuple[str, str]]:
    cases = []
    for line in TESTS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("//"):
            given, expected = line.split()
            cases.append((given, expected))
    return cases


CASES = _cases()


def _a_labels(domain: str) -> str:
    return ".".join(label.encode("idna").decode("ascii") for label in domain.lower().split("."))


def _want(given: str, expected: str) -> str:
    if expected != "null":
        return _a_labels(expected)
    if given == "null" or given.startswith("."):
        return ""  # not a domain name
    return _a_labels(given)  # a public suffix is its own Organizational Domain


def _org(given: str) -> str:
    return organizational_domain("" if given == "null" else given, Resolver(NoDns()), SETTINGS)


def test_suite_has_78_cases() -> None:
    assert len(CASES) == EXPECTED_CASE_COUNT


@pytest.mark.parametrize(("given", "expected"), CASES, ids=[f"{g}->{e}" for g, e in CASES])
def test_psl_vector(given: str, expected: str) -> None:
    assert _org(given) == _want(given, expected)


def test_psl_suite_pass_count(conformance_report: Callable[[str], None]) -> None:
    # The null vectors say only "no registrable domain"; what we return for them is our own rule
    # (module docstring), so the line reports them apart and says so.
    failed = [f"{g}: got {_org(g)!r}, want {_want(g, e)!r}" for g, e in CASES if _org(g) != _want(g, e)]
    nulls = [(g, e) for g, e in CASES if e == "null"]
    named = [(g, e) for g, e in CASES if e != "null"]
    nulls_ok = sum(1 for g, e in nulls if _org(g) == _want(g, e))
    named_ok = sum(1 for g, e in named if _org(g) == _want(g, e))
    summary = (
        f"PSL suite: {named_ok}/{len(named)} vectors with a registrable domain passed; "
        f"{nulls_ok}/{len(nulls)} null vectors match our own rule, not the "
        "suite's (a public suffix is its own Organizational Domain, non-domain input gives '')"
    )
    conformance_report(summary)
    assert not failed, summary + "\n" + "\n".join(failed)


def test_pinned_list_is_the_one_used(tmp_path: Path) -> None:
    # With a list that makes foo.com a public suffix, b.foo.com becomes the registrable domain;
    # the bundled and the suite's list both say foo.com.
    pinned = tmp_path / "tiny.dat"
    pinned.write_text("// test list\ncom\nfoo.com\n", encoding="utf-8")
    resolver = Resolver(NoDns())
    tiny = DmarcSettings(org_domain="psl", psl_file=str(pinned))
    assert organizational_domain("a.b.foo.com", resolver, tiny) == "b.foo.com"
    assert organizational_domain("a.b.foo.com", resolver, SETTINGS) == "foo.com"
    assert organizational_domain("a.b.foo.com", resolver, DmarcSettings(org_domain="psl")) == "foo.com"


def test_case_trailing_dot_and_u_labels_are_normalised() -> None:
    assert _org("WWW.Example.COM.") == "example.com"
    assert _org("www.食狮.公司.cn") == "xn--85x722f.xn--55qx5d.cn"

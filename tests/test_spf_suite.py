"""The openspf.org SPF test suites (as shipped with pyspf), run through spf_check.

rfc7208-tests.yml is the conformance target; rfc4408-tests.yml, its RFC 4408 predecessor, is run
as well because the same driver makes it free and its extra cases cover more record syntax.

Every case goes through :func:`check_mail_from` (an empty ``mailfrom`` is the null sender, so the
identity is ``postmaster@<helo>``, as the suite's driver does) with a Resolver whose source serves
the scenario's ``zonedata`` under the driver conventions described in the suite's NOTES.md.
A case passes when the result is one of those allowed and, where the case gives an explanation,
the explanation is the same (``DEFAULT`` meaning pyspf's default text for that result).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import pytest
import spf
import yaml  # type: ignore[import-untyped]

from authmilter.dnswire import record_value
from authmilter.resolver import DnsAnswer, DnsStatus, Resolver
from authmilter.spf_check import SpfSettings, check_mail_from

SUITE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "peer-suites" / "openspf-rfc7208"
# Suite file -> number of cases it holds (NOTES.md counts them).
SUITES = {"rfc7208-tests.yml": 203, "rfc4408-tests.yml": 191}

# "file:case" that we knowingly fail, with the RFC 7208 reason. Empty: every case passes.
EXPECTED_DIFFERENCES: dict[str, str] = {}

# CNAME hops the scenario source follows before it answers like a resolver meeting a loop.
MAX_CNAME_HOPS = 10
TIMEOUT = "TIMEOUT"


@dataclass(frozen=True)
class SuiteCase:
    suite: str
    case_id: str
    helo: str
    host: str
    mailfrom: str
    spec: str
    results: tuple[str, ...]
    explanation: str | None
    zonedata: Mapping[str, Sequence[Any]]


def _load_cases(suite: str) -> list[SuiteCase]:
    path = SUITE_DIR / suite
    if not path.is_file():
        raise FileNotFoundError(f"SPF conformance suite missing: {path} (see shared/peer-suites)")
    cases = []
    for scenario in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        for case_id, test in scenario["tests"].items():
            result = test["result"]
            cases.append(
                SuiteCase(
                    suite=suite,
                    case_id=case_id,
                    helo=str(test["helo"]),
                    host=str(test["host"]),
                    mailfrom=str(test["mailfrom"]),
                    spec=str(test.get("spec", "")),
                    results=tuple(result) if isinstance(result, list) else (result,),
                    explanation=test.get("explanation"),
                    zonedata=scenario["zonedata"],
                )
            )
    return cases


def _txt_bytes(text: str) -> bytes:
    # The suite writes raw octets as YAML "\xNN" escapes, which PyYAML reads as U+00NN.
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _txt_rdata(rdtype: dns.rdatatype.RdataType, value: str | list[str]) -> dns.rdata.Rdata:
    """TXT/SPF rdata built from the octets themselves.

    The suite's strings hold quotes, CR, LF and 8-bit octets that zone-file text would have to
    escape, so they are not sent through dns.rdata.from_text. A record of zero strings (the
    suite's ``SPF: []``) is not valid DNS and dnspython refuses it; one empty string stands in.
    """
    strings = [value] if isinstance(value, str) else list(value)
    octets = [_txt_bytes(s) for s in strings] or [b""]
    cls = dns.rdtypes.ANY.TXT.TXT if rdtype == dns.rdatatype.TXT else dns.rdtypes.ANY.SPF.SPF
    return cls(dns.rdataclass.IN, rdtype, octets)


def _absolute(host: str) -> str:
    return host if host.endswith(".") else f"{host}."


def _rdata(rdtype: dns.rdatatype.RdataType, value: Any) -> dns.rdata.Rdata:
    if rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        return _txt_rdata(rdtype, value)
    if rdtype == dns.rdatatype.MX:
        preference, exchange = value
        text = f"{preference} {_absolute(exchange)}"
    elif rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME):
        text = _absolute(str(value))
    else:
        text = str(value)
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


class ScenarioSource:
    """A DnsSource serving one scenario's ``zonedata`` as the suite's driver (testspf.py) does.

    - ``SPF`` entries are also served as TXT unless the name has its own ``TXT`` entries.
    - ``NONE`` lists a type without a record (the name exists).
    - A value ``TIMEOUT`` times that type out; a bare ``TIMEOUT`` times out every type the name
      has no record of.
    - Absent names are NXDOMAIN, except names starting with ``error.``: a temporary error.
    - CNAMEs are followed as a recursive resolver would; a loop is a server failure.
    """

    def __init__(self, zonedata: Mapping[str, Sequence[Any]]) -> None:
        self._records: dict[dns.name.Name, dict[int, list[dns.rdata.Rdata]]] = {}
        self._timeouts: dict[dns.name.Name, set[int]] = {}
        self._all_time_out: set[dns.name.Name] = set()
        for owner, entries in zonedata.items():
            self._add_name(dns.name.from_text(owner), entries)

    def _add_name(self, name: dns.name.Name, entries: Sequence[Any]) -> None:
        records = self._records.setdefault(name, {})
        timeouts = self._timeouts.setdefault(name, set())
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        for entry in entries:
            if entry == TIMEOUT:
                self._all_time_out.add(name)
                continue
            ((type_text, value),) = entry.items()
            types = [type_text] + (["TXT"] if type_text == "SPF" and not has_txt else [])
            for rdtype in (dns.rdatatype.from_text(t) for t in types):
                if value == TIMEOUT:
                    timeouts.add(rdtype)
                elif value != "NONE":
                    records.setdefault(rdtype, []).append(_rdata(rdtype, value))

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        for _ in range(MAX_CNAME_HOPS):
            records = self._records.get(name)
            if records is None:
                if name.labels[0].lower() == b"error":
                    return DnsAnswer(DnsStatus.TEMPFAIL, reason="scripted error. name")
                return DnsAnswer(DnsStatus.NXDOMAIN, ttl=60)
            if rdtype in self._timeouts[name] or (name in self._all_time_out and rdtype not in records):
                return DnsAnswer(DnsStatus.TEMPFAIL, reason="scripted timeout")
            if rdtype in records:
                return DnsAnswer(DnsStatus.OK, tuple(map(record_value, records[rdtype])), ttl=60)
            if dns.rdatatype.CNAME not in records:
                return DnsAnswer(DnsStatus.NODATA, ttl=60)
            name = records[dns.rdatatype.CNAME][0].target  # type: ignore[attr-defined]
        return DnsAnswer(DnsStatus.TEMPFAIL, reason="CNAME loop")


def _outcome(case: SuiteCase) -> str:
    """'' when the case passes, else what went wrong."""
    resolver = Resolver(ScenarioSource(case.zonedata))
    got = check_mail_from(case.host, case.helo, case.mailfrom, resolver, SpfSettings())
    word = got.result.value
    if word not in case.results:
        return f"result {word!r}, expected one of {case.results} ({got.explanation})"
    if case.explanation is not None:
        expected = spf.EXPLANATIONS[word] if case.explanation == "DEFAULT" else case.explanation
        if got.explanation != expected:
            return f"explanation {got.explanation!r}, expected {expected!r}"
    return ""


CASES = {f"{case.suite}:{case.case_id}": case for suite in SUITES for case in _load_cases(suite)}


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    return {key: _outcome(case) for key, case in CASES.items()}


@pytest.mark.parametrize(("suite", "count"), SUITES.items())
def test_suite_has_every_case(suite: str, count: int) -> None:
    assert sum(1 for case in CASES.values() if case.suite == suite) == count


def test_scenario_source_follows_the_driver_conventions() -> None:
    source = ScenarioSource(
        {
            "gen.example": [{"SPF": "v=spf1 -all"}],
            "own.example": [{"SPF": "v=spf1 -all"}, {"TXT": "v=spf1 +all"}],
            "slow.example": [{"TXT": "v=spf1 -all"}, TIMEOUT],
            "alias.example": [{"CNAME": "gen.example"}],
            "loop.example": [{"CNAME": "loop.example"}],
        }
    )

    def ask(name: str, rdtype: str) -> DnsAnswer:
        return source.lookup(dns.name.from_text(name), dns.rdatatype.from_text(rdtype))

    assert ask("gen.example", "TXT").texts == ("v=spf1 -all",)
    assert ask("own.example", "TXT").texts == ("v=spf1 +all",)
    assert ask("slow.example", "TXT").status is DnsStatus.OK
    assert ask("slow.example", "A").status is DnsStatus.TEMPFAIL
    assert ask("alias.example", "TXT").texts == ("v=spf1 -all",)
    assert ask("gen.example", "A").status is DnsStatus.NODATA
    assert ask("loop.example", "TXT").status is DnsStatus.TEMPFAIL
    assert ask("absent.example", "TXT").status is DnsStatus.NXDOMAIN
    assert ask("error.example", "TXT").status is DnsStatus.TEMPFAIL


def test_expected_differences_name_real_cases() -> None:
    assert set(EXPECTED_DIFFERENCES) <= set(CASES)


@pytest.mark.parametrize("key", list(CASES))
def test_case(key: str, outcomes: dict[str, str]) -> None:
    problem = outcomes[key]
    if key in EXPECTED_DIFFERENCES:
        assert problem, f"{key} now passes: remove it from EXPECTED_DIFFERENCES"
    else:
        assert not problem, f"{key} (spec {CASES[key].spec}): {problem}"


@pytest.mark.parametrize("suite", list(SUITES))
def test_pass_count(suite: str, outcomes: dict[str, str], conformance_report: Callable[[str], None]) -> None:
    mine = {key: problem for key, problem in outcomes.items() if CASES[key].suite == suite}
    passed = sum(1 for problem in mine.values() if not problem)
    failed = sorted(key for key, problem in mine.items() if problem)
    summary = f"SPF suite {suite}: {passed}/{len(mine)} passed"
    conformance_report(summary)
    assert failed == sorted(k for k in EXPECTED_DIFFERENCES if k in mine), f"{summary}; failing: {failed}"

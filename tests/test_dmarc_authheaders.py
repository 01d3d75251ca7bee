"""authheaders' DMARC cases (../shared/peer-suites/authheaders-dmarc) through evaluate_dmarc.

Each of the 13 cases of cases.json is run. DNS is the suite's own stub (``dns_txt``) served through
our Resolver by :class:`StubSource`. The From header is parsed minimally here with
email.utils.getaddresses (the real parser lives in message.py). DKIM results come from ``prev``
when the case has one, otherwise from verifying the message with our verify_dkim over the same stub
DNS.
We compare the dmarc result, ``header.from`` and ``policy.dmarc``; the comment text is authheaders'.

Where RFC 9989 and authheaders disagree we assert RFC 9989 and list the case in DEVIATIONS:
- test_authenticate_dmarc_bad: ``v=DMARC1; p=none; reject`` is permerror in authheaders. RFC 9989
  §4.7 says syntax errors after ``v`` "MUST be discarded", so it is a valid ``p=none`` record and an
  unauthenticated message fails it with policy none.
Cases that differ in method but not in outcome:
- multi-From (test_authenticate_dmarc_mult_from, ..._mult_from2): authheaders reports the domain it
  picked; we evaluate every From domain and the strictest verdict applies (RFC 9989 §11.5). Both
  orders give example.com fail/reject, which is what authheaders expects.
- test_authenticate_dmarc_no_p: ``v=DMARC1; sp=quarantine; np=reject`` has no p= and no rua=, so
  RFC 9989 §4.10.1 applies no DMARC processing: dmarc=none, as authheaders says.
- test_authenticate_dmarc_psdsub: authheaders' stub answers "" for example.gov, i.e. the name does
  not exist; the PSD record at _dmarc.gov (psd=y) therefore gives np=reject (RFC 9989 §4.10.1).
Two cases run with DMARC disabled in authheaders (test_authenticate_dkim, test_prev): for them we
check our verify_dkim's results against the expected header's dkim= clauses, and count them apart
from the DMARC cases in the summary line.

Every case runs in tree-walk mode; the cases authheaders ran without ``dmarcbis`` (its RFC 7489 +
PSL path) also run in our ``psl`` mode.
"""

from __future__ import annotations

import email
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from authmilter.dkim_verify import DkimSettings, verify_dkim
from authmilter.dmarc import DmarcSettings, evaluate_dmarc, from_header_error
from authmilter.dnswire import record_value
from authmilter.model import AuthResult, Disposition, DkimResult, DmarcVerdict
from authmilter.resolver import DnsAnswer, DnsStatus, Resolver

SUITE = Path(__file__).resolve().parents[1].parent / "shared" / "peer-suites" / "authheaders-dmarc"
if not (SUITE / "cases.json").is_file():
    raise RuntimeError(f"authheaders DMARC suite missing: {SUITE}/cases.json (shared peer-suites)")
DATA = json.loads((SUITE / "cases.json").read_text(encoding="utf-8"))
CASES: list[dict[str, Any]] = DATA["cases"]
EXPECTED_CASE_COUNT = 13

# case name -> what RFC 9989 gives instead of authheaders' answer, and why (see the docstring).
DEVIATIONS: dict[str, dict[str, str]] = {
    "test_authenticate_dmarc_bad": {
        "dmarc": "fail",
        "policy": "none",
        "why": "RFC 9989 §4.7: syntax errors after v= are discarded, the record is p=none",
    },
}


def _txt_rdata(text: str) -> dns.rdata.Rdata:
    # A TXT character-string holds at most 255 octets (RFC 1035 §3.3); longer records are split.
    chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    quoted = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, quoted)


class StubSource:
    """authheaders' stub DNS as a DnsSource.

    ``_dmarc.*`` and ``*._domainkey.*`` names: a non-empty value is a TXT record, "" or an absent
    key is NXDOMAIN. Other names are only asked whether they exist (np=): None or "" is NXDOMAIN,
    a value means the name exists (an MX pointing at it). Any other query is a harness bug.
    """

    def __init__(self, table: Mapping[str, str | None]) -> None:
        self._table = {k.lower().rstrip("."): v for k, v in table.items()}

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        key = name.to_text(omit_final_dot=True).lower()
        value = self._table.get(key)
        if key.startswith("_dmarc.") or "._domainkey." in key:
            if rdtype != dns.rdatatype.TXT or not value:
                return DnsAnswer(DnsStatus.NXDOMAIN, ttl=60)
            return DnsAnswer(DnsStatus.OK, (record_value(_txt_rdata(value)),), ttl=60)
        if key not in self._table:
            raise AssertionError(f"unexpected query {key}/{rdtype.name}: not in the suite's stub DNS")
        if not value:
            return DnsAnswer(DnsStatus.NXDOMAIN, ttl=60)
        if rdtype == dns.rdatatype.MX:
            mx = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, f"10 {value}.")
            return DnsAnswer(DnsStatus.OK, (record_value(mx),), ttl=60)
        return DnsAnswer(DnsStatus.NODATA, ttl=60)


def _resolver() -> Resolver:
    return Resolver(StubSource(DATA["dns_txt"]))


def _from_domains(message: email.message.Message) -> tuple[list[str], str]:
    """The From domains, or an error reason as authheaders words it."""
    values = message.get_all("From") or []
    if len(values) != 1:
        return [], f"{len(values)} From header fields"
    addresses = getaddresses(values)
    domains = [addr.rpartition("@")[2] for _, addr in addresses if "@" in addr]
    if not domains or len(domains) != len(addresses):
        return [], f"Unable to extract From domain: {values[0]}"
    return domains, ""


_PREV_DKIM = re.compile(r"dkim=(\w+) header\.d=([^\s;]+)")


def _dkim_from_prev(prev: str) -> list[DkimResult]:
    return [
        DkimResult(AuthResult(result), domain=domain.lower(), selector="", algorithm="")
        for result, domain in _PREV_DKIM.findall(prev)
    ]


def _dkim_results(case: dict[str, Any], raw: bytes, resolver: Resolver) -> list[DkimResult]:
    prev = case["other_args"].get("prev", "")
    if "dkim=" in prev:
        return _dkim_from_prev(prev)
    if case["checks_enabled"]["dkim"]:
        return list(verify_dkim(raw, resolver, DkimSettings()))
    return []


def _expected(header: str, key: str) -> str | None:
    match = re.search(rf"(?:^|[;\s]){re.escape(key)}=([^\s;]+)", header)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Outcome:
    verdict: DmarcVerdict
    dkim: list[DkimResult]


def run_case(case: dict[str, Any], mode: str) -> Outcome:
    raw = (SUITE / case["message_file"]).read_bytes()
    message = email.message_from_bytes(raw)
    resolver = _resolver()
    dkim_results = _dkim_results(case, raw, resolver)
    domains, error = _from_domains(message)
    if error:
        return Outcome(from_header_error(error), dkim_results)
    settings = DmarcSettings(org_domain=mode)
    return Outcome(evaluate_dmarc(domains, None, dkim_results, resolver, settings), dkim_results)


def _compare(case: dict[str, Any], verdict: DmarcVerdict) -> list[str]:
    """Differences from what we expect for this case ([] when it matches)."""
    header = case["expected_header"]
    expected = {"dmarc": _expected(header, "dmarc"), "policy": _expected(header, "policy.dmarc")}
    expected.update({k: v for k, v in DEVIATIONS.get(case["test"], {}).items() if k in expected})
    header_from = _expected(header, "header.from")
    got_policy = verdict.policy.value if verdict.policy is not None else None
    if expected["policy"] == "none" and verdict.policy is None:
        got_policy = "none"  # authheaders writes policy.dmarc=none when there is no policy
    diffs = []
    if verdict.result.value != expected["dmarc"]:
        diffs.append(f"dmarc={verdict.result} (want {expected['dmarc']}): {verdict.reason}")
    if header_from is not None and (verdict.from_domain or "none") != header_from:
        diffs.append(f"header.from={verdict.from_domain or 'none'} (want {header_from})")
    if got_policy != expected["policy"]:
        diffs.append(f"policy.dmarc={got_policy} (want {expected['policy']})")
    return diffs


DMARC_CASES = [c for c in CASES if c["checks_enabled"]["dmarc"]]
DKIM_ONLY_CASES = [c for c in CASES if not c["checks_enabled"]["dmarc"]]
PSL_CASES = [c for c in DMARC_CASES if not c["other_args"].get("dmarcbis")]


def test_suite_has_every_case() -> None:
    assert len(CASES) == EXPECTED_CASE_COUNT
    assert set(DEVIATIONS) <= {c["test"] for c in DMARC_CASES}


@pytest.mark.parametrize("case", DMARC_CASES, ids=lambda c: c["test"])
def test_dmarc_case_treewalk(case: dict[str, Any]) -> None:
    assert _compare(case, run_case(case, "treewalk").verdict) == []


@pytest.mark.parametrize("case", PSL_CASES, ids=lambda c: c["test"])
def test_dmarc_case_psl(case: dict[str, Any]) -> None:
    assert _compare(case, run_case(case, "psl").verdict) == []


@pytest.mark.parametrize("case", DKIM_ONLY_CASES, ids=lambda c: c["test"])
def test_dkim_input_matches_expected_header(case: dict[str, Any]) -> None:
    # DMARC is off in authheaders here; these check the DKIM results our harness feeds DMARC.
    dkim_results = run_case(case, "treewalk").dkim
    expected = _PREV_DKIM.findall(case["expected_header"])
    assert [(r.result.value, r.domain) for r in dkim_results] == expected


def test_multi_from_evaluates_each_domain_and_keeps_the_strictest() -> None:
    # authheaders picks one From domain; we evaluate both (RFC 9989 §11.5) in either order.
    for name in ("test_authenticate_dmarc_mult_from", "test_authenticate_dmarc_mult_from2"):
        case = next(c for c in CASES if c["test"] == name)
        verdict = run_case(case, "treewalk").verdict
        assert set(verdict.from_domains) == {"example.org", "example.com"}
        assert verdict.from_domain == "example.com"
        assert (verdict.result, verdict.disposition) == (AuthResult.FAIL, Disposition.REJECT)


def test_np2_policy_and_org_domain_come_from_example_biz() -> None:
    case = next(c for c in CASES if c["test"] == "test_authenticate_dmarc_np2")
    verdict = run_case(case, "treewalk").verdict
    assert verdict.policy_domain == "example.biz"
    assert verdict.org_domain == "example.biz"


def test_suite_pass_count(conformance_report: Callable[[str], None]) -> None:
    agree = deviate = 0
    failures = []
    for case in DMARC_CASES:
        diffs = _compare(case, run_case(case, "treewalk").verdict)
        if diffs:
            failures.append(f"{case['test']}: {diffs}")
        elif case["test"] in DEVIATIONS:
            deviate += 1
        else:
            agree += 1
    dkim_ok = sum(
        1
        for case in DKIM_ONLY_CASES
        if [(r.result.value, r.domain) for r in run_case(case, "treewalk").dkim]
        == _PREV_DKIM.findall(case["expected_header"])
    )
    summary = (
        f"authheaders suite: {agree + deviate}/{len(DMARC_CASES)} DMARC cases passed through evaluate_dmarc "
        f"({agree} as authheaders, {deviate} documented RFC 9989 deviation); "
        f"{dkim_ok}/{len(DKIM_ONLY_CASES)} DKIM-only cases passed through verify_dkim; "
        f"{len(CASES)} cases in all"
    )
    conformance_report(summary)
    assert not failures and dkim_ok == len(DKIM_ONLY_CASES), summary + "\n" + "\n".join(failures)

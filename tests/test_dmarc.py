"""DMARC (RFC 9989) cases written from the RFC's text, over real zone files (ZoneFileSource)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import dns.name
import dns.rdatatype
import pytest

from authmilter.dmarc import (
    MAX_AUTHOR_DOMAINS,
    RECORD_MEMO_LENGTH,
    DmarcSettings,
    evaluate_dmarc,
    from_header_error,
    organizational_domain,
    parse_dmarc_record,
)
from authmilter.model import AuthResult, Disposition, DkimResult, DmarcVerdict, SpfResult, SpfScope
from authmilter.resolver import DnsAnswer, Resolver, ZoneFileSource, tempfail

TREEWALK = DmarcSettings()
PSL = DmarcSettings(org_domain="psl")
T = TypeVar("T")


class Recorder:
    """A ZoneFileSource that remembers every query and can fail chosen names with TEMPFAIL."""

    def __init__(self, source: ZoneFileSource, failing: Iterable[str] = ()) -> None:
        self.source = source
        self.failing = {name.lower() for name in failing}
        self.asked: list[str] = []

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        text = name.to_text(omit_final_dot=True).lower()
        self.asked.append(f"{text}/{rdtype.name}")
        if text in self.failing:
            return tempfail("SERVFAIL (scripted)")
        return self.source.lookup(name, rdtype)


def make_dns(
    tmp_path: Path, zones: Mapping[str, str], failing: Iterable[str] = ()
) -> tuple[Resolver, Recorder]:
    """Zone files named after their origin, written to tmp_path, behind a fresh resolver."""
    paths = []
    for origin, body in zones.items():
        path = tmp_path / f"{origin}.zone"
        path.write_text("$TTL 300\n" + body, encoding="utf-8")
        paths.append(path)
    recorder = Recorder(ZoneFileSource(paths), failing)
    return Resolver(recorder), recorder


def spf_pass(domain: str) -> SpfResult:
    return SpfResult(AuthResult.PASS, domain, SpfScope.MFROM, identity=f"bounce@{domain}")


def dkim_sig(domain: str, result: AuthResult = AuthResult.PASS) -> DkimResult:
    return DkimResult(result, domain, "s1", "rsa-sha256")


def evaluate(
    resolver: Resolver,
    authors: Iterable[str],
    spf: SpfResult | None = None,
    dkim: Iterable[DkimResult] = (),
    settings: DmarcSettings = TREEWALK,
) -> DmarcVerdict:
    return evaluate_dmarc(list(authors), spf, list(dkim), resolver, settings)


EXAMPLE_COM = """
@        A    192.0.2.1
@        MX   10 mail
mail     A    192.0.2.2
sub      A    192.0.2.3
_dmarc   TXT  "v=DMARC1; p=reject; sp=quarantine; rua=mailto:agg@example.com"
"""


# --- parse_dmarc_record (RFC 9989 §4.7, §4.8) --------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v=spf1 -all",
        "p=reject; v=DMARC1",  # v MUST be first
        "v=DMARC2; p=reject",
        "v=dmarc1; p=reject",  # the value is case-sensitive (%s"DMARC1")
        "v=DMARC1p=reject",
        "junk; v=DMARC1; p=reject",
    ],
)
def test_not_a_dmarc_record(text: str) -> None:
    assert parse_dmarc_record(text) is None


def test_full_record() -> None:
    record = parse_dmarc_record(
        "v=DMARC1; p=quarantine; sp=reject; np=reject; adkim=s; aspf=s; t=y; psd=n; "
        "rua=mailto:a@example.com, mailto:b@example.net!10m; ruf=mailto:f@example.com; fo=d:s"
    )
    assert record is not None
    assert (record.policy, record.subdomain_policy, record.nonexistent_policy) == (
        Disposition.QUARANTINE,
        Disposition.REJECT,
        Disposition.REJECT,
    )
    assert record.adkim_strict and record.aspf_strict and record.testing
    assert record.psd == "n"
    assert record.rua == ("mailto:a@example.com", "mailto:b@example.net")  # "!size" removed (App. C.4)
    assert record.ruf == ("mailto:f@example.com",)
    assert record.failure_options == "d:s"


def test_defaults() -> None:
    record = parse_dmarc_record("v=DMARC1; p=none")
    assert record is not None
    assert record.policy is Disposition.NONE
    assert record.subdomain_policy is None and record.nonexistent_policy is None
    assert not (record.adkim_strict or record.aspf_strict or record.testing)
    assert (record.psd, record.failure_options, record.pct, record.rua) == ("u", "0", None, ())


def test_a_record_text_is_parsed_once_but_a_long_one_each_time() -> None:
    # Domains publishing the same text share one (frozen) record; a text longer than any real
    # record is not kept, so a zone cannot pin large keys.
    text = "v=DMARC1; p=reject; rua=mailto:shared@provider.example"
    assert parse_dmarc_record(text) is parse_dmarc_record(text)
    long_text = text + "; x=" + "y" * RECORD_MEMO_LENGTH
    first, again = parse_dmarc_record(long_text), parse_dmarc_record(long_text)
    assert first == again and first is not again


def test_whitespace_and_case_of_names_and_values() -> None:
    record = parse_dmarc_record("V = DMARC1 ;\tP = Reject ; ADKIM=S ;")
    assert record is not None
    assert record.policy is Disposition.REJECT and record.adkim_strict


def test_junk_and_unknown_tags_are_ignored() -> None:
    # §4.7: unknown tags MUST be ignored; syntax errors are discarded in favour of defaults.
    record = parse_dmarc_record(
        "v=DMARC1; p=quarantine; foo=bar; junk; 1x=2; adkim=bogus; psd=maybe; fo=9; "
        "rua=not a uri, mailto:agg@example.com; t=perhaps; pct=250"
    )
    assert record is not None
    assert record.policy is Disposition.QUARANTINE
    assert not record.adkim_strict and record.psd == "u" and record.failure_options == "0"
    assert record.rua == ("mailto:agg@example.com",)
    assert not record.testing and record.pct is None


def test_repeated_tag_keeps_the_first_value() -> None:
    record = parse_dmarc_record("v=DMARC1; p=none; p=reject")
    assert record is not None and record.policy is Disposition.NONE


def test_missing_or_invalid_p() -> None:
    # §4.10.1: without a valid p (or with a bad sp/np) a valid rua makes it p=none; else not applied.
    no_p = parse_dmarc_record("v=DMARC1; sp=quarantine; np=reject")
    assert no_p is not None and no_p.policy is None
    no_p_rua = parse_dmarc_record("v=DMARC1; sp=quarantine; rua=mailto:agg@example.com")
    assert no_p_rua is not None
    assert (no_p_rua.policy, no_p_rua.subdomain_policy) == (Disposition.NONE, Disposition.QUARANTINE)
    bad_p = parse_dmarc_record("v=DMARC1; p=bounce; rua=mailto:agg@example.com")
    assert bad_p is not None and bad_p.policy is Disposition.NONE
    bad_sp = parse_dmarc_record("v=DMARC1; p=reject; sp=bogus")
    assert bad_sp is not None and bad_sp.policy is None
    bad_np = parse_dmarc_record("v=DMARC1; p=reject; np=bogus; rua=mailto:agg@example.com")
    assert bad_np is not None
    assert (bad_np.policy, bad_np.nonexistent_policy) == (Disposition.NONE, None)
    bad_rua = parse_dmarc_record("v=DMARC1; rua=agg@example.com")  # not a URI
    assert bad_rua is not None and bad_rua.policy is None


@pytest.mark.parametrize(
    ("tags", "testing"),
    [
        ("pct=0", True),  # Appendix A.6: pct=0 is what t=y replaces
        ("pct=100", False),
        ("pct=50", False),  # no sampling in RFC 9989: anything but 0 applies the policy
        ("pct=0; t=n", False),  # an explicit t wins
        ("pct=100; t=y", True),
        ("t=y", True),
        ("t=n", False),
    ],
)
def test_t_and_legacy_pct(tags: str, testing: bool) -> None:
    record = parse_dmarc_record(f"v=DMARC1; p=reject; {tags}")
    assert record is not None and record.testing is testing


def test_pct_is_kept_for_reports() -> None:
    record = parse_dmarc_record("v=DMARC1; p=reject; pct=20")
    assert record is not None and record.pct == 20


# --- policy discovery and the tree walk (§4.10, §4.10.1) ---------------------------------------


def test_record_at_the_author_domain_uses_p(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    verdict = evaluate(resolver, ["example.com"], dkim=[dkim_sig("example.com")])
    assert verdict.result is AuthResult.PASS
    assert (verdict.policy, verdict.disposition) == (Disposition.REJECT, Disposition.NONE)
    assert (verdict.policy_domain, verdict.org_domain) == ("example.com", "example.com")
    assert verdict.dkim_aligned and not verdict.spf_aligned
    assert verdict.record is not None and verdict.record.rua == ("mailto:agg@example.com",)


def test_existing_subdomain_uses_sp(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    verdict = evaluate(resolver, ["sub.example.com"], dkim=[dkim_sig("other.example", AuthResult.PASS)])
    assert verdict.result is AuthResult.FAIL
    assert (verdict.policy, verdict.disposition) == (Disposition.QUARANTINE, Disposition.QUARANTINE)
    assert (verdict.policy_domain, verdict.org_domain) == ("example.com", "example.com")
    assert "dkim d=other.example not aligned with sub.example.com" in verdict.reason


NP_ZONE = """
_dmarc   TXT  "v=DMARC1; p=none; sp=quarantine; np=reject"
exists   A    192.0.2.7
txtonly  TXT  "a name with no A, AAAA or MX"
"""


def test_np_applies_to_a_non_existent_subdomain(tmp_path: Path) -> None:
    resolver, recorder = make_dns(tmp_path, {"example.biz": NP_ZONE})
    verdict = evaluate(resolver, ["ghost.example.biz"])
    assert verdict.result is AuthResult.FAIL
    assert (verdict.policy, verdict.disposition) == (Disposition.REJECT, Disposition.REJECT)
    # Non-existence needs NXDOMAIN for A, AAAA and MX (Appendix A.4, RFC 8020).
    assert [q for q in recorder.asked if not q.startswith("_dmarc.")] == [
        "ghost.example.biz/A",
        "ghost.example.biz/AAAA",
        "ghost.example.biz/MX",
    ]


@pytest.mark.parametrize("author", ["exists.example.biz", "txtonly.example.biz"])
def test_sp_applies_to_an_existing_subdomain(tmp_path: Path, author: str) -> None:
    # txtonly has no address: A is NODATA, which still means the name exists.
    resolver, recorder = make_dns(tmp_path, {"example.biz": NP_ZONE})
    verdict = evaluate(resolver, [author])
    assert (verdict.result, verdict.policy) == (AuthResult.FAIL, Disposition.QUARANTINE)
    assert [q for q in recorder.asked if not q.startswith("_dmarc.")] == [f"{author}/A"]


@pytest.mark.parametrize(
    "record",
    [
        "v=DMARC1; p=reject; sp=quarantine",  # no np
        "v=DMARC1; p=none; sp=quarantine; np=quarantine",  # np the same as the fallback
    ],
)
def test_existence_is_not_asked_when_np_cannot_matter(tmp_path: Path, record: str) -> None:
    resolver, recorder = make_dns(tmp_path, {"example.com": f'_dmarc TXT "{record}"\n'})
    verdict = evaluate(resolver, ["ghost.example.com"])
    assert verdict.policy is Disposition.QUARANTINE
    assert all(q.startswith("_dmarc.") for q in recorder.asked)


def test_record_without_p_and_rua_is_not_applied(tmp_path: Path) -> None:
    resolver, _ = make_dns(
        tmp_path,
        {"example.org": '_dmarc TXT "v=DMARC1; p=reject"\n_dmarc.nop TXT "v=DMARC1; sp=quarantine"\n'},
    )
    verdict = evaluate(resolver, ["nop.example.org"])
    # Found at the Author Domain, so the parent's p=reject is not used either.
    assert (verdict.result, verdict.policy, verdict.policy_domain) == (
        AuthResult.NONE,
        None,
        "nop.example.org",
    )


def test_record_without_p_but_with_rua_is_p_none(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.org": '_dmarc TXT "v=DMARC1; rua=mailto:a@example.org"\n'})
    verdict = evaluate(resolver, ["example.org"])
    assert (verdict.result, verdict.policy, verdict.disposition) == (
        AuthResult.FAIL,
        Disposition.NONE,
        Disposition.NONE,
    )


def test_no_record_is_none(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.net": "@ A 192.0.2.9\n"})
    verdict = evaluate(resolver, ["example.net"], dkim=[dkim_sig("example.net")])
    assert (verdict.result, verdict.policy, verdict.disposition) == (AuthResult.NONE, None, Disposition.NONE)
    assert verdict.policy_domain == "" and verdict.record is None
    assert verdict.from_domain == "example.net"


def test_two_dmarc_records_count_as_none(tmp_path: Path) -> None:
    # §4.10 step 2: "If multiple DMARC Policy Records are returned, they are all discarded."
    zone = '_dmarc TXT "v=DMARC1; p=reject"\n_dmarc TXT "v=DMARC1; p=none"\n_dmarc TXT "v=spf1 -all"\n'
    resolver, _ = make_dns(tmp_path, {"example.net": zone})
    assert evaluate(resolver, ["example.net"]).result is AuthResult.NONE


def test_two_records_at_the_author_fall_back_to_the_parent(tmp_path: Path) -> None:
    zone = (
        '_dmarc TXT "v=DMARC1; p=quarantine"\n'
        '_dmarc.sub TXT "v=DMARC1; p=none"\n_dmarc.sub TXT "v=DMARC1; p=reject"\n'
    )
    resolver, _ = make_dns(tmp_path, {"example.net": zone})
    verdict = evaluate(resolver, ["sub.example.net"])
    assert (verdict.policy_domain, verdict.policy) == ("example.net", Disposition.QUARANTINE)


def test_non_dmarc_txt_beside_one_record_is_ignored(tmp_path: Path) -> None:
    zone = '_dmarc TXT "v=DMARC1; p=reject"\n_dmarc TXT "google-site-verification=x"\n'
    resolver, _ = make_dns(tmp_path, {"example.net": zone})
    assert evaluate(resolver, ["example.net"]).policy is Disposition.REJECT


# RFC 9989 Appendix B.3.3 ("Example with a PSD DMARC Policy Record").
BANK_ZONE = """
_dmarc        TXT "v=DMARC1; p=reject; sp=reject; np=reject; psd=y"
_dmarc.giant  TXT "v=DMARC1; p=quarantine"
giant         A   192.0.2.10
mail.giant    A   192.0.2.11
mail.mega     A   192.0.2.12
small         A   192.0.2.13
"""


def test_psd_y_org_domain_is_one_label_below(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"bank.example": BANK_ZONE})
    assert organizational_domain("giant.bank.example", resolver, TREEWALK) == "giant.bank.example"
    assert organizational_domain("mail.giant.bank.example", resolver, TREEWALK) == "giant.bank.example"
    assert organizational_domain("mail.mega.bank.example", resolver, TREEWALK) == "mega.bank.example"
    assert organizational_domain("bank.example", resolver, TREEWALK) == "bank.example"


def test_psd_y_example_alignment(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"bank.example": BANK_ZONE})
    verdict = evaluate(
        resolver,
        ["giant.bank.example"],
        spf=spf_pass("mail.giant.bank.example"),
        dkim=[dkim_sig("mail.mega.bank.example")],
    )
    assert verdict.result is AuthResult.PASS
    assert verdict.spf_aligned and not verdict.dkim_aligned
    assert (verdict.policy_domain, verdict.org_domain, verdict.policy) == (
        "giant.bank.example",
        "giant.bank.example",
        Disposition.QUARANTINE,
    )


def test_psd_y_record_applies_when_the_org_domain_has_none(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"bank.example": BANK_ZONE})
    verdict = evaluate(resolver, ["small.bank.example"], dkim=[dkim_sig("bank.example")])
    assert verdict.result is AuthResult.FAIL  # bank.example is not small.bank.example's org domain
    assert (verdict.policy_domain, verdict.org_domain) == ("bank.example", "small.bank.example")
    assert verdict.policy is Disposition.REJECT


def test_psd_y_stops_the_walk(tmp_path: Path) -> None:
    resolver, recorder = make_dns(tmp_path, {"bank.example": BANK_ZONE})
    evaluate(resolver, ["x.small.bank.example"])
    assert "_dmarc.example/TXT" not in recorder.asked


PSD_N_ZONE = """
_dmarc       TXT "v=DMARC1; p=none"
_dmarc.mail  TXT "v=DMARC1; p=reject; psd=n"
a.mail       A   192.0.2.20
"""
PSD_U_ZONE = PSD_N_ZONE.replace("; psd=n", "")


def test_psd_n_makes_its_domain_the_org_domain(tmp_path: Path) -> None:
    # §4.10.2: "yields a DMARC Policy Record at _dmarc.mail.example.com with psd=n ... the
    # Organizational Domain for this domain would be mail.example.com".
    resolver, recorder = make_dns(tmp_path, {"example.com": PSD_N_ZONE})
    assert organizational_domain("a.mail.example.com", resolver, TREEWALK) == "mail.example.com"
    assert "_dmarc.example.com/TXT" not in recorder.asked  # the walk stopped at psd=n
    verdict = evaluate(resolver, ["a.mail.example.com"], dkim=[dkim_sig("example.com")])
    assert (verdict.result, verdict.policy, verdict.disposition) == (
        AuthResult.FAIL,
        Disposition.REJECT,
        Disposition.REJECT,
    )
    assert (verdict.policy_domain, verdict.org_domain) == ("mail.example.com", "mail.example.com")


def test_without_psd_the_shortest_record_is_the_org_domain(tmp_path: Path) -> None:
    # §4.10.2: records at mail.example.com and example.com -> example.com.
    resolver, _ = make_dns(tmp_path, {"example.com": PSD_U_ZONE})
    assert organizational_domain("a.mail.example.com", resolver, TREEWALK) == "example.com"
    verdict = evaluate(resolver, ["a.mail.example.com"], dkim=[dkim_sig("example.com")])
    assert verdict.result is AuthResult.PASS and verdict.dkim_aligned
    assert (verdict.policy_domain, verdict.policy) == ("example.com", Disposition.NONE)


def test_org_domain_without_any_record_is_the_name_itself(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.net": "www A 192.0.2.1\n"})
    assert organizational_domain("WWW.Example.NET.", resolver, TREEWALK) == "www.example.net"
    assert organizational_domain("bad..name", resolver, TREEWALK) == ""


def test_deep_name_walk_is_bounded_at_eight_queries(tmp_path: Path) -> None:
    # §4.10: "a.b.c.d.e.f.g.h.i.j.mail.example.com" needs exactly these eight queries.
    resolver, recorder = make_dns(tmp_path, {"example.com": "@ A 192.0.2.1\n"})
    verdict = evaluate(resolver, ["a.b.c.d.e.f.g.h.i.j.mail.example.com"])
    assert verdict.result is AuthResult.NONE
    assert resolver.queries == 8
    assert recorder.asked == [
        f"_dmarc.{name}/TXT"
        for name in (
            "a.b.c.d.e.f.g.h.i.j.mail.example.com",
            "g.h.i.j.mail.example.com",
            "h.i.j.mail.example.com",
            "i.j.mail.example.com",
            "j.mail.example.com",
            "mail.example.com",
            "example.com",
            "com",
        )
    ]


def test_deep_name_record_past_the_shortcut_is_not_seen(tmp_path: Path) -> None:
    # §5.1 (large, complex organizations): a psd=n record at the 8-label b.c.d.e.f.g.example.com
    # is skipped by the walk for mail.a.b.c.d.e.f.g.example.com; only the Author Domain's own
    # record is always read.
    zone = '_dmarc TXT "v=DMARC1; p=none"\n_dmarc.b.c.d.e.f.g TXT "v=DMARC1; p=reject; psd=n"\n'
    resolver, _ = make_dns(tmp_path, {"example.com": zone})
    deep = evaluate(resolver, ["mail.a.b.c.d.e.f.g.example.com"])
    assert (deep.policy_domain, deep.policy) == ("example.com", Disposition.NONE)
    own = evaluate(resolver, ["b.c.d.e.f.g.example.com"])
    assert (own.policy_domain, own.policy) == ("b.c.d.e.f.g.example.com", Disposition.REJECT)


def test_max_tree_walk_setting_lowers_the_bound(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": "@ A 192.0.2.1\n"})
    evaluate(resolver, ["a.b.c.d.e.example.com"], settings=DmarcSettings(max_tree_walk=3))
    assert resolver.queries == 3


@pytest.mark.parametrize(
    "bad",
    [{"max_tree_walk": 9}, {"max_tree_walk": 0}, {"org_domain": "dns"}],
)
def test_settings_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DmarcSettings(**bad)  # type: ignore[arg-type]


# --- DNS errors (§4.10.1, §5.3.6) ---------------------------------------------------------------


def test_tempfail_in_discovery_is_temperror(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM}, failing=["_dmarc.example.com"])
    verdict = evaluate(resolver, ["sub.example.com"], dkim=[dkim_sig("example.com")])
    assert (verdict.result, verdict.disposition, verdict.policy) == (
        AuthResult.TEMPERROR,
        Disposition.NONE,
        None,
    )
    assert "_dmarc.example.com" in verdict.reason


def test_tempfail_in_an_alignment_walk(tmp_path: Path) -> None:
    zone = EXAMPLE_COM + '_dmarc.mail TXT "v=DMARC1; p=none"\n'
    failing = ["_dmarc.bounce.mail.example.com"]
    resolver, _ = make_dns(tmp_path, {"example.com": zone}, failing=failing)
    unknown = evaluate(resolver, ["example.com"], spf=spf_pass("bounce.mail.example.com"))
    assert (unknown.result, unknown.disposition) == (AuthResult.TEMPERROR, Disposition.NONE)
    # Another identifier aligning settles it without the failed walk.
    settled = evaluate(
        resolver, ["example.com"], spf=spf_pass("bounce.mail.example.com"), dkim=[dkim_sig("example.com")]
    )
    assert settled.result is AuthResult.PASS and settled.dkim_aligned


def test_tempfail_in_the_existence_check(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.biz": NP_ZONE}, failing=["ghost.example.biz"])
    assert evaluate(resolver, ["ghost.example.biz"]).result is AuthResult.TEMPERROR
    passed = evaluate(resolver, ["ghost.example.biz"], dkim=[dkim_sig("ghost.example.biz")])
    assert (passed.result, passed.policy) == (AuthResult.PASS, Disposition.QUARANTINE)


def spf_temperror(domain: str) -> SpfResult:
    return SpfResult(AuthResult.TEMPERROR, domain, SpfScope.MFROM, explanation="DNS TXT lookup timed out")


def test_an_aligned_dkim_temperror_without_a_pass_is_temperror(tmp_path: Path) -> None:
    """§5.3.2: a key lookup that failed for a while cannot prove the message spoofed."""
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    unknown = DkimResult(AuthResult.TEMPERROR, "example.com", "sel", "rsa-sha256", "key unavailable: timeout")
    verdict = evaluate(
        resolver,
        ["example.com"],
        spf=SpfResult(AuthResult.FAIL, "example.com", SpfScope.MFROM),
        dkim=[unknown],
    )
    assert (verdict.result, verdict.disposition, verdict.policy) == (
        AuthResult.TEMPERROR,
        Disposition.NONE,
        Disposition.REJECT,
    )
    assert (
        "aligned DKIM signature d=example.com s=sel could not be checked: key unavailable" in verdict.reason
    )
    # Relaxed alignment counts: a subdomain's signature could have passed for example.com too.
    relaxed = evaluate(resolver, ["example.com"], dkim=[dkim_sig("mail.example.com", AuthResult.TEMPERROR)])
    assert relaxed.result is AuthResult.TEMPERROR


def test_an_aligned_spf_temperror_without_a_pass_is_temperror(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    verdict = evaluate(resolver, ["example.com"], spf=spf_temperror("bounce.example.com"))
    assert verdict.result is AuthResult.TEMPERROR
    assert "SPF of the aligned MAIL FROM domain bounce.example.com could not be checked" in verdict.reason


@pytest.mark.parametrize(
    ("spf", "dkim"),
    [
        # An aligned pass wins over any temporary error.
        (spf_temperror("example.com"), [dkim_sig("example.com")]),
        (spf_pass("example.com"), [dkim_sig("example.com", AuthResult.TEMPERROR)]),
    ],
)
def test_an_aligned_pass_wins_over_a_temperror(
    tmp_path: Path, spf: SpfResult, dkim: list[DkimResult]
) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    assert evaluate(resolver, ["example.com"], spf=spf, dkim=dkim).result is AuthResult.PASS


@pytest.mark.parametrize(
    ("spf", "dkim"),
    [
        # Checked and failed: a permanent answer, DMARC fails.
        (None, [dkim_sig("example.com", AuthResult.FAIL)]),
        (None, [dkim_sig("example.com", AuthResult.PERMERROR)]),
        # A temporary error of an identifier that does not align could not have made DMARC pass.
        (spf_temperror("example.net"), [dkim_sig("other.example", AuthResult.TEMPERROR)]),
        # DMARC uses the MAIL FROM identity only (§4.4.2); a HELO temperror does not matter.
        (SpfResult(AuthResult.TEMPERROR, "example.com", SpfScope.HELO), []),
    ],
)
def test_failures_and_unaligned_temperrors_still_fail(
    tmp_path: Path, spf: SpfResult | None, dkim: list[DkimResult]
) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    verdict = evaluate(resolver, ["example.com"], spf=spf, dkim=dkim)
    assert (verdict.result, verdict.disposition) == (AuthResult.FAIL, Disposition.REJECT)


def test_strict_alignment_decides_whether_a_temperror_counts(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": STRICT_ZONE})
    subdomain = dkim_sig("mail.example.com", AuthResult.TEMPERROR)
    assert evaluate(resolver, ["example.com"], dkim=[subdomain]).result is AuthResult.FAIL  # adkim=s
    same = dkim_sig("example.com", AuthResult.TEMPERROR)
    assert evaluate(resolver, ["example.com"], dkim=[same]).result is AuthResult.TEMPERROR


# --- alignment (§4.4, §4.10.2) ------------------------------------------------------------------


STRICT_ZONE = """
_dmarc          TXT "v=DMARC1; p=reject; aspf=s; adkim=s"
_dmarc.relaxed  TXT "v=DMARC1; p=reject"
relaxed         A   192.0.2.30
"""


@pytest.mark.parametrize(
    ("author", "identifier", "aligned"),
    [
        ("example.com", "example.com", True),
        ("example.com", "bounce.example.com", False),  # strict: identical names only
        ("relaxed.example.com", "bounce.example.com", True),  # relaxed: same org domain
        ("relaxed.example.com", "example.com", True),
        ("relaxed.example.com", "example.net", False),
        ("relaxed.example.com", "notexample.com", False),
    ],
)
def test_spf_and_dkim_alignment(tmp_path: Path, author: str, identifier: str, aligned: bool) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": STRICT_ZONE})
    by_spf = evaluate(resolver, [author], spf=spf_pass(identifier))
    by_dkim = evaluate(resolver, [author], dkim=[dkim_sig(identifier)])
    assert (by_spf.spf_aligned, by_spf.dkim_aligned) == (aligned, False)
    assert (by_dkim.dkim_aligned, by_dkim.spf_aligned) == (aligned, False)
    expected = AuthResult.PASS if aligned else AuthResult.FAIL
    assert by_spf.result is expected and by_dkim.result is expected


def test_identifiers_that_do_not_count(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    spf_fail = SpfResult(AuthResult.FAIL, "example.com", SpfScope.MFROM)
    helo = SpfResult(AuthResult.PASS, "example.com", SpfScope.HELO)  # DMARC uses MAIL FROM only
    for spf in (spf_fail, helo):
        verdict = evaluate(
            resolver, ["example.com"], spf=spf, dkim=[dkim_sig("example.com", AuthResult.FAIL)]
        )
        assert (verdict.result, verdict.spf_aligned, verdict.dkim_aligned) == (AuthResult.FAIL, False, False)
    verdict = evaluate(resolver, ["example.com"], spf=spf_fail)
    assert "spf=fail for example.com" in verdict.reason


def test_fail_reason_names_every_identifier(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    verdict = evaluate(
        resolver,
        ["example.com"],
        spf=SpfResult(AuthResult.FAIL, "bounce.example", SpfScope.MFROM),
        dkim=[dkim_sig("other.example"), dkim_sig("example.com", AuthResult.FAIL)],
    )
    assert verdict.reason.startswith("no aligned SPF or DKIM")
    for part in ("spf=fail for bounce.example", "dkim d=other.example not aligned with example.com"):
        assert part in verdict.reason
    assert "dkim=fail for d=example.com" in verdict.reason


def test_unrelated_identifier_needs_no_walk(tmp_path: Path) -> None:
    resolver, recorder = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    evaluate(resolver, ["example.com"], dkim=[dkim_sig("other.example")])
    assert not any("other.example" in q for q in recorder.asked)


# --- test mode (t=y, §4.7) and legacy pct (Appendix A.6) ---------------------------------------


@pytest.mark.parametrize(
    ("tags", "disposition"),
    [
        ("p=reject; t=y", Disposition.QUARANTINE),
        ("p=quarantine; t=y", Disposition.NONE),
        ("p=none; t=y", Disposition.NONE),
        ("p=reject", Disposition.REJECT),
        ("p=reject; pct=0", Disposition.QUARANTINE),
        ("p=reject; pct=30", Disposition.REJECT),
        ("p=quarantine; pct=0; t=n", Disposition.QUARANTINE),
    ],
)
def test_test_mode_lowers_the_disposition_one_level(
    tmp_path: Path, tags: str, disposition: Disposition
) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": f'_dmarc TXT "v=DMARC1; {tags}"\n'})
    verdict = evaluate(resolver, ["example.com"])
    assert verdict.result is AuthResult.FAIL
    assert verdict.disposition is disposition
    assert verdict.policy is parse_dmarc_record(f"v=DMARC1; {tags}").policy  # type: ignore[union-attr]


def test_test_mode_does_not_touch_a_pass(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": '_dmarc TXT "v=DMARC1; p=reject; t=y"\n'})
    verdict = evaluate(resolver, ["example.com"], dkim=[dkim_sig("example.com")])
    assert (verdict.result, verdict.disposition) == (AuthResult.PASS, Disposition.NONE)


# --- several From domains (§5.3.1, §11.5) -------------------------------------------------------


def test_multi_from_strictest_applies(tmp_path: Path) -> None:
    zones = {"example.com": EXAMPLE_COM, "example.org": '_dmarc TXT "v=DMARC1; p=none"\n'}
    resolver, _ = make_dns(tmp_path, zones)
    dkim = [dkim_sig("example.org")]
    for authors in (["example.org", "example.com"], ["Example.COM", "example.org"]):
        verdict = evaluate(resolver, authors, dkim=dkim)
        assert (verdict.result, verdict.disposition, verdict.from_domain) == (
            AuthResult.FAIL,
            Disposition.REJECT,
            "example.com",
        )
        assert set(verdict.from_domains) == {"example.com", "example.org"}


def test_multi_from_pass_needs_every_domain(tmp_path: Path) -> None:
    zones = {"example.com": EXAMPLE_COM, "example.org": "@ A 192.0.2.1\n"}
    resolver, _ = make_dns(tmp_path, zones)
    verdict = evaluate(resolver, ["example.com", "example.org"], dkim=[dkim_sig("example.com")])
    assert (verdict.result, verdict.from_domain) == (AuthResult.NONE, "example.org")


def test_multi_from_fail_with_p_none_beats_pass(tmp_path: Path) -> None:
    zones = {"example.com": EXAMPLE_COM, "example.org": '_dmarc TXT "v=DMARC1; p=none"\n'}
    resolver, _ = make_dns(tmp_path, zones)
    verdict = evaluate(resolver, ["example.com", "example.org"], dkim=[dkim_sig("example.com")])
    assert (verdict.result, verdict.from_domain, verdict.disposition) == (
        AuthResult.FAIL,
        "example.org",
        Disposition.NONE,
    )


def test_duplicate_from_domains_are_evaluated_once(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    verdict = evaluate(resolver, ["example.com", "EXAMPLE.com.", "example.com"])
    assert verdict.from_domains == ("example.com",)


def test_too_many_from_domains_are_refused_before_any_query(tmp_path: Path) -> None:
    """§11.5: the cap on work comes before the work; a failing first domain changes nothing."""
    resolver, recorder = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    many = [f"d{i}.example" for i in range(MAX_AUTHOR_DOMAINS + 1)]
    for authors in (many, ["example.com", *many]):
        incomplete = evaluate(resolver, authors)
        assert (incomplete.result, incomplete.from_domain) == (AuthResult.PERMERROR, "")
        assert len(incomplete.from_domains) == len(authors)
        assert f"more than the {MAX_AUTHOR_DOMAINS} evaluated" in incomplete.reason
    assert recorder.asked == []
    assert evaluate(resolver, many[:MAX_AUTHOR_DOMAINS]).result is AuthResult.NONE  # at the cap: evaluated


# --- From errors and odd names -------------------------------------------------------------------


def test_from_header_error() -> None:
    verdict = from_header_error("2 From header fields")
    assert (verdict.result, verdict.disposition, verdict.policy) == (
        AuthResult.PERMERROR,
        Disposition.NONE,
        None,
    )
    assert verdict.reason == "2 From header fields"


def test_no_and_invalid_from_domains(tmp_path: Path) -> None:
    resolver, recorder = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    assert evaluate(resolver, []).result is AuthResult.PERMERROR
    for bad in ("", "exa mple.com", "a..b", "x" * 64 + ".com", "bad\x00.com", "\udcff.com"):
        verdict = evaluate(resolver, [bad])
        assert (verdict.result, verdict.from_domain) == (AuthResult.PERMERROR, "")
    assert recorder.asked == []


def test_every_verdict_lists_the_from_domains(tmp_path: Path) -> None:
    zones = {"example.com": EXAMPLE_COM, "norecord.example": "@ A 192.0.2.1\n"}
    resolver, _ = make_dns(tmp_path, zones, failing=["_dmarc.broken.example"])
    for authors, result, from_domains in [
        (["Example.COM."], AuthResult.FAIL, ("example.com",)),
        (["example.com", "norecord.example"], AuthResult.FAIL, ("example.com", "norecord.example")),
        (["norecord.example"], AuthResult.NONE, ("norecord.example",)),
        (["broken.example"], AuthResult.TEMPERROR, ("broken.example",)),
        (["exa mple.com", "example.com"], AuthResult.FAIL, ("exa mple.com", "example.com")),
        (["exa mple.com"], AuthResult.PERMERROR, ("exa mple.com",)),
        # U+FF0E is an IDNA dot: IDNA 2003 would make "a\uff0e" "a.", another text, so it is no
        # domain name (domains.py) and is listed as written.
        (["a\uff0e.example"], AuthResult.PERMERROR, ("a\uff0e.example",)),
    ]:
        verdict = evaluate(resolver, authors)
        assert (verdict.result, verdict.from_domains) == (result, from_domains), authors


def test_from_header_error_can_name_the_from_domains() -> None:
    verdict = from_header_error("more than 5 From domains", ("a.example", "b.example"))
    assert (verdict.result, verdict.from_domain) == (AuthResult.PERMERROR, "")
    assert verdict.from_domains == ("a.example", "b.example")


def test_u_label_author_domain_is_looked_up_as_a_label(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"xn--bcher-kva.example": '_dmarc TXT "v=DMARC1; p=quarantine"\n'})
    verdict = evaluate(resolver, ["Bücher.example"], dkim=[dkim_sig("xn--bcher-kva.example")])
    assert (verdict.result, verdict.from_domain) == (AuthResult.PASS, "xn--bcher-kva.example")


# --- psl mode (RFC 7489 §6.6.3) -----------------------------------------------------------------


CO_UK_ZONE = """
_dmarc.example  TXT "v=DMARC1; p=reject; sp=quarantine"
www.example     A   192.0.2.40
"""


def test_psl_mode_looks_at_the_from_domain_then_the_org_domain(tmp_path: Path) -> None:
    resolver, recorder = make_dns(tmp_path, {"co.uk": CO_UK_ZONE})
    verdict = evaluate(resolver, ["www.example.co.uk"], dkim=[dkim_sig("mail.example.co.uk")], settings=PSL)
    assert (verdict.result, verdict.policy) == (AuthResult.PASS, Disposition.QUARANTINE)
    assert (verdict.policy_domain, verdict.org_domain) == ("example.co.uk", "example.co.uk")
    assert recorder.asked == ["_dmarc.www.example.co.uk/TXT", "_dmarc.example.co.uk/TXT"]


def test_psl_mode_ignores_psd(tmp_path: Path) -> None:
    resolver, _ = make_dns(tmp_path, {"bank.example": BANK_ZONE})
    # bank.example is not on the list: "example" is the suffix, so bank.example is the org domain
    # and mail.mega.bank.example aligns with small.bank.example, as RFC 7489 would have it.
    verdict = evaluate(
        resolver, ["small.bank.example"], dkim=[dkim_sig("mail.mega.bank.example")], settings=PSL
    )
    assert (verdict.result, verdict.org_domain, verdict.policy_domain) == (
        AuthResult.PASS,
        "bank.example",
        "bank.example",
    )


def _plain(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_plain(item) for item in value)
    return value is None or type(value) in (str, int, bool)


def _record_derived_keys(resolver: Resolver) -> list[Hashable]:
    """The keys of every derived result the resolver is asked for from now on, in order."""
    keys: list[Hashable] = []
    derived = resolver.derived

    def recording(key: Hashable, compute: Callable[[], T], keep: Callable[[T], bool] = lambda _: True) -> T:
        keys.append(key)
        return derived(key, compute, keep)

    resolver.derived = recording  # type: ignore[method-assign]
    return keys


def test_a_verdict_is_kept_under_a_key_of_plain_values(tmp_path: Path) -> None:
    # The resolver measures a new key as text; result objects and enums in it cost their repr.
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    keys = _record_derived_keys(resolver)
    verdict = evaluate(resolver, ["example.com"], spf_pass("example.com"), [dkim_sig("example.com")])
    assert verdict.result is AuthResult.PASS
    assert keys and all(_plain(key) for key in keys), keys
    failing = SpfResult(AuthResult.FAIL, "example.com", SpfScope.MFROM, "bounce@example.com", "not allowed")
    assert evaluate(resolver, ["example.com"], failing, [dkim_sig("example.com")]).spf_aligned is False
    assert len(set(keys)) == len(keys) - 1, "another SPF result, another key"


def test_every_field_of_the_spf_result_is_in_the_verdict_key(tmp_path: Path) -> None:
    # The key lists SpfResult's fields by hand (plain values, above): a field added to SpfResult
    # and left out of it would let two messages that differ in it share one verdict.
    resolver, _ = make_dns(tmp_path, {"example.com": EXAMPLE_COM})
    keys = _record_derived_keys(resolver)
    base = SpfResult(AuthResult.PASS, "example.com", SpfScope.MFROM, "bounce@example.com", "allowed")
    changed = {
        "result": AuthResult.SOFTFAIL,
        "domain": "mail.example.com",
        "scope": SpfScope.HELO,
        "identity": "other@example.com",
        "explanation": "another reason",
    }
    assert set(changed) == {f.name for f in dataclasses.fields(SpfResult)}, "a new field: add it here"
    for name, value in changed.items():
        keys.clear()
        evaluate(resolver, ["example.com"], base, [dkim_sig("example.com")])
        other = dataclasses.replace(base, **{name: value})
        evaluate(resolver, ["example.com"], other, [dkim_sig("example.com")])
        dmarc_keys = [key for key in keys if isinstance(key, tuple) and key[0] == "dmarc"]
        assert len(dmarc_keys) == 2 and dmarc_keys[0] != dmarc_keys[1], name

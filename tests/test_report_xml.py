"""The aggregate report XML: valid against RFC 9990's schema and read back by parsedmarc as written."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import parsedmarc
import pytest

from authmilter import __version__
from authmilter.reports.aggregate import decode_row_key, encode_row, row_values
from authmilter.reports.model import DkimAuthResult, ReportData, ReportRow
from authmilter.reports.xml import NAMESPACE, ReporterInfo, date_range, report_xml
from historydata import record
from reportdata import PERIOD, SCHEMA, report

REPORTER = ReporterInfo("Receiver Org", "dmarc-reports@receiver.example", "https://receiver.example/dmarc")


def parsed(document: bytes) -> dict[str, Any]:
    """The report as parsedmarc reads it, offline (no DNS, no downloads)."""
    result: dict[str, Any] = parsedmarc.parse_aggregate_report_xml(
        document, offline=True, always_use_local_files=True
    )
    return result


def expected_record(row: ReportRow) -> dict[str, Any]:
    key = row.key
    return {
        "ip": key.source_ip,
        "count": row.count,
        "disposition": key.disposition,
        "dkim": key.dkim,
        "spf": key.spf,
        "reasons": [(r.type, r.comment or None) for r in key.reasons],
        "header_from": key.header_from,
        # parsedmarc fills an empty envelope_from (null sender) with the SPF domain.
        "envelope_from": key.envelope_from or key.spf_results[0].domain,
        "envelope_to": key.envelope_to or None,
        "dkim_results": sorted((d.domain, d.selector, d.result) for d in key.dkim_results),
        "spf_results": [(s.domain, s.scope, s.result) for s in key.spf_results],
    }


def read_record(record: dict[str, Any]) -> dict[str, Any]:
    evaluated = record["policy_evaluated"]
    identifiers = record["identifiers"]
    auth = record["auth_results"]
    return {
        "ip": record["source"]["ip_address"],
        "count": record["count"],
        "disposition": evaluated["disposition"],
        "dkim": evaluated["dkim"],
        "spf": evaluated["spf"],
        "reasons": [(r["type"], r["comment"]) for r in evaluated["policy_override_reasons"]],
        "header_from": identifiers["header_from"],
        "envelope_from": identifiers["envelope_from"],
        "envelope_to": identifiers["envelope_to"] or None,
        "dkim_results": sorted((d["domain"], d["selector"], d["result"]) for d in auth["dkim"]),
        "spf_results": [(s["domain"], s["scope"], s["result"]) for s in auth["spf"]],
    }


def variants() -> list[ReportData]:
    base = report()
    no_sp = replace(base, policy=replace(base.policy, p="none", sp=None, np=None, testing="y"))
    psl = replace(base, policy=replace(base.policy, discovery_method="psl", np="reject", fo="d:s"))
    one_row = replace(base, rows=base.rows[:1])
    return [base, no_sp, psl, one_row]


@pytest.mark.parametrize("data", variants(), ids=["full", "p-none-no-sp", "psl-np", "one-row"])
def test_every_report_is_valid_against_the_rfc9990_schema(data: ReportData) -> None:
    SCHEMA.validate(report_xml(data, REPORTER, "0123abcd"))


@pytest.mark.parametrize("data", variants(), ids=["full", "p-none-no-sp", "psl-np", "one-row"])
def test_parsedmarc_reads_back_what_went_in(data: ReportData) -> None:
    result = parsed(report_xml(data, REPORTER, "0123abcd"))
    assert result["xml_namespace"] == NAMESPACE
    metadata = result["report_metadata"]
    assert (metadata["org_name"], metadata["org_email"], metadata["report_id"]) == (
        REPORTER.org_name,
        REPORTER.email,
        "0123abcd",
    )
    assert metadata["org_extra_contact_info"] == REPORTER.extra_contact_info
    assert metadata["generator"] == f"authmilter {__version__}"
    assert metadata["errors"] == []
    published = result["policy_published"]
    assert published["domain"] == data.policy.domain
    assert published["p"] == data.policy.p
    assert (published["adkim"], published["aspf"], published["testing"]) == (
        data.policy.adkim,
        data.policy.aspf,
        data.policy.testing,
    )
    assert published["discovery_method"] == data.policy.discovery_method
    assert [read_record(r) for r in result["records"]] == [expected_record(r) for r in data.rows]
    assert sum(r["count"] for r in result["records"]) == sum(r.count for r in data.rows)


def test_date_range_covers_the_period_with_both_bounds_included() -> None:
    assert date_range(PERIOD) == (PERIOD.begin, PERIOD.end - 1)
    metadata = parsed(report_xml(report(), REPORTER, "x1"))["report_metadata"]
    assert (metadata["begin_date"], metadata["end_date"]) == ("2025-12-05 00:00:00", "2025-12-05 23:59:59")


def test_absent_sp_and_np_are_written_with_their_defaults() -> None:
    # RFC 9990: "Unspecified tags have their default values"; RFC 9989 §4.7: sp = p, np = sp.
    base = report()
    data = replace(base, policy=replace(base.policy, p="quarantine", sp=None, np=None))
    published = parsed(report_xml(data, REPORTER, "x1"))["policy_published"]
    assert (published["p"], published["sp"], published["np"]) == ("quarantine", "quarantine", "quarantine")
    data = replace(base, policy=replace(base.policy, p="reject", sp="none", np=None))
    published = parsed(report_xml(data, REPORTER, "x1"))["policy_published"]
    assert (published["sp"], published["np"]) == ("none", "none")


def test_the_same_report_gives_the_same_bytes() -> None:
    assert report_xml(report(), REPORTER, "x1") == report_xml(report(), REPORTER, "x1")


def test_optional_elements_are_left_out_when_empty() -> None:
    document = report_xml(report(), ReporterInfo("Org", "a@receiver.example"), "x1")
    SCHEMA.validate(document)
    assert b"extra_contact_info" not in document
    assert b"<human_result" in document  # present where the input has one
    assert document.count(b"<envelope_to>") == 3  # the null-sender row has none
    assert b"<envelope_from />" in document  # "MAY be existing but empty" for the null sender


def test_characters_xml_cannot_carry_are_dropped_and_markup_is_escaped() -> None:
    base = report()
    row = base.rows[1]
    hostile = replace(
        row.key,
        dkim_results=(DkimAuthResult("sender.example", "s1\x00", "fail", "bad\x01 <key> & \x1b[31mred"),),
    )
    data = replace(base, rows=(replace(row, key=hostile),))
    document = report_xml(data, REPORTER, "x1")
    SCHEMA.validate(document)
    dkim = parsed(document)["records"][0]["auth_results"]["dkim"][0]
    assert dkim["selector"] == "s1"
    assert dkim["human_result"] == "bad <key> & [31mred"


def test_dkim_results_put_the_strictly_aligned_pass_first() -> None:
    # RFC 9990 "DKIM Signatures in Aggregate Reports": the order of preference.
    document = report_xml(report(), REPORTER, "x1")
    dkim = parsed(document)["records"][0]["auth_results"]["dkim"]
    assert [d["domain"] for d in dkim] == ["sender.example", "esp.example"]


def test_only_the_mail_from_spf_result_is_written() -> None:
    # The schema allows one spf element, of scope mfrom ("the only valid value").
    base = report()
    row = base.rows[0]
    key = replace(row.key, spf_results=(*row.key.spf_results, replace(row.key.spf_results[0], scope="helo")))
    document = report_xml(replace(base, rows=(replace(row, key=key),)), REPORTER, "x1")
    SCHEMA.validate(document)
    assert document.count(b"<scope>") == 1


def test_a_trusted_forwarder_override_in_the_history_is_the_reason_of_its_report_row() -> None:
    """ARC (issue 15): a trusted sealer's override, as the daemon records it, reaches the report's
    row through the store's encoding, and a reader of the report sees it (RFC 9990 PolicyOverrideType)."""
    made = record(aligned=False, action="accept")
    comment = "arc=pass sealed by lists.example.org"
    override = [{"type": "trusted_forwarder", "comment": comment}]
    made["policy_evaluated"].update(disposition="none", reasons=override)
    key = decode_row_key(encode_row(row_values(made)))
    data = replace(report(), rows=(ReportRow(key, 1),))
    document = report_xml(data, ReporterInfo("Receiver Org", "dmarc-reports@receiver.example"), "id1")
    SCHEMA.validate(document)
    [only] = parsed(document)["records"]
    evaluated = only["policy_evaluated"]
    assert evaluated["disposition"] == "none"
    assert [(r["type"], r["comment"]) for r in evaluated["policy_override_reasons"]] == [
        ("trusted_forwarder", comment)
    ]

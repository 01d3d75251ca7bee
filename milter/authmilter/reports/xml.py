"""One report's data -> the aggregate report XML of RFC 9990 (namespace ``urn:ietf:params:xml:ns:dmarc-2.0``).

The document follows the schema of RFC 9990 Appendix A (draft -32, ``dmarc-xml-0.2.xsd``) and the
element order its tables require ("The elements in this table MUST appear in the order listed").
Choices made where RFC 9990 leaves room:

- ``date_range``: ``begin`` is the first second of the period and ``end`` its last second
  (``period.end - 1``): the period is [begin, end) and RFC 9990 counts both bounds in.
- ``policy_published``: "Unspecified tags have their default values", so an absent ``sp`` is
  written as ``p`` and an absent ``np`` as ``sp`` (RFC 9989 §4.7). ``psd`` has no element.
- ``auth_results``: every DKIM result, in RFC 9990's order of preference (passing and aligned first)
  when a row has more than the 100 it allows; one SPF result, the MAIL FROM one (``scope`` ``mfrom``
  is "the only valid value").
- The output is a pure function of its arguments (no clock, no random id), so a report sent again
  after a crash is the same document.
- Every text is stripped of the characters XML 1.0 cannot carry: history values come from mail.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from authmilter import __version__
from authmilter.reports.model import (
    DkimAuthResult,
    PolicyPublished,
    ReportData,
    ReportPeriod,
    ReportRow,
    SpfAuthResult,
)

NAMESPACE = "urn:ietf:params:xml:ns:dmarc-2.0"
# RFC 9990, "First Level Elements": version "MUST have the value 1.0".
VERSION = "1.0"
# RFC 9990, "DKIM Signatures in Aggregate Reports": "no more than 100 signatures for a given row".
MAX_DKIM_RESULTS_PER_ROW = 100
GENERATOR = f"authmilter {__version__}"
_DISCOVERY_METHODS = frozenset({"psl", "treewalk"})
_ALIGNMENT_MODES = frozenset({"r", "s"})
_TESTING_VALUES = frozenset({"y", "n"})
# XML 1.0 §2.2 Char: everything else cannot appear in a document, not even escaped.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class ReporterInfo:
    """Who reports (``report_metadata``).

    Attributes:
        org_name: the Reporting Organization's name.
        email: its contact address.
        extra_contact_info: more contact details; omitted when empty.
        generator: the generating software's name and version.
    """

    org_name: str
    email: str
    extra_contact_info: str = ""
    generator: str = GENERATOR


def date_range(period: ReportPeriod) -> tuple[int, int]:
    """The ``begin`` and ``end`` written for ``period``, also used in the file name."""
    return period.begin, period.end - 1


def report_xml(report: ReportData, reporter: ReporterInfo, report_id: str) -> bytes:
    """The aggregate report document, UTF-8 with an XML declaration.

    Args:
        report: one policy domain over one period.
        reporter: the ``report_metadata`` contents.
        report_id: the Report-ID, identical to the file name's unique-id (RFC 9990, "Unique
            Identifiers in Aggregate Reporting").

    Returns:
        The document; the same arguments always give the same bytes.
    """
    root = ET.Element(_tag("feedback"))
    _text(root, "version", VERSION)
    _add_metadata(root, report.period, reporter, report_id)
    _add_policy(root, report.policy)
    for row in report.rows:
        _add_record(root, row)
    ET.indent(root)
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True, default_namespace=NAMESPACE)
    return document + b"\n"


def _tag(name: str) -> str:
    return f"{{{NAMESPACE}}}{name}"


def _text(parent: ET.Element, name: str, value: str) -> ET.Element:
    element = ET.SubElement(parent, _tag(name))
    element.text = _NOT_XML_CHAR.sub("", value)
    return element


def _add_metadata(root: ET.Element, period: ReportPeriod, reporter: ReporterInfo, report_id: str) -> None:
    metadata = ET.SubElement(root, _tag("report_metadata"))
    _text(metadata, "org_name", reporter.org_name)
    _text(metadata, "email", reporter.email)
    if reporter.extra_contact_info:
        _text(metadata, "extra_contact_info", reporter.extra_contact_info)
    _text(metadata, "report_id", report_id)
    dates = ET.SubElement(metadata, _tag("date_range"))
    begin, end = date_range(period)
    _text(dates, "begin", str(begin))
    _text(dates, "end", str(end))
    _text(metadata, "generator", reporter.generator)


def _add_policy(root: ET.Element, policy: PolicyPublished) -> None:
    published = ET.SubElement(root, _tag("policy_published"))
    _text(published, "domain", policy.domain)
    if policy.discovery_method in _DISCOVERY_METHODS:
        _text(published, "discovery_method", policy.discovery_method)
    # A record without a valid p is applied as p=none when it has a rua (RFC 9989 §4.10.1), and
    # only records with a rua are reported on.
    p = policy.p or "none"
    sp = policy.sp or p
    _text(published, "p", p)
    _text(published, "sp", sp)
    _text(published, "np", policy.np or sp)
    if policy.fo:
        _text(published, "fo", policy.fo)
    if policy.adkim in _ALIGNMENT_MODES:
        _text(published, "adkim", policy.adkim)
    if policy.aspf in _ALIGNMENT_MODES:
        _text(published, "aspf", policy.aspf)
    if policy.testing in _TESTING_VALUES:
        _text(published, "testing", policy.testing)


def _add_record(root: ET.Element, row: ReportRow) -> None:
    key = row.key
    record = ET.SubElement(root, _tag("record"))
    row_element = ET.SubElement(record, _tag("row"))
    _text(row_element, "source_ip", key.source_ip)
    _text(row_element, "count", str(row.count))
    evaluated = ET.SubElement(row_element, _tag("policy_evaluated"))
    _text(evaluated, "disposition", key.disposition)
    _text(evaluated, "dkim", key.dkim)
    _text(evaluated, "spf", key.spf)
    for reason in key.reasons:
        reason_element = ET.SubElement(evaluated, _tag("reason"))
        _text(reason_element, "type", reason.type)
        if reason.comment:
            _text(reason_element, "comment", reason.comment)
    identifiers = ET.SubElement(record, _tag("identifiers"))
    _text(identifiers, "header_from", key.header_from)
    # "MAY be existing but empty if the message had a null reverse-path".
    _text(identifiers, "envelope_from", key.envelope_from)
    if key.envelope_to:
        _text(identifiers, "envelope_to", key.envelope_to)
    auth_results = ET.SubElement(record, _tag("auth_results"))
    for dkim in _preferred_dkim_results(key.dkim_results, key.header_from):
        _add_dkim(auth_results, dkim)
    spf = next((s for s in key.spf_results if s.scope == "mfrom"), None)
    if spf is not None:
        _add_spf(auth_results, spf)


def _preferred_dkim_results(results: tuple[DkimAuthResult, ...], header_from: str) -> list[DkimAuthResult]:
    # RFC 9990, "DKIM Signatures in Aggregate Reports": passing in strict alignment first, then the
    # other passing ones (relaxed alignment is not told apart: Organizational Domains are not known
    # here), then those that did not pass. The sort is stable: header order otherwise.
    def rank(result: DkimAuthResult) -> int:
        if result.result != "pass":
            return 2
        return 0 if result.domain == header_from else 1

    return sorted(results, key=rank)[:MAX_DKIM_RESULTS_PER_ROW]


def _add_dkim(parent: ET.Element, dkim: DkimAuthResult) -> None:
    element = ET.SubElement(parent, _tag("dkim"))
    _text(element, "domain", dkim.domain)
    _text(element, "selector", dkim.selector)
    _text(element, "result", dkim.result)
    if dkim.human_result:
        _text(element, "human_result", dkim.human_result)


def _add_spf(parent: ET.Element, spf: SpfAuthResult) -> None:
    element = ET.SubElement(parent, _tag("spf"))
    _text(element, "domain", spf.domain)
    _text(element, "scope", spf.scope)
    _text(element, "result", spf.result)
    if spf.human_result:
        _text(element, "human_result", spf.human_result)

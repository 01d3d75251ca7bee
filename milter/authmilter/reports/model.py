"""The data of one DMARC aggregate report (RFC 9990), as the store hands it to the XML builder."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportPeriod:
    """A reporting period [begin, end) in seconds since the epoch, UTC."""

    begin: int
    end: int


@dataclass(frozen=True)
class PolicyPublished:
    """The DMARC record as published (history record's ``policy_published``)."""

    domain: str
    p: str | None
    sp: str | None
    np: str | None
    adkim: str
    aspf: str
    testing: str
    psd: str
    fo: str
    discovery_method: str
    rua: tuple[str, ...]


@dataclass(frozen=True)
class DkimAuthResult:
    domain: str
    selector: str
    result: str
    human_result: str = ""


@dataclass(frozen=True)
class SpfAuthResult:
    domain: str
    scope: str
    result: str
    human_result: str = ""


@dataclass(frozen=True)
class OverrideReason:
    type: str
    comment: str = ""


@dataclass(frozen=True)
class RowKey:
    """What RFC 9990 groups a row by: one per distinct combination within a report."""

    source_ip: str
    disposition: str
    dkim: str
    spf: str
    reasons: tuple[OverrideReason, ...]
    header_from: str
    envelope_from: str
    envelope_to: str
    dkim_results: tuple[DkimAuthResult, ...]
    spf_results: tuple[SpfAuthResult, ...]


@dataclass(frozen=True)
class ReportRow:
    key: RowKey
    count: int


@dataclass(frozen=True)
class ReportData:
    """One report: a policy domain over one period, with the policy last seen in it."""

    policy_domain: str
    period: ReportPeriod
    policy: PolicyPublished
    rows: tuple[ReportRow, ...]
    reporting_hosts: tuple[str, ...]

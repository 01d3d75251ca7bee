"""Report data for the report tests: a small, varied ReportData, an in-memory ReportStore, the schema."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import xmlschema

from authmilter.reports.model import (
    DkimAuthResult,
    OverrideReason,
    PolicyPublished,
    ReportData,
    ReportPeriod,
    ReportRow,
    RowKey,
    SpfAuthResult,
)

# RFC 9990 Appendix A as of draft -32 (copied from the IETF WG repository, dmarc-xml-0.2.xsd).
SCHEMA = xmlschema.XMLSchema(str(Path(__file__).parent / "data" / "rfc9990-draft32.xsd"))
DAY = 86400
# 2025-12-05 00:00:00 UTC.
PERIOD = ReportPeriod(1764892800, 1764892800 + DAY)


RUA = ("mailto:dmarc@sender.example",)


def policy(domain: str = "sender.example", rua: tuple[str, ...] = RUA) -> PolicyPublished:
    return PolicyPublished(
        domain=domain,
        p="reject",
        sp="quarantine",
        np=None,
        adkim="s",
        aspf="r",
        testing="n",
        psd="n",
        fo="1",
        discovery_method="treewalk",
        rua=rua,
    )


def rows(domain: str = "sender.example") -> tuple[ReportRow, ...]:
    """Four rows: a pass with two signatures, a reject, a test-mode override over IPv6, a null sender."""
    return (
        ReportRow(
            RowKey(
                source_ip="192.0.2.25",
                disposition="pass",
                dkim="pass",
                spf="pass",
                reasons=(),
                header_from=domain,
                envelope_from=domain,
                envelope_to="receiver.example",
                dkim_results=(
                    DkimAuthResult("esp.example", "s2", "pass"),
                    DkimAuthResult(domain, "s1", "pass"),
                ),
                spf_results=(SpfAuthResult(domain, "mfrom", "pass"),),
            ),
            count=12,
        ),
        ReportRow(
            RowKey(
                source_ip="198.51.100.7",
                disposition="reject",
                dkim="fail",
                spf="fail",
                reasons=(),
                header_from=domain,
                envelope_from="bounce.attacker.example",
                envelope_to="receiver.example",
                dkim_results=(DkimAuthResult(domain, "s1", "fail", "body hash mismatch"),),
                spf_results=(SpfAuthResult("bounce.attacker.example", "mfrom", "softfail", "not permitted"),),
            ),
            count=3,
        ),
        ReportRow(
            RowKey(
                source_ip="2001:db8::25",
                disposition="quarantine",
                dkim="fail",
                spf="fail",
                reasons=(OverrideReason("policy_test_mode", "t=y: reject applied as quarantine"),),
                header_from=f"news.{domain}",
                envelope_from=f"news.{domain}",
                envelope_to="other.receiver.example",
                dkim_results=(),
                spf_results=(SpfAuthResult(f"news.{domain}", "mfrom", "none"),),
            ),
            count=1,
        ),
        ReportRow(
            RowKey(
                source_ip="203.0.113.9",
                disposition="none",
                dkim="fail",
                spf="fail",
                reasons=(OverrideReason("local_policy", "local override (never_reject_networks)"),),
                header_from=domain,
                envelope_from="",
                envelope_to="",
                dkim_results=(DkimAuthResult(domain, "s1", "temperror"),),
                spf_results=(SpfAuthResult("mx.relay.example", "mfrom", "none"),),
            ),
            count=2,
        ),
    )


def report(
    domain: str = "sender.example",
    rua: tuple[str, ...] = RUA,
    period: ReportPeriod = PERIOD,
) -> ReportData:
    return ReportData(domain, period, policy(domain, rua), rows(domain), ("mx1.receiver.example",))


@dataclass
class MemoryStore:
    """The ReportStore protocol over a list: what authmilter.reports.store provides, in memory."""

    reports: list[ReportData]
    delivered: dict[tuple[str, ReportPeriod], str] = field(default_factory=dict)
    locked: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def due_reports(self, until: int) -> Iterator[ReportData]:
        for r in list(self.reports):
            if r.period.end <= until and (r.policy_domain, r.period) not in self.delivered:
                yield r

    def mark_delivered(self, policy_domain: str, period: ReportPeriod, report_id: str) -> None:
        assert self.locked, "mark_delivered outside send_lock"
        self.delivered[(policy_domain, period)] = report_id

    @contextlib.contextmanager
    def send_lock(self) -> Iterator[None]:
        with self._lock:
            self.locked = True
            try:
                yield
            finally:
                self.locked = False


def with_rua(data: ReportData, *rua: str) -> ReportData:
    return replace(data, policy=replace(data.policy, rua=rua))

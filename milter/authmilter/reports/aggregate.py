"""History records → the row keys and policies a report is made of, and back from the store.

Pure functions over plain data (no I/O). The store keeps each distinct row key as canonical JSON
(:func:`encode_row`) with a count, and the policy last seen in each period as JSON
(:func:`encode_policy`); :func:`report_data` rebuilds what the XML builder takes.

Decisions (docs/history-schema.md lists the record's keys):

- The row key is RFC 9990's grouping: ``source_ip``, ``policy_evaluated`` (disposition, dkim,
  spf, reasons), ``identifiers`` and ``auth_results``. ``human_result`` is part of an auth result
  element, so two messages whose explanations differ land in different rows.
- ``envelope_to``: a report row carries one ``identifiers/envelope_to``; a record may list
  several recipient domains. The row takes the first one (RCPT order), "" when there is none,
  so a message is counted once, never once per recipient domain.
- ``auth_results.spf_helo`` is not part of a row: RFC 9990 reports the SPF identity DMARC used
  (MAIL FROM); the HELO check stays in the history file.
- ``dkim_omitted`` signatures beyond the history's bound are not reported (they were not kept).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

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

# Source addresses listed per domain by `report show`.
TOP_SOURCES = 5


class RecordProblem(ValueError):
    """A record of a known version whose keys are missing or of the wrong type."""


def row_values(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of a record that make its RFC 9990 row, as a hashable tuple.

    Cheap, and checked only for shape: :func:`encode_row` checks the values themselves, once per
    distinct tuple (equal values make the same row), so an importer pays for that once per row,
    not once per message.

    Raises:
        RecordProblem: a key is missing, a list is not a list, or an object stands where a
            value belongs.
    """
    try:
        evaluated = record["policy_evaluated"]
        auth = record["auth_results"]
        spf = auth["spf"]
        values = (
            record["source_ip"],
            evaluated["disposition"],
            evaluated["dkim"],
            evaluated["spf"],
            tuple([(r["type"], r.get("comment", "")) for r in _list(evaluated["reasons"])]),
            record["header_from"],
            record["envelope_from"],
            tuple(_list(record["envelope_to"])[:1]),
            tuple(
                [(d["domain"], d["selector"], d["result"], d["human_result"]) for d in _list(auth["dkim"])]
            ),
            None if spf is None else (spf["domain"], spf["scope"], spf["result"], spf["human_result"]),
        )
        hash(values)
    except (KeyError, TypeError, AttributeError) as e:
        raise RecordProblem(f"no usable row: {type(e).__name__} {e}") from None
    return values


def encode_row(values: tuple[Any, ...]) -> str:
    """The stored form of a row key: canonical JSON of :func:`row_values`' values.

    A list of the RowKey fields in declaration order (``envelope_to`` the first recipient domain
    or "", ``spf_results`` a list of none or one); :func:`decode_row_key` reads it back. Stable
    across versions of this code: its digest identifies the row in the store.

    Raises:
        RecordProblem: a value is not a string.
    """
    ip, disposition, dkim, spf, reasons, header_from, envelope_from, to, dkims, spf_result = values
    spf_results = () if spf_result is None else (spf_result,)
    texts = (ip, disposition, dkim, spf, header_from, envelope_from, *to)
    nested = (*reasons, *dkims, *spf_results)
    if not all(type(t) is str for t in texts) or not all(type(t) is str for item in nested for t in item):
        raise RecordProblem("no usable row: a value is not a string")
    row = [
        ip,
        disposition,
        dkim,
        spf,
        reasons,
        header_from,
        envelope_from,
        to[0] if to else "",
        dkims,
        spf_results,
    ]
    return json.dumps(row, ensure_ascii=True, separators=(",", ":"))


def row_key(record: Mapping[str, Any]) -> RowKey:
    """The RFC 9990 row a history record counts in.

    Raises:
        RecordProblem: a key the row needs is missing or not of the documented type.
    """
    return decode_row_key(encode_row(row_values(record)))


def policy_published(raw: Mapping[str, Any]) -> PolicyPublished:
    """A record's ``policy_published`` object as the model's value.

    Raises:
        RecordProblem: a key is missing or not of the documented type.
    """
    try:
        return PolicyPublished(
            domain=_text(raw["domain"]),
            p=_optional_text(raw["p"]),
            sp=_optional_text(raw["sp"]),
            np=_optional_text(raw["np"]),
            adkim=_text(raw["adkim"]),
            aspf=_text(raw["aspf"]),
            testing=_text(raw["testing"]),
            psd=_text(raw["psd"]),
            fo=_text(raw["fo"]),
            discovery_method=_text(raw["discovery_method"]),
            rua=tuple(_text(uri) for uri in _list(raw["rua"])),
        )
    except (KeyError, TypeError) as e:
        raise RecordProblem(f"no usable policy_published: {type(e).__name__} {e}") from None


def policy_values(raw: Mapping[str, Any]) -> tuple[Any, ...]:
    """What :func:`policy_published` reads, as a hashable tuple (see :func:`row_values`).

    Raises:
        RecordProblem: a key is missing, or a list or object stands where a value belongs.
    """
    try:
        values = (
            raw["domain"],
            raw["p"],
            raw["sp"],
            raw["np"],
            raw["adkim"],
            raw["aspf"],
            raw["testing"],
            raw["psd"],
            raw["fo"],
            raw["discovery_method"],
            tuple(raw["rua"]),
        )
        hash(values)
    except (KeyError, TypeError) as e:
        raise RecordProblem(f"no usable policy_published: {type(e).__name__} {e}") from None
    return values


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    # A string is iterable too: taking its letters for the items would be a silent misreading.
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


# ---------------------------------------------------------------------------------------------
# Stored forms


def decode_row_key(text: str) -> RowKey:
    """The row key :func:`encode_row` wrote."""
    ip, disposition, dkim, spf, reasons, header_from, envelope_from, envelope_to, dkims, spfs = json.loads(
        text
    )
    return RowKey(
        source_ip=ip,
        disposition=disposition,
        dkim=dkim,
        spf=spf,
        reasons=tuple(OverrideReason(*r) for r in reasons),
        header_from=header_from,
        envelope_from=envelope_from,
        envelope_to=envelope_to,
        dkim_results=tuple(DkimAuthResult(*d) for d in dkims),
        spf_results=tuple(SpfAuthResult(*s) for s in spfs),
    )


def row_digest(encoded_key: str) -> str:
    """A short, stable identifier of an encoded row key (the store's primary key part)."""
    return hashlib.blake2b(encoded_key.encode("ascii"), digest_size=16).hexdigest()


def encode_policy(policy: PolicyPublished) -> str:
    """The policy as JSON, with the history file's key names."""
    fields = {name: getattr(policy, name) for name in PolicyPublished.__dataclass_fields__}
    fields["rua"] = list(policy.rua)
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":"))


def decode_policy(text: str) -> PolicyPublished:
    """The policy :func:`encode_policy` wrote."""
    return policy_published(json.loads(text))


def report_data(
    policy_domain: str,
    period: ReportPeriod,
    policy_json: str,
    rows: Iterable[tuple[str, int]],
    reporting_hosts: Iterable[str],
) -> ReportData:
    """One report from what the store holds for a domain and period.

    Args:
        policy_domain: the domain the report is about.
        period: the reporting period.
        policy_json: the policy last seen in the period (:func:`encode_policy`).
        rows: (encoded row key, message count) pairs.
        reporting_hosts: the hosts whose records the counts include.
    """
    return ReportData(
        policy_domain=policy_domain,
        period=period,
        policy=decode_policy(policy_json),
        rows=tuple(ReportRow(decode_row_key(key), count) for key, count in rows),
        reporting_hosts=tuple(sorted(set(reporting_hosts))),
    )


# ---------------------------------------------------------------------------------------------
# `report show`: what one policy domain's rows add up to


@dataclass
class DomainSummary:
    """Messages of one policy domain, counted by result (``authmilter report show``).

    ``dmarc`` is pass when an aligned SPF or DKIM passed (RFC 9989 §4.4), else fail. ``spf`` and
    ``dkim`` are the raw results: SPF of the MAIL FROM (none when there was no check), DKIM
    pass when any signature passed, fail when signed but none passed, none when unsigned.
    """

    policy_domain: str
    messages: int = 0
    dmarc: Counter[str] = field(default_factory=Counter)
    spf_aligned: Counter[str] = field(default_factory=Counter)
    dkim_aligned: Counter[str] = field(default_factory=Counter)
    spf: Counter[str] = field(default_factory=Counter)
    dkim: Counter[str] = field(default_factory=Counter)
    dispositions: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)

    def add(self, key: RowKey, count: int) -> None:
        """Count ``count`` messages of the row ``key``."""
        self.messages += count
        self.dmarc["pass" if "pass" in (key.dkim, key.spf) else "fail"] += count
        self.spf_aligned[key.spf] += count
        self.dkim_aligned[key.dkim] += count
        self.spf[key.spf_results[0].result if key.spf_results else "none"] += count
        self.dkim[_message_dkim(key.dkim_results)] += count
        self.dispositions[key.disposition] += count
        self.sources[key.source_ip] += count

    def as_json(self) -> dict[str, Any]:
        """The summary as plain JSON types, sources limited to the top ones."""
        return {
            "policy_domain": self.policy_domain,
            "messages": self.messages,
            "dmarc": dict(self.dmarc),
            "spf_aligned": dict(self.spf_aligned),
            "dkim_aligned": dict(self.dkim_aligned),
            "spf": dict(self.spf),
            "dkim": dict(self.dkim),
            "dispositions": dict(self.dispositions),
            "top_sources": [{"source_ip": ip, "messages": n} for ip, n in self.top_sources()],
        }

    def top_sources(self) -> list[tuple[str, int]]:
        """The busiest source addresses, most messages first (ties by address)."""
        return sorted(self.sources.items(), key=lambda item: (-item[1], item[0]))[:TOP_SOURCES]


def _message_dkim(results: tuple[DkimAuthResult, ...]) -> str:
    if not results:
        return "none"
    return "pass" if any(r.result == "pass" for r in results) else "fail"

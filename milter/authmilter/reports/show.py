"""``authmilter report show``: what the store holds per policy domain, before reports go out.

Also the line ``report send`` and ``report prune`` print about the periods pruned.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from authmilter.reports.aggregate import DomainSummary
from authmilter.reports.store import PeriodState, PruneOutcome, Store


def show(store: Store, *, since: int = 0, domain: str | None = None, as_json: bool = False) -> str:
    """Per policy domain: messages, DMARC / aligned SPF / aligned DKIM / raw SPF and DKIM results,
    dispositions, top source addresses, and its periods (how many not yet reported, where to).

    Args:
        store: the open store.
        since: only periods that end after this time (seconds since the epoch).
        domain: only this policy domain.
        as_json: a JSON list instead of text.

    Raises:
        StoreError: the database failed.
    """
    periods: dict[str, list[PeriodState]] = {}
    for state in store.periods(since, domain):
        periods.setdefault(state.policy_domain, []).append(state)
    summaries = store.summaries(since, domain)
    if as_json:
        return json.dumps([_as_json(s, periods.get(s.policy_domain, [])) for s in summaries], indent=2)
    if not summaries:
        return "no records in the report store" + (f" for {domain}" if domain else "")
    return "\n\n".join(_as_text(s, periods.get(s.policy_domain, [])) for s in summaries)


def _as_json(summary: DomainSummary, periods: list[PeriodState]) -> dict[str, Any]:
    return {
        **summary.as_json(),
        "periods": [
            {"begin": p.period.begin, "end": p.period.end, "report_id": p.report_id} for p in periods
        ],
        "rua": list(periods[-1].rua) if periods else [],
    }


def _as_text(summary: DomainSummary, periods: list[PeriodState]) -> str:
    unreported = sum(1 for p in periods if p.report_id is None)
    rua = periods[-1].rua if periods else ()
    span = f"{_utc(periods[0].period.begin)} to {_utc(periods[-1].period.end)}" if periods else ""
    lines = [
        f"{summary.policy_domain}: {summary.messages} message(s), {span}, {len(periods)} period(s), "
        f"{unreported} not yet reported",
        f"  reports to    {', '.join(rua) if rua else '(no rua in the DMARC record: no report is sent)'}",
        f"  DMARC         {_counts(summary.dmarc)}",
        f"  SPF aligned   {_counts(summary.spf_aligned)}",
        f"  DKIM aligned  {_counts(summary.dkim_aligned)}",
        f"  SPF           {_counts(summary.spf)}",
        f"  DKIM          {_counts(summary.dkim)}",
        f"  disposition   {_counts(summary.dispositions)}",
        f"  top sources   {_sources(summary.top_sources())}",
    ]
    return "\n".join(lines)


def prune_line(outcome: PruneOutcome, *, keep_days: int, before: int, dry_run: bool = False) -> str:
    """What :meth:`Store.prune` deleted (or, with ``dry_run``, would delete), in one line.

    Args:
        outcome: the prune's outcome.
        keep_days: ``[reports] keep_days``, named in the line.
        before: the cutoff the prune was given (seconds since the epoch).
        dry_run: the prune only counted.
    """
    prefix, verb = ("dry run: ", "would remove") if dry_run else ("", "removed")
    line = (
        f"{prefix}{verb} {outcome.periods} period(s) that ended before {_utc(before)} "
        f"([reports] keep_days = {keep_days})"
    )
    if outcome.history_files:
        line += (
            f", and the import offsets of {outcome.history_files} history file(s) last imported a "
            "period and a day before that"
        )
    if not outcome.undelivered:
        return line
    if dry_run:
        return (
            f"{line}; {outcome.undelivered} of them have a report due and not delivered, lost once "
            "removed: run `authmilter report send` and fix what its log says keeps them, or raise "
            "[reports] keep_days"
        )
    return (
        f"{line}; {outcome.undelivered} of them had a report due and never delivered, now lost: the "
        "log of earlier `report send` runs says why (relay, DNS); raise [reports] keep_days if "
        "sending may stay blocked that long"
    )


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counter.items()))


def _sources(top: list[tuple[str, int]]) -> str:
    return ", ".join(f"{ip or '(unknown)'} {count}" for ip, count in top)


def _utc(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")

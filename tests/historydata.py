"""History records (docs/history-schema.md, version 1) for the report tests and the benchmark.

The daemon writes these through history.make_record; the tests of the report store need many
variants cheaply, so this builds the same JSON directly (tests/integration proves the real daemon's
file imports too).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from authmilter.history import encode_record

# 2026-12-05 00:00:00 UTC: a day boundary.
DAY = 1796428800
HOUR = 3600

_TEMPLATE: dict[str, Any] = {
    "v": 1,
    "time": DAY + 10 * HOUR,
    "reporting_host": "mx1.receiver.example",
    "queue_id": "4XyZ1x2ABC",
    "source_ip": "192.0.2.25",
    "helo": "mx.sender.example",
    "header_from": "sender.example",
    "from_domains": ["sender.example"],
    "envelope_from": "sender.example",
    "envelope_to": ["receiver.example"],
    "envelope_to_omitted": 0,
    "dmarc": {
        "result": "pass",
        "policy": "reject",
        "disposition": "none",
        "org_domain": "sender.example",
        "spf_aligned": True,
        "dkim_aligned": True,
        "reason": "",
    },
    "policy_published": {
        "domain": "sender.example",
        "p": "reject",
        "sp": None,
        "np": None,
        "adkim": "r",
        "aspf": "r",
        "testing": "n",
        "psd": "u",
        "fo": "0",
        "discovery_method": "treewalk",
        "rua": ["mailto:dmarc@sender.example"],
    },
    "policy_evaluated": {"disposition": "pass", "dkim": "pass", "spf": "pass", "reasons": []},
    "action": "accept",
    "auth_results": {
        "spf": {"domain": "sender.example", "scope": "mfrom", "result": "pass", "human_result": ""},
        "spf_helo": {"domain": "mx.sender.example", "scope": "helo", "result": "pass", "human_result": ""},
        "dkim": [{"domain": "sender.example", "selector": "s1", "result": "pass", "human_result": ""}],
        "dkim_omitted": 0,
    },
}


def record(
    *,
    domain: str = "sender.example",
    time: int | None = None,
    source_ip: str = "192.0.2.25",
    host: str = "mx1.receiver.example",
    aligned: bool = True,
    **top: Any,
) -> dict[str, Any]:
    """A version-1 record of a message from ``domain``; ``top`` replaces top-level keys.

    ``aligned=False`` gives a DMARC failure (SPF and DKIM fail, rejected).
    """
    made = copy.deepcopy(_TEMPLATE)
    made["header_from"] = made["envelope_from"] = domain
    made["from_domains"] = [domain]
    made["policy_published"]["domain"] = domain
    made["policy_published"]["rua"] = [f"mailto:dmarc@{domain}"]
    made["dmarc"]["org_domain"] = domain
    made["source_ip"] = source_ip
    made["reporting_host"] = host
    made["auth_results"]["spf"]["domain"] = domain
    made["auth_results"]["dkim"][0]["domain"] = domain
    if time is not None:
        made["time"] = time
    if not aligned:
        made["dmarc"].update(result="fail", disposition="reject", spf_aligned=False, dkim_aligned=False)
        made["policy_evaluated"].update(disposition="reject", dkim="fail", spf="fail")
        made["action"] = "reject"
        made["auth_results"]["spf"]["result"] = "fail"
        made["auth_results"]["dkim"][0].update(result="fail", human_result="body hash mismatch")
    made.update(top)
    return made


def write_history(path: Path, records: Iterable[dict[str, Any]], mode: str = "wb") -> Path:
    """Write records as history lines (append with ``mode="ab"``)."""
    with path.open(mode) as out:
        for item in records:
            out.write(encode_record(item))
    return path

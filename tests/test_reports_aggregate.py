"""History records → row keys and policies, their stored forms, and the per-domain summaries."""

from __future__ import annotations

import pytest

from authmilter.reports.aggregate import (
    DomainSummary,
    RecordProblem,
    decode_policy,
    decode_row_key,
    encode_policy,
    encode_row,
    policy_published,
    policy_values,
    row_digest,
    row_key,
    row_values,
)
from historydata import record


def test_a_row_key_survives_its_stored_form() -> None:
    made = record(aligned=False, envelope_to=["b.example", "c.example"])
    made["policy_evaluated"]["reasons"] = [
        {"type": "policy_test_mode", "comment": "t=y: reject applied as quarantine"}
    ]
    made["auth_results"]["dkim"].append(
        {"domain": "ésp.example", "selector": "x", "result": "pass", "human_result": ""}
    )
    key = row_key(made)
    assert key.envelope_to == "b.example"
    assert decode_row_key(encode_row(row_values(made))) == key
    assert encode_row(row_values(made)).isascii()


def test_a_policy_survives_its_stored_form() -> None:
    policy = policy_published(record()["policy_published"])
    assert policy.sp is None and policy.rua == ("mailto:dmarc@sender.example",)
    assert decode_policy(encode_policy(policy)) == policy


def test_messages_of_one_row_have_equal_values_and_one_digest() -> None:
    first, second = record(time=1, queue_id="A"), record(time=2, queue_id="B", helo="other.example")
    assert row_values(first) == row_values(second)
    assert row_digest(encode_row(row_values(first))) == row_digest(encode_row(row_values(second)))
    assert row_values(first) != row_values(record(envelope_to=["other.example"]))
    assert policy_values(first["policy_published"]) == policy_values(second["policy_published"])


@pytest.mark.parametrize(
    "spoil",
    [
        lambda r: r.pop("policy_evaluated"),
        lambda r: r["auth_results"].update(dkim=[{"domain": "x"}]),
        lambda r: r.update(source_ip=["192.0.2.1"]),
        lambda r: r["policy_evaluated"].update(reasons=[{"comment": "no type"}]),
    ],
)
def test_a_record_without_a_usable_row_is_a_problem(spoil: object) -> None:
    made = record()
    spoil(made)  # type: ignore[operator]
    with pytest.raises(RecordProblem):
        row_key(made)


def test_values_that_cannot_be_a_dict_key_are_a_problem() -> None:
    with pytest.raises(RecordProblem, match="unhashable"):
        row_values(record(source_ip=["192.0.2.1"]))


def test_wrongly_typed_values_are_found_by_the_check() -> None:
    made = record(source_ip=7)
    row_values(made)  # hashable: only the check finds it
    with pytest.raises(RecordProblem, match="not a string"):
        encode_row(row_values(made))
    # A string where a list belongs must not be read letter by letter.
    with pytest.raises(RecordProblem, match="expected a list"):
        policy_published({**record()["policy_published"], "rua": "mailto:x@y.example"})
    with pytest.raises(RecordProblem, match="expected a list"):
        row_key(record(envelope_to="receiver.example"))


def test_a_summary_counts_results_per_message() -> None:
    summary = DomainSummary("sender.example")
    summary.add(row_key(record()), 3)
    unsigned = record(aligned=False, source_ip="198.51.100.7")
    unsigned["auth_results"]["dkim"] = []
    unsigned["auth_results"]["spf"] = None
    summary.add(row_key(unsigned), 2)
    shown = summary.as_json()
    assert shown["messages"] == 5
    assert (shown["dmarc"], shown["spf"], shown["dkim"]) == (
        {"pass": 3, "fail": 2},
        {"pass": 3, "none": 2},
        {"pass": 3, "none": 2},
    )
    assert shown["top_sources"] == [
        {"source_ip": "192.0.2.25", "messages": 3},
        {"source_ip": "198.51.100.7", "messages": 2},
    ]

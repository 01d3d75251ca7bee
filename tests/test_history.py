"""history.py: the record (every RFC 9990 field), the writer under concurrency and rotation, the reader."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from authmilter.history import (
    MAX_DKIM_RESULTS,
    MAX_RECIPIENT_DOMAINS,
    MAX_TEXT,
    Envelope,
    HistoryError,
    HistorySettings,
    HistoryWriter,
    ReadStats,
    encode_record,
    make_record,
    read_history,
)
from authmilter.model import (
    Action,
    AuthResult,
    Disposition,
    DkimResult,
    DmarcRecord,
    DmarcVerdict,
    Reply,
    SpfResult,
    SpfScope,
    Verdict,
)

NOW = 1767225600.75
RECORD = DmarcRecord(
    policy=Disposition.REJECT,
    subdomain_policy=Disposition.QUARANTINE,
    nonexistent_policy=None,
    adkim_strict=True,
    aspf_strict=False,
    testing=False,
    psd="n",
    rua=("mailto:dmarc@sender.example",),
    failure_options="1",
    raw="v=DMARC1; p=reject; sp=quarantine; adkim=s; psd=n; fo=1; rua=mailto:dmarc@sender.example",
)
SPF = SpfResult(AuthResult.FAIL, "bounce.sender.example", SpfScope.MFROM, "x@bounce.sender.example", "not ok")
HELO = SpfResult(AuthResult.PASS, "mx.relay.example", SpfScope.HELO, "postmaster@mx.relay.example")
DKIM = (
    DkimResult(AuthResult.FAIL, "sender.example", "s1", "rsa-sha256", reason="body hash mismatch"),
    DkimResult(AuthResult.PASS, "esp.example", "ed", "ed25519-sha256", header_b="Xy9Kw2nQ"),
)
DMARC_FAIL = DmarcVerdict(
    result=AuthResult.FAIL,
    from_domain="sender.example",
    policy_domain="sender.example",
    org_domain="sender.example",
    policy=Disposition.REJECT,
    disposition=Disposition.REJECT,
    spf_aligned=False,
    dkim_aligned=False,
    record=RECORD,
    reason="no aligned SPF or DKIM",
    from_domains=("sender.example", "other.example"),
)
REJECTED = Verdict(
    spf=SPF,
    helo=HELO,
    dkim=DKIM,
    dmarc=DMARC_FAIL,
    action=Action.REJECT,
    reply=Reply("550", "5.7.26", "Rejected by the DMARC policy of sender.example"),
    reason="dmarc=fail: no aligned SPF or DKIM",
    authentication_results="mx.receiver.example; dmarc=fail",
)
ENVELOPE = Envelope(
    client_ip="IPv6:2001:DB8:0:0::25",
    mail_from="<X@Bounce.Sender.Example.>",
    recipients=("<a@Receiver.Example>", "b@receiver.example", "c@second.example", "<postmaster>"),
    helo="mx.relay.example",
    queue_id="4XyZ1x2ABC",
)


def record_of(verdict: Verdict, envelope: Envelope = ENVELOPE, mode: str = "treewalk") -> dict[str, Any]:
    return make_record(verdict, envelope, "mx.receiver.example", NOW, mode)


# ---------------------------------------------------------------------------------------------
# The record


def test_record_has_every_field() -> None:
    assert record_of(REJECTED) == {
        "v": 1,
        "time": 1767225600,
        "reporting_host": "mx.receiver.example",
        "queue_id": "4XyZ1x2ABC",
        "source_ip": "2001:db8::25",
        "helo": "mx.relay.example",
        "header_from": "sender.example",
        "from_domains": ["sender.example", "other.example"],
        "envelope_from": "bounce.sender.example",
        "envelope_to": ["receiver.example", "second.example"],
        "envelope_to_omitted": 0,
        "dmarc": {
            "result": "fail",
            "policy": "reject",
            "disposition": "reject",
            "org_domain": "sender.example",
            "spf_aligned": False,
            "dkim_aligned": False,
            "reason": "no aligned SPF or DKIM",
        },
        "policy_published": {
            "domain": "sender.example",
            "p": "reject",
            "sp": "quarantine",
            "np": None,
            "adkim": "s",
            "aspf": "r",
            "testing": "n",
            "psd": "n",
            "fo": "1",
            "discovery_method": "treewalk",
            "rua": ["mailto:dmarc@sender.example"],
        },
        "policy_evaluated": {"disposition": "reject", "dkim": "fail", "spf": "fail", "reasons": []},
        "action": "reject",
        "auth_results": {
            "spf": {
                "domain": "bounce.sender.example",
                "scope": "mfrom",
                "result": "fail",
                "human_result": "not ok",
            },
            "spf_helo": {"domain": "mx.relay.example", "scope": "helo", "result": "pass", "human_result": ""},
            "dkim": [
                {
                    "domain": "sender.example",
                    "selector": "s1",
                    "result": "fail",
                    "human_result": "body hash mismatch",
                },
                {"domain": "esp.example", "selector": "ed", "result": "pass", "human_result": ""},
            ],
            "dkim_omitted": 0,
        },
    }


def test_record_line_is_one_ascii_json_line() -> None:
    verdict = replace(REJECTED, reason="ünïcode\nand a newline", dmarc=replace(DMARC_FAIL, reason="a\r\nb"))
    line = encode_record(record_of(verdict))
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    assert json.loads(line) == record_of(verdict)


def test_discovery_method_is_the_configured_mode() -> None:
    assert record_of(REJECTED, mode="psl")["policy_published"]["discovery_method"] == "psl"


def test_aligned_results_come_from_dmarc() -> None:
    verdict = replace(REJECTED, dmarc=replace(DMARC_FAIL, result=AuthResult.PASS, dkim_aligned=True))
    evaluated = record_of(verdict)["policy_evaluated"]
    assert (evaluated["dkim"], evaluated["spf"]) == ("pass", "fail")


def test_null_sender_and_unknown_client() -> None:
    envelope = replace(ENVELOPE, mail_from="<>", client_ip="", recipients=())
    record = record_of(REJECTED, envelope)
    assert (record["envelope_from"], record["source_ip"], record["envelope_to"]) == ("", "", [])


@pytest.mark.parametrize(
    ("client_ip", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("unknown", ""),
        ("192.0.2.1\nX", ""),
    ],
)
def test_source_ip_is_a_plain_address(client_ip: str, expected: str) -> None:
    assert record_of(REJECTED, replace(ENVELOPE, client_ip=client_ip))["source_ip"] == expected


def test_without_a_record_policy_published_is_null() -> None:
    dmarc = DmarcVerdict(
        AuthResult.NONE,
        from_domain="plain.example",
        org_domain="plain.example",
        from_domains=("plain.example",),
    )
    record = record_of(replace(REJECTED, dmarc=dmarc, action=Action.ACCEPT, reply=None, reason=""))
    assert record["policy_published"] is None
    assert record["policy_evaluated"] == {"disposition": "none", "dkim": "fail", "spf": "fail", "reasons": []}


def test_without_dmarc_the_dmarc_keys_are_null() -> None:
    record = record_of(replace(REJECTED, dmarc=None, action=Action.ACCEPT))
    assert (record["dmarc"], record["policy_published"], record["header_from"]) == (None, None, "")


PASS_REJECT = replace(DMARC_FAIL, result=AuthResult.PASS, disposition=Disposition.NONE, spf_aligned=True)
TEST_MODE = replace(DMARC_FAIL, record=replace(RECORD, testing=True), disposition=Disposition.QUARANTINE)


@pytest.mark.parametrize(
    ("dmarc", "action", "reason", "disposition", "reasons"),
    [
        # RFC 9990: "pass" = no action, passing DMARC under an enforcing policy.
        (PASS_REJECT, Action.ACCEPT, "", "pass", []),
        (replace(PASS_REJECT, policy=Disposition.NONE), Action.ACCEPT, "", "none", []),
        (DMARC_FAIL, Action.REJECT, "dmarc=fail", "reject", []),
        (
            replace(DMARC_FAIL, disposition=Disposition.QUARANTINE, policy=Disposition.QUARANTINE),
            Action.QUARANTINE,
            "dmarc=fail",
            "quarantine",
            [],
        ),
        # never_reject_networks / never_reject_domains
        (
            DMARC_FAIL,
            Action.ACCEPT,
            "local override (dmarc=fail: x)",
            "none",
            [{"type": "local_policy", "comment": "local override (dmarc=fail: x)"}],
        ),
        # [policy] enforce = false: actions.py gives an accept without a reason
        (
            DMARC_FAIL,
            Action.ACCEPT,
            "",
            "none",
            [{"type": "local_policy", "comment": "DMARC policy not enforced by local configuration"}],
        ),
        (
            TEST_MODE,
            Action.QUARANTINE,
            "dmarc=fail",
            "quarantine",
            [{"type": "policy_test_mode", "comment": "t=y: reject applied as quarantine"}],
        ),
        (
            TEST_MODE,
            Action.ACCEPT,
            "local override (x)",
            "none",
            [
                {"type": "policy_test_mode", "comment": "t=y: reject applied as quarantine"},
                {"type": "local_policy", "comment": "local override (x)"},
            ],
        ),
        # spf_fail = "reject" while DMARC passed: a local decision, not the domain's policy
        (
            PASS_REJECT,
            Action.REJECT,
            "spf=fail: no",
            "reject",
            [{"type": "local_policy", "comment": "spf=fail: no"}],
        ),
        # tempfailed: not delivered, so nothing applied; reports skip it
        (
            replace(DMARC_FAIL, result=AuthResult.TEMPERROR, disposition=Disposition.NONE),
            Action.TEMPFAIL,
            "dmarc=temperror",
            "none",
            [],
        ),
    ],
)
def test_disposition_and_override_reasons(
    dmarc: DmarcVerdict, action: Action, reason: str, disposition: str, reasons: list[dict[str, str]]
) -> None:
    evaluated = record_of(replace(REJECTED, dmarc=dmarc, action=action, reason=reason))["policy_evaluated"]
    assert (evaluated["disposition"], evaluated["reasons"]) == (disposition, reasons)


def test_lists_and_strings_are_bounded() -> None:
    many_dkim = tuple(
        DkimResult(AuthResult.FAIL, f"d{i}.example", "s" * 5000, "rsa-sha256", "r" * 5000) for i in range(500)
    )
    recipients = tuple(f"u@r{i}.example" for i in range(5000))
    dmarc = replace(
        DMARC_FAIL,
        reason="y" * 100_000,
        from_domains=tuple(f"f{i}.example" for i in range(99)),
        record=replace(RECORD, rua=tuple(f"mailto:r@{i}.example" for i in range(99))),
    )
    verdict = replace(REJECTED, dkim=many_dkim, dmarc=dmarc, action=Action.ACCEPT, reason="z" * 100_000)
    envelope = replace(ENVELOPE, recipients=recipients, queue_id="q" * 9999, helo="h" * 9999)
    record = record_of(verdict, envelope)
    assert len(record["auth_results"]["dkim"]) == MAX_DKIM_RESULTS
    assert record["auth_results"]["dkim_omitted"] == 500 - MAX_DKIM_RESULTS
    assert len(record["envelope_to"]) == MAX_RECIPIENT_DOMAINS
    assert record["envelope_to_omitted"] == 5000 - MAX_RECIPIENT_DOMAINS
    assert len(record["dmarc"]["reason"]) == MAX_TEXT
    assert [len(r["comment"]) for r in record["policy_evaluated"]["reasons"]] == [MAX_TEXT]
    assert len(record["auth_results"]["dkim"][0]["selector"]) <= 253
    assert len(encode_record(record)) < 32_000


def test_settings_default_to_no_history() -> None:
    assert HistorySettings().path == ""


# ---------------------------------------------------------------------------------------------
# The writer


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


WORKERS = 4
THREADS = 5
PER_THREAD = 100  # 4 x 5 x 100 = 2,000 records


def _payload_size(worker: int, thread: int, n: int) -> int:
    # Every 10th record is far larger than PIPE_BUF and than any userspace buffer (64 KB), so a
    # writer that split a line into several write() calls would interleave.
    return 70_000 + n if n % 10 == 0 else 50 + (worker * 7 + thread * 3 + n) % 400


def _append_many(writer: HistoryWriter, worker: int, thread: int) -> None:
    for n in range(PER_THREAD):
        size = _payload_size(worker, thread, n)
        pad = chr(97 + n % 26) * size
        writer.append({"v": 1, "w": worker, "t": thread, "n": n, "size": size, "pad": pad})


def _worker_process(writer: HistoryWriter, worker: int) -> None:
    threads = [threading.Thread(target=_append_many, args=(writer, worker, t)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_processes_and_threads_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    # Created before fork, as a supervisor would: each child must open its own file.
    writer = HistoryWriter(str(path))
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_worker_process, args=(writer, w)) for w in range(WORKERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0] * WORKERS
    seen = set()
    lines = lines_of(path)
    for line in lines:
        assert line.endswith(b"\n")
        record = json.loads(line)
        assert record["pad"] == chr(97 + record["n"] % 26) * record["size"]
        seen.add((record["w"], record["t"], record["n"]))
    assert len(lines) == len(seen) == WORKERS * THREADS * PER_THREAD


def test_append_waits_for_the_file_lock(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(str(path))
    with open(path, "ab") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        thread = threading.Thread(target=writer.append, args=({"v": 1},))
        thread.start()
        time.sleep(0.3)
        assert path.stat().st_size == 0, "append wrote while another process held the lock"
        fcntl.flock(other, fcntl.LOCK_UN)
        thread.join(5)
    assert lines_of(path) == [b'{"v":1}\n']


def _append_one(writer: HistoryWriter) -> None:
    writer.append({"v": 1, "child": True})


def test_a_forked_child_does_not_share_the_parents_lock(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(str(path))
    writer.append({"v": 1})
    # The parent holds the lock on its own open file. A child still using that inherited open file
    # would get the same lock at once (flock belongs to the open file) and write.
    fcntl.flock(writer._fd, fcntl.LOCK_EX)  # type: ignore[arg-type]
    child = multiprocessing.get_context("fork").Process(target=_append_one, args=(writer,))
    child.start()
    time.sleep(0.5)
    assert len(lines_of(path)) == 1, "the child wrote while the parent held the lock"
    fcntl.flock(writer._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
    child.join(10)
    assert child.exitcode == 0
    assert len(lines_of(path)) == 2


def test_rotation_by_rename_starts_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(str(path))
    for n in range(3):
        writer.append({"v": 1, "n": n})
    path.rename(tmp_path / "history.jsonl.1")
    for n in range(3, 5):
        writer.append({"v": 1, "n": n})
    assert [json.loads(x)["n"] for x in lines_of(tmp_path / "history.jsonl.1")] == [0, 1, 2]
    assert [json.loads(x)["n"] for x in lines_of(path)] == [3, 4]


def test_a_removed_file_is_created_again(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(str(path))
    writer.append({"v": 1, "n": 0})
    path.unlink()
    writer.append({"v": 1, "n": 1})
    assert [json.loads(x)["n"] for x in lines_of(path)] == [1]


def _open_targets() -> set[str]:
    targets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return targets


def test_reopen_lets_go_of_the_old_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(str(path))
    writer.append({"v": 1, "n": 0})
    rotated = tmp_path / "history.jsonl.1"
    path.rename(rotated)
    assert str(rotated) in _open_targets()
    writer.reopen()
    assert str(rotated) not in _open_targets(), "reopen() kept the rotated file open"
    writer.append({"v": 1, "n": 1})
    assert [json.loads(x)["n"] for x in lines_of(path)] == [1]


def test_append_after_close_opens_again(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(str(path))
    writer.close()
    writer.append({"v": 1})
    assert lines_of(path) == [b'{"v":1}\n']


def test_new_file_is_not_world_readable(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        HistoryWriter(str(tmp_path / "history.jsonl"))
    finally:
        os.umask(old)
    assert (tmp_path / "history.jsonl").stat().st_mode & 0o777 == 0o640


def test_an_unopenable_path_raises_a_clear_oserror(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "history.jsonl"
    with pytest.raises(OSError) as caught:
        HistoryWriter(str(missing))
    assert isinstance(caught.value, HistoryError) and caught.value.errno == errno.ENOENT
    assert str(missing) in str(caught.value) and "cannot open" in str(caught.value)


def test_a_read_only_directory_raises_a_clear_oserror(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores directory permissions; a directory in place of the file fails the same way.
        target = tmp_path / "history.jsonl"
        target.mkdir()
        expected = errno.EISDIR
    else:
        tmp_path.chmod(0o500)
        target = tmp_path / "history.jsonl"
        expected = errno.EACCES
    try:
        with pytest.raises(HistoryError) as caught:
            HistoryWriter(str(target))
    finally:
        tmp_path.chmod(0o700)
    assert caught.value.errno == expected and str(target) in str(caught.value)


def test_a_failing_write_raises_a_clear_oserror() -> None:
    writer = HistoryWriter("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(OSError) as caught:
        writer.append({"v": 1})
    assert caught.value.errno == errno.ENOSPC
    assert "/dev/full" in str(caught.value) and "cannot append" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# The reader


def test_read_history_skips_and_counts_corrupt_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "history.jsonl"
    good = [record_of(REJECTED), {"v": 1, "n": 2}]
    path.write_bytes(
        encode_record(good[0])
        + b'{"v": 1, "trunc\n'  # a crash mid-write
        + b"\n"  # an empty line (ends a partial write): ignored
        + b"[1, 2]\n"  # JSON, but not a record
        + b'{"n": 1}\n'  # no version
        + b'{"v": "1"}\n'  # version of the wrong type
        + b"\xff\xfe{}\n"  # not UTF-8
        + b'{"v": 99}\n'  # a future version
        + encode_record(good[1])
        + b'{"v": 1, "no": "newline"'  # a last line still being written
    )
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="authmilter.history"):
        assert list(read_history(str(path), stats)) == good
    assert (stats.records, stats.corrupt, stats.unknown_version) == (2, 6, 1)
    assert "skipped 6 corrupt line(s) and 1 record(s) of unknown version" in caplog.text


def test_read_history_reads_what_the_writer_wrote(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(str(path))
    records = [record_of(replace(REJECTED, reason=f"r{i}")) for i in range(3)]
    for record in records:
        writer.append(record)
    stats = ReadStats()
    assert list(read_history(str(path), stats)) == records
    assert stats == ReadStats(records=3)

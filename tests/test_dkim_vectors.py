"""Shared DKIM vectors (../shared/peer-suites/dkim-vectors, see its NOTES.md) through verify_dkim.

DNS is served from zone files written into tmp_path and read by our ZoneFileSource.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest

from authmilter import dkim_rsa
from authmilter.dkim_verify import DkimSettings, verify_dkim
from authmilter.model import AuthResult
from authmilter.resolver import Resolver, ZoneFileSource

PEER_SUITES = Path(__file__).resolve().parents[1].parent / "shared" / "peer-suites"
VECTORS = PEER_SUITES / "dkim-vectors"
DKIMPY = VECTORS / "dkimpy-1.1.8"
STALWART = VECTORS / "stalwart-dkim"
# NOTES.md: the stalwart DKIM files verify at this instant (005.txt carries x=1667930064).
STALWART_TIME = 1667843664
SETTINGS = DkimSettings()

# Per stalwart file, the (selector, a=) of each signature in header order; NOTES.md only promises the
# last one passes, we check that every one does.
STALWART_EXPECTED = {
    "001.txt": [("brisbane", "ed25519-sha256"), ("test", "rsa-sha256")],
    "002.txt": [("newengland", "rsa-sha256")],
    "003.txt": [("ietf1", "rsa-sha256"), ("ietf1", "rsa-sha256")],
    "004.txt": [("s1024-2013-q3", "rsa-sha256")],
    "005.txt": [("sysmsg-1", "rsa-sha256")],
    "006.txt": [("dk2016", "rsa-sha256")],
}


def _require(path: Path) -> Path:
    # Shared conformance data must be present: a missing suite is a broken checkout, not a skip.
    assert path.exists(), f"peer suite data missing: {path}"
    return path


def _quoted(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    # RFC 1035 §3.3.14: at most 255 octets per character-string; RFC 6376 §3.6.2.2 joins them.
    return " ".join(f'"{escaped[i : i + 200]}"' for i in range(0, len(escaped), 200))


def resolver_for(tmp_path: Path, records: dict[str, str]) -> Resolver:
    """One zone file per owner name (its origin), holding that name's TXT record."""
    paths = []
    for index, (name, text) in enumerate(records.items()):
        path = tmp_path / f"vector{index}.zone"
        path.write_text(
            f"$ORIGIN {name.rstrip('.')}.\n$TTL 300\n@ IN TXT {_quoted(text)}\n", encoding="utf-8"
        )
        paths.append(path)
    return Resolver(ZoneFileSource(paths))


def dkimpy_records() -> dict[str, str]:
    records = json.loads(_require(VECTORS / "dkimpy-1.1.8-dns.json").read_text(encoding="utf-8"))
    records.pop("_comment")
    return dict(records)


def data(name: str) -> bytes:
    return _require(DKIMPY / name).read_bytes()


def outcome(
    message: bytes, resolver: Resolver, now: float | None = None
) -> list[tuple[str, str, AuthResult]]:
    return [(r.selector, r.algorithm, r.result) for r in verify_dkim(message, resolver, SETTINGS, now=now)]


# --- dkimpy-1.1.8 ----------------------------------------------------------------------------


def test_rfc6376_signed_message_both_signatures_pass(tmp_path: Path) -> None:
    results = outcome(data("rfc6376.signed.msg"), resolver_for(tmp_path, dkimpy_records()))
    assert results == [
        ("brisbane", "ed25519-sha256", AuthResult.PASS),
        ("test", "rsa-sha256", AuthResult.PASS),
    ]


def test_rfc6376_signed_rsa_passes_and_no_t_fails_as_in_dkimpy(tmp_path: Path) -> None:
    resolver = resolver_for(tmp_path, dkimpy_records())
    assert outcome(data("rfc6376.signed.rsa.msg"), resolver) == [("test", "rsa-sha256", AuthResult.PASS)]
    # This copy lost its t= after signing (and gained x=): dkimpy's own verify() says False too.
    no_t = data("rfc6376.signed.no_t.msg")
    assert outcome(no_t, resolver) == [("test", "rsa-sha256", AuthResult.FAIL)]
    records = dkimpy_records()
    assert not dkim.verify(no_t, dnsfunc=lambda name, timeout=5: records[name.decode()].encode())


def test_exim_ed25519_signature_passes(tmp_path: Path) -> None:
    record = data("eximtest.dns").decode().strip()
    resolver = resolver_for(tmp_path, {"sed._domainkey.test.ex": record})
    assert outcome(data("ed25519test2.msg"), resolver) == [("sed", "ed25519-sha256", AuthResult.PASS)]


def test_rfc8463_round_trip_with_the_appendix_keys(tmp_path: Path) -> None:
    # NOTES.md harness recipe: sign rfc6376.msg with rfc8032_7_1.key (brisbane) and test.private (test).
    message = data("rfc6376.msg")
    domain = b"football.example.com"
    headers = [b"from", b"to", b"subject", b"date", b"message-id"]
    ed25519 = b"ed25519-sha256"
    key = data("rfc8032_7_1.key")
    signed = dkim.sign(
        message, b"brisbane", domain, key, signature_algorithm=ed25519, include_headers=headers
    )
    signed += message
    signed = dkim.sign(signed, b"test", domain, data("test.private"), include_headers=headers) + signed
    assert outcome(signed, resolver_for(tmp_path, dkimpy_records())) == [
        ("test", "rsa-sha256", AuthResult.PASS),
        ("brisbane", "ed25519-sha256", AuthResult.PASS),
    ]


def test_ed25519_key_file_round_trip(tmp_path: Path) -> None:
    # dkimpy's test_dkim_ed25519: ed25519test.key signs, ed25519test.dns verifies.
    message = data("ed25519test.msg")
    key = data("ed25519test.key")
    signed = dkim.sign(message, b"test", b"example.net", key, signature_algorithm=b"ed25519-sha256")
    signed += message
    record = data("ed25519test.dns").decode().strip()
    resolver = resolver_for(tmp_path, {"test._domainkey.example.net": record})
    assert outcome(signed, resolver) == [("test", "ed25519-sha256", AuthResult.PASS)]


@pytest.mark.parametrize(
    ("record_file", "result"),
    [
        ("test.txt", AuthResult.PASS),
        ("badk.txt", AuthResult.PERMERROR),  # k=ed25519-sha256: no such key type
        ("badversion.txt", AuthResult.PERMERROR),  # v=DKIM1: g=*
        ("test_bad.txt", AuthResult.PERMERROR),  # p= truncated: not an RSA key
    ],
)
def test_key_records(tmp_path: Path, record_file: str, result: AuthResult) -> None:
    message = data("test.message")
    signed = dkim.sign(message, b"test", b"example.com", data("test.private")) + message
    resolver = resolver_for(tmp_path, {"test._domainkey.example.com": data(record_file).decode().strip()})
    got = verify_dkim(signed, resolver, SETTINGS)
    assert [r.result for r in got] == [result], got


def test_nofrom_message(tmp_path: Path) -> None:
    message = data("test_nofrom.message")
    # dkimpy's test_no_from_fails: signing a message without From is refused.
    with pytest.raises(dkim.ParameterError):
        dkim.sign(message, b"test", b"example.com", data("test.private"))
    # A signature that leaves From out (written by hand here) is a permerror for us (RFC 6376 §5.4).
    signed = dkim.sign(
        message, b"test", b"example.com", data("test.private"), include_headers=[b"from", b"to"]
    )
    unsigned_from = signed.replace(b"h=from : to", b"h=to").replace(b"h=from:to", b"h=to") + message
    assert b"h=to;" in unsigned_from.replace(b" ", b"")
    resolver = resolver_for(tmp_path, {"test._domainkey.example.com": data("test.txt").decode().strip()})
    result = verify_dkim(unsigned_from, resolver, SETTINGS)
    assert [(r.result, r.reason) for r in result] == [(AuthResult.PERMERROR, "From field not signed")]


@pytest.mark.parametrize("name", ["test_extra.message", "message.mbox"])
def test_extra_headers_and_added_from(tmp_path: Path, name: str) -> None:
    # dkimpy's test_extra_headers (repeated Received signed) and test_multiple_from_fails.
    message = data(name)
    signer = dkim.DKIM(message)
    signer.should_not_sign.remove(b"received")
    signature = signer.sign(
        b"test", b"example.com", data("test.private"), include_headers=signer.all_sign_headers()
    )
    resolver = resolver_for(tmp_path, {"test._domainkey.example.com": data("test.txt").decode().strip()})
    # Ours is the first signature (message.mbox also carries an old kitterman.com one).
    assert verify_dkim(signature + message, resolver, SETTINGS)[0].result is AuthResult.PASS
    head, body = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)
    for extra in (head + b"\nFrom: evil@spammer.example", b"From: evil@spammer.example\n" + head):
        forged = signature + extra + b"\n\n" + body
        assert verify_dkim(forged, resolver, SETTINGS)[0].result is AuthResult.FAIL


# --- stalwart mail-auth ----------------------------------------------------------------------


def stalwart_case(path: Path) -> tuple[dict[str, str], bytes]:
    """DNS lines ``<name> <TXT>`` up to the first blank line, then the message (LF endings)."""
    dns_part, message = path.read_text(encoding="utf-8").split("\n\n", 1)
    records = dict(line.split(" ", 1) for line in dns_part.splitlines())
    return records, message.replace("\n", "\r\n").encode("utf-8")


def stalwart_files() -> list[Path]:
    files = sorted(_require(STALWART).glob("0*.txt"))
    assert [f.name for f in files] == sorted(STALWART_EXPECTED), "stalwart-dkim file set changed"
    return files


@pytest.mark.parametrize("rsa", ["dkimpy", "openssl"])
@pytest.mark.parametrize("name", sorted(STALWART_EXPECTED))
def test_stalwart_every_signature_passes(
    tmp_path: Path, name: str, rsa: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    records, message = stalwart_case(_require(STALWART / name))
    for module, attribute, _, original in dkim_rsa.PATCHES:  # dkimpy as shipped, unless installed
        monkeypatch.setattr(module, attribute, original)
    if rsa == "openssl":
        dkim_rsa.install()  # the pipeline's setting: results must not change
    # The frozen instant comes only through now=; a clock far in the future must not matter.
    monkeypatch.setattr(time, "time", lambda: 4_000_000_000.0)
    got = outcome(message, resolver_for(tmp_path, records), now=STALWART_TIME)
    assert got == [(s, a, AuthResult.PASS) for s, a in STALWART_EXPECTED[name]]


def test_stalwart_topicbox_expires_without_the_frozen_clock(tmp_path: Path) -> None:
    records, message = stalwart_case(_require(STALWART / "005.txt"))
    result = verify_dkim(message, resolver_for(tmp_path, records), SETTINGS, now=1667930064 + 3600)
    assert [(r.result, r.reason) for r in result] == [(AuthResult.FAIL, "signature expired")]


def test_vector_pass_count(tmp_path: Path, conformance_report: Callable[[str], None]) -> None:
    """Every vector signature expected to pass, counted (printed and in the assertion message)."""
    passed = total = 0
    for index, path in enumerate(stalwart_files()):
        records, message = stalwart_case(path)
        zone_dir = tmp_path / str(index)
        zone_dir.mkdir()
        results = verify_dkim(message, resolver_for(zone_dir, records), SETTINGS, now=STALWART_TIME)
        total += len(STALWART_EXPECTED[path.name])
        passed += sum(r.result is AuthResult.PASS for r in results)
    for name in ("rfc6376.signed.msg", "rfc6376.signed.rsa.msg"):
        zone_dir = tmp_path / name
        zone_dir.mkdir()
        results = verify_dkim(data(name), resolver_for(zone_dir, dkimpy_records()), SETTINGS)
        total += len(results)
        passed += sum(r.result is AuthResult.PASS for r in results)
    conformance_report(f"DKIM vectors: {passed}/{total} signatures passed")
    assert (passed, total) == (11, 11), f"DKIM vectors: {passed}/{total} signatures passed"

"""ARC (arc_check.py, arc_seal.py) and its place in the pipeline: validation, sealing, the
trusted-sealer override, interoperability with dkimpy's ARC, and the [arc] settings."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import dkim
import pytest

from authmilter.arc_check import MAX_INSTANCES, ArcSettings, has_arc_fields, verify_arc
from authmilter.arc_seal import ARC_SET_FIELDS, SEAL_BODY_HASH, Sealer, seal_message
from authmilter.config import Config, ConfigError, default_config, parse_config
from authmilter.dkim_body import digest_body
from authmilter.dkim_verify import DkimSettings
from authmilter.history import Envelope, make_record
from authmilter.keys import load_private_key
from authmilter.message import assemble_message, parse_message
from authmilter.model import Action, AuthResult
from authmilter.pipeline import Connection, Transaction, body_hashes, evaluate, match_internal_host
from authmilter.resolver import Resolver, ZoneFileSource
from signing import SigningKey, make_message, rsa_key, sign, zone_txt

SOA = "$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n"
LIST_IP = "198.51.100.7"
LIST_SENDER = "bounces@lists.example.org"
SEALED_AT = 1_790_000_000.0
# What the list recorded when the message reached it: an aligned DKIM pass for sender.example.
LIST_RESULTS = (
    "lists.example.org; spf=pass smtp.mailfrom=bob@sender.example; "
    "dkim=pass header.d=sender.example header.s=s1; dmarc=pass header.from=sender.example; arc=none"
)
FOOTER = b"-- \r\nThe list: https://lists.example.org/\r\n"


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {"sender": rsa_key(2048), "list": rsa_key(2048), "other": rsa_key(2048)}


@pytest.fixture(scope="module")
def zones(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]) -> list[Path]:
    folder = tmp_path_factory.mktemp("arc-zones")
    (folder / "sender.example.zone").write_text(
        SOA + '@ IN TXT "v=spf1 ip4:192.0.2.0/24 -all"\n'
        '_dmarc IN TXT "v=DMARC1; p=reject"\n'
        f"s1._domainkey IN TXT {zone_txt(keys['sender'].txt_record())}\n"
    )
    (folder / "lists.example.org.zone").write_text(
        SOA + f"arc._domainkey IN TXT {zone_txt(keys['list'].txt_record())}\n"
    )
    (folder / "other.example.zone").write_text(
        SOA + f"arc._domainkey IN TXT {zone_txt(keys['other'].txt_record())}\n"
    )
    zones = sorted(folder.glob("*.zone"))
    for zone in zones:
        zone.write_text(f"$ORIGIN {zone.stem}.\n" + zone.read_text())
    return zones


@pytest.fixture(scope="module")
def resolver(zones: list[Path]) -> Resolver:
    return Resolver(ZoneFileSource(zones))


def sealer(key: SigningKey, domain: str, tmp_path: Path) -> Sealer:
    path = tmp_path / f"{domain}.key"
    path.write_bytes(key.private)
    path.chmod(0o600)
    return Sealer(domain, "arc", load_private_key(str(path), "rsa-sha256"))


def with_fields(message: bytes, fields: tuple[str, ...]) -> bytes:
    pairs = zip(ARC_SET_FIELDS, fields, strict=True)
    head = "".join(f"{name}: {value.replace(chr(10), chr(13) + chr(10))}\r\n" for name, value in pairs)
    return head.encode() + message


def seal(message: bytes, by: Sealer, status: AuthResult, results: str = LIST_RESULTS) -> bytes:
    outcome = seal_message(parse_message(message), status, results, by, SEALED_AT)
    assert len(outcome.fields) == 3, outcome.reason
    return with_fields(message, outcome.fields)


def list_copy(keys: dict[str, SigningKey], tmp_path: Path, domain: str = "lists.example.org") -> bytes:
    """The sender's signed message, given a footer by the list (its DKIM breaks), then sealed."""
    original = sign(make_message(), keys["sender"], "sender.example", "s1")
    key = keys["list"] if domain == "lists.example.org" else keys["other"]
    return seal(original + FOOTER, sealer(key, domain, tmp_path), AuthResult.NONE)


def config_with(**arc: object) -> Config:
    defaults = default_config()
    return dataclasses.replace(
        defaults,
        milter=dataclasses.replace(defaults.milter, authserv_id="mx.receiver.example"),
        arc=dataclasses.replace(defaults.arc, **arc),  # type: ignore[arg-type]
    )


def run(raw: bytes, resolver: Resolver, config: Config, streamed: bool = False) -> tuple[Transaction, object]:
    message = parse_message(raw)
    connection = Connection(client_ip=LIST_IP, helo="lists.example.org")
    body = None
    if streamed:
        # As the milter has it: the header block only, the body as digests computed as it streamed.
        body = digest_body(body_hashes(connection, message.headers, config), message.body)
        head = assemble_message(message.headers, b"")
        message = parse_message(head)
    transaction = Transaction(
        connection, "bounces@lists.example.org", ("alice@receiver.example",), message, body=body
    )
    return transaction, evaluate(transaction, resolver, config)


# --- validation -----------------------------------------------------------------------------------


def test_a_message_without_arc_fields_is_none(resolver: Resolver) -> None:
    message = parse_message(make_message())
    assert not has_arc_fields(message.headers)
    result = verify_arc(message, resolver, DkimSettings())
    assert (result.result, result.instances, result.oldest_pass) == (AuthResult.NONE, 0, None)
    _, verdict = run(make_message(), resolver, config_with())
    assert "arc=none" in verdict.authentication_results  # type: ignore[attr-defined]


def test_a_sealed_message_passes_through_streamed_body_digests(
    resolver: Resolver, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    transaction, verdict = run(list_copy(keys, tmp_path), resolver, config_with(), streamed=True)
    assert transaction.body is not None and SEAL_BODY_HASH in transaction.body.digests
    arc = verdict.arc  # type: ignore[attr-defined]
    assert (arc.result, arc.instances, arc.oldest_pass, arc.sealers) == (
        AuthResult.PASS,
        1,
        0,
        ("lists.example.org",),
    )


def test_a_body_changed_after_sealing_fails(
    resolver: Resolver, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    for streamed in (False, True):
        _, verdict = run(list_copy(keys, tmp_path) + b"P.S.\r\n", resolver, config_with(), streamed=streamed)
        arc = verdict.arc  # type: ignore[attr-defined]
        assert (arc.result, arc.reason) == (
            AuthResult.FAIL,
            "ARC-Message-Signature i=1 body hash did not verify",
        )


def test_more_than_fifty_instances_fail_and_are_not_sealed(
    resolver: Resolver, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    sets = "".join(
        f"ARC-Seal: i={i}; a=rsa-sha256; cv=pass; d=x.example; s=s; b=AAAA\r\n"
        f"ARC-Message-Signature: i={i}; a=rsa-sha256; d=x.example; s=s; h=from; bh=AAAA; b=AAAA\r\n"
        f"ARC-Authentication-Results: i={i}; x.example; none\r\n"
        for i in range(MAX_INSTANCES, 0, -1)
    )
    message = parse_message(sets.encode() + make_message())
    assert verify_arc(message, resolver, DkimSettings()).result is AuthResult.FAIL
    outcome = seal_message(
        message, AuthResult.FAIL, LIST_RESULTS, sealer(keys["list"], "lists.example.org", tmp_path), 0
    )
    assert outcome.fields == () and "50 ARC sets" in outcome.reason
    too_many = parse_message(sets.replace("i=50;", "i=51;").encode() + make_message())
    assert "out of range" in verify_arc(too_many, resolver, DkimSettings()).reason


def test_a_failed_chain_is_sealed_once_with_cv_fail(
    resolver: Resolver, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    broken = list_copy(keys, tmp_path) + b"P.S.\r\n"
    ours = sealer(keys["other"], "other.example", tmp_path)
    sealed = seal(broken, ours, AuthResult.FAIL)
    assert re.search(
        rb"ARC-Seal: a=rsa-sha256;\r\n b=[^;]+;\r\n cv=fail;\r\n d=other.example;\r\n i=2;", sealed
    )
    result = verify_arc(parse_message(sealed), resolver, DkimSettings())
    assert (result.result, result.sealers) == (AuthResult.FAIL, ("lists.example.org", "other.example"))
    again = seal_message(parse_message(sealed), AuthResult.FAIL, LIST_RESULTS, ours, SEALED_AT)
    assert again.fields == () and "already marked cv=fail" in again.reason


# --- interoperability with dkimpy ---------------------------------------------------------------


def dkimpy_dns(resolver: Resolver):  # type: ignore[no-untyped-def]
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        texts = resolver.txt(name.decode().rstrip(".") + ".").texts
        return texts[0].encode() if texts else b""

    return lookup


def test_our_chain_validates_with_dkimpy_and_dkimpy_chain_with_ours(
    resolver: Resolver, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    first = list_copy(keys, tmp_path)
    cv, _, reason = dkim.arc_verify(first, dnsfunc=dkimpy_dns(resolver))
    assert cv == dkim.CV_Pass, reason
    # dkimpy seals the second hop (it reads cv from our A-R stamp, as the suite assumes).
    stamped = b"Authentication-Results: other.example; arc=pass\r\n" + first
    second_set = dkim.arc_sign(
        stamped, b"arc", b"other.example", keys["other"].private, b"other.example", timestamp=int(SEALED_AT)
    )
    second = b"".join(second_set) + first
    assert verify_arc(parse_message(second), resolver, DkimSettings()).result is AuthResult.PASS
    # We seal the third; dkimpy and we both validate the three-instance chain.
    third = seal(second, sealer(keys["list"], "lists.example.org", tmp_path), AuthResult.PASS)
    cv, _, reason = dkim.arc_verify(third, dnsfunc=dkimpy_dns(resolver))
    assert cv == dkim.CV_Pass, reason
    result = verify_arc(parse_message(third), resolver, DkimSettings())
    assert (result.result, result.instances, result.oldest_pass) == (AuthResult.PASS, 3, 0)
    assert result.sealers == ("lists.example.org", "other.example", "lists.example.org")


# --- the trusted-sealer override ------------------------------------------------------------------


def test_a_trusted_sealer_rescues_a_dmarc_failure(
    resolver: Resolver, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    config = config_with(trusted_sealers=frozenset({"lists.example.org"}))
    transaction, verdict = run(list_copy(keys, tmp_path), resolver, config, streamed=True)
    assert verdict.dmarc.result is AuthResult.FAIL  # type: ignore[attr-defined]
    assert verdict.action is Action.ACCEPT  # type: ignore[attr-defined]
    assert verdict.arc.override == "lists.example.org"  # type: ignore[attr-defined]
    header = verdict.authentication_results  # type: ignore[attr-defined]
    assert (
        "dmarc=fail (p=reject dis=none, reject overridden by trusted ARC sealer lists.example.org)" in header
    )
    assert re.search(
        r"arc=pass \(i=1 sealers lists.example.org\)\s+smtp.remote-ip=198.51.100.7\s+header.oldest-pass=0",
        header,
    )
    envelope = Envelope(LIST_IP, transaction.mail_from, transaction.recipients, "lists.example.org", "Q1")
    record = make_record(verdict, envelope, "mx.receiver.example", SEALED_AT, "treewalk")  # type: ignore[arg-type]
    assert record["policy_evaluated"]["disposition"] == "none"
    assert record["policy_evaluated"]["reasons"] == [
        {"type": "trusted_forwarder", "comment": "arc=pass sealed by lists.example.org"}
    ]
    assert verdict.as_json()["arc"] == {  # type: ignore[attr-defined]
        "result": "pass",
        "instances": 1,
        "oldest_pass": 0,
        "sealers": ["lists.example.org"],
        "override": "lists.example.org",
        "reason": "",
    }


@pytest.mark.parametrize(
    ("trusted", "sealed_by", "results", "tamper"),
    [
        pytest.param(frozenset(), "lists.example.org", LIST_RESULTS, b"", id="untrusted"),
        pytest.param(
            frozenset({"example.org"}), "lists.example.org", LIST_RESULTS, b"", id="parent-not-enough"
        ),
        pytest.param(
            frozenset({"lists.example.org"}), "lists.example.org", LIST_RESULTS, b"P.S.\r\n", id="broken"
        ),
        pytest.param(
            frozenset({"lists.example.org"}),
            "lists.example.org",
            "lists.example.org; dkim=pass header.d=elsewhere.example; "
            "spf=fail smtp.mailfrom=bob@sender.example",
            b"",
            id="no-aligned-pass",
        ),
        pytest.param(frozenset({"lists.example.org"}), "other.example", LIST_RESULTS, b"", id="other-sealer"),
    ],
)
def test_no_override_without_a_valid_chain_from_a_trusted_sealer_vouching_for_the_author(
    resolver: Resolver,
    keys: dict[str, SigningKey],
    tmp_path: Path,
    trusted: frozenset[str],
    sealed_by: str,
    results: str,
    tamper: bytes,
) -> None:
    original = sign(make_message(), keys["sender"], "sender.example", "s1") + FOOTER
    key = keys["list"] if sealed_by == "lists.example.org" else keys["other"]
    message = seal(original, sealer(key, sealed_by, tmp_path), AuthResult.NONE, results) + tamper
    _, verdict = run(message, resolver, config_with(trusted_sealers=trusted))
    assert verdict.action is Action.REJECT  # type: ignore[attr-defined]
    assert str(verdict.reply).startswith("550 5.7.26")  # type: ignore[attr-defined]
    assert verdict.arc.override == ""  # type: ignore[attr-defined]


# --- sealing in the pipeline -------------------------------------------------------------------------


def test_inbound_sealing_records_our_results_and_the_next_hop_validates(
    resolver: Resolver, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    ours = sealer(keys["other"], "other.example", tmp_path)
    config = config_with(seal=True, signing_domain="other.example", selector="arc", key_file=ours.key.path)
    incoming = list_copy(keys, tmp_path)
    _, verdict = run(
        incoming,
        resolver,
        dataclasses.replace(
            config, arc=dataclasses.replace(config.arc, trusted_sealers=frozenset({"lists.example.org"}))
        ),
        streamed=True,
    )
    fields = verdict.arc_seal  # type: ignore[attr-defined]
    assert len(fields) == 3 and "cv=pass" in fields[0] and "i=2" in fields[0]
    assert fields[2].startswith("i=2;\n mx.receiver.example;")
    assert "arc=pass" in fields[2]
    delivered = with_fields(incoming, fields)
    result = verify_arc(parse_message(delivered), resolver, DkimSettings())
    assert (result.result, result.instances) == (AuthResult.PASS, 2)


def test_a_rejected_message_is_not_sealed(
    resolver: Resolver, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    ours = sealer(keys["other"], "other.example", tmp_path)
    config = config_with(seal=True, signing_domain="other.example", selector="arc", key_file=ours.key.path)
    _, verdict = run(list_copy(keys, tmp_path), resolver, config)
    assert verdict.action is Action.REJECT and verdict.arc_seal == ()  # type: ignore[attr-defined]


# --- settings ----------------------------------------------------------------------------------------


def test_trusted_sealers_from_a_file_with_its_errors_located(tmp_path: Path) -> None:
    good = tmp_path / "sealers"
    good.write_text("# forwarders we trust\nLists.Example.ORG.\n\nfwd.example.net  # the alumni forwarder\n")
    config = parse_config(f'[arc]\ntrusted_sealers = "{good.name}"\n', tmp_path / "authmilter.toml")
    assert config.arc.trusted_sealers == frozenset({"lists.example.org", "fwd.example.net"})
    bad = tmp_path / "bad"
    bad.write_text("lists.example.org\nnot a domain\n")
    with pytest.raises(
        ConfigError, match=rf"authmilter.toml:2: \[arc\] trusted_sealers: {bad}:2: 'not a domain'"
    ):
        parse_config(f'[arc]\ntrusted_sealers = "{bad.name}"\n', tmp_path / "authmilter.toml")


def test_sealing_needs_a_domain_selector_and_usable_key(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    path = tmp_path / "authmilter.toml"
    with pytest.raises(ConfigError, match=r"authmilter.toml:2: \[arc\] seal = true needs signing_domain"):
        parse_config("[arc]\nseal = true\n", path)
    key = tmp_path / "arc.key"
    key.write_bytes(keys["list"].private)
    key.chmod(0o644)
    text = f'[arc]\nseal = true\nsigning_domain = "lists.example.org"\nselector = "arc"\nkey_file = "{key}"\n'
    with pytest.raises(ConfigError, match=r"authmilter.toml:5: \[arc\] key_file: .*arc.key"):
        parse_config(text, path)
    key.chmod(0o600)
    assert parse_config(text, path).arc == ArcSettings(
        seal=True, signing_domain="lists.example.org", selector="arc", key_file=str(key)
    )


def test_outbound_sealing_only_for_internal_hosts(
    resolver: Resolver, keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    """An authenticated user could write an A-R with our authserv-id: only an internal host's mail
    (the list software) is sealed with the results it carries."""
    ours = sealer(keys["list"], "lists.example.org", tmp_path)
    config = config_with(
        seal=True,
        seal_mail="outbound",
        signing_domain="lists.example.org",
        selector="arc",
        key_file=ours.key.path,
    )
    config = dataclasses.replace(
        config, milter=dataclasses.replace(config.milter, authserv_id="lists.example.org")
    )
    received = b"Authentication-Results: " + LIST_RESULTS.encode() + b"\r\n" + make_message() + FOOTER
    message = parse_message(received)
    verdicts = {}
    for who, connection in {
        "internal": Connection(
            "127.0.0.1", "localhost", internal_host=match_internal_host("127.0.0.1", "", config)
        ),
        "authenticated": Connection("203.0.113.9", "client", macros={"{auth_authen}": "mallory"}),
    }.items():
        transaction = Transaction(connection, LIST_SENDER, ("alice@receiver.example",), message)
        verdicts[who] = evaluate(transaction, resolver, config)
    assert verdicts["authenticated"].outbound and verdicts["authenticated"].arc_seal == ()
    assert "not sealed: outbound mail not from an internal host" in verdicts["authenticated"].reason
    sealed = verdicts["internal"].arc_seal
    assert len(sealed) == 3 and "cv=none" in sealed[0]
    assert "dkim=pass header.d=sender.example" in sealed[2]
    result = verify_arc(parse_message(with_fields(received, sealed)), resolver, DkimSettings())
    assert (result.result, result.sealers) == (AuthResult.PASS, ("lists.example.org",))


def test_check_json_reports_the_chain_and_the_override(
    zones: list[Path], keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    config = tmp_path / "authmilter.toml"
    config.write_text('[arc]\ntrusted_sealers = ["lists.example.org"]\n')
    zone_args = [arg for zone in zones for arg in ("--zone", str(zone))]
    command = [
        sys.executable,
        "-m",
        "authmilter",
        "check",
        "--client-ip",
        LIST_IP,
        "--helo",
        "lists.example.org",
    ]
    command += ["--mail-from", LIST_SENDER, "--config", str(config), *zone_args, "--json", "-"]
    result = subprocess.run(
        command, input=list_copy(keys, tmp_path), capture_output=True, timeout=60, check=True
    )
    verdict = json.loads(result.stdout)
    assert verdict["arc"] == {
        "result": "pass",
        "instances": 1,
        "oldest_pass": 0,
        "sealers": ["lists.example.org"],
        "override": "lists.example.org",
        "reason": "",
    }
    assert (verdict["dmarc"]["result"], verdict["action"]) == ("fail", "accept")

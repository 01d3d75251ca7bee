"""session.py: the SMTP transaction fed event by event, without a socket (h11's test_state.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from authmilter.config import Config, default_config
from authmilter.message import parse_message
from authmilter.model import Action, AuthResult
from authmilter.pipeline import evaluate, outbound_reason
from authmilter.resolver import Resolver, ZoneFileSource
from authmilter.session import MAX_RECIPIENTS, Session
from signing import SigningKey, make_message, rsa_key, sign, zone_txt

CONFIG: Config = dataclasses.replace(
    default_config(), milter=dataclasses.replace(default_config().milter, authserv_id="mx.receiver.example")
)
SOA = "$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n@ IN NS ns\n"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return rsa_key()


@pytest.fixture(scope="module")
def resolver(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Resolver:
    zone = tmp_path_factory.mktemp("zones") / "sender.example.zone"
    zone.write_text(
        "$ORIGIN sender.example.\n" + SOA + '@ IN TXT "v=spf1 ip4:192.0.2.0/24 -all"\n'
        '_dmarc IN TXT "v=DMARC1; p=reject"\n'
        f"s1._domainkey IN TXT {zone_txt(key.txt_record())}\n"
    )
    return Resolver(ZoneFileSource([Path(zone)]))


def fed(raw: bytes, session: Session | None = None, chunk: int = 1000) -> Session:
    """A session fed as the MTA feeds the milter: client, envelope, each header, body chunks."""
    session = session or Session(CONFIG)
    session.connect("192.0.2.10", "mx.sender.example", {"j": "mx.receiver.example"})
    session.hello("mx.sender.example")
    session.mail("<bob@sender.example>")
    session.mail_macros("QID1", {"{auth_type}": ""})
    session.rcpt("<alice@receiver.example>")
    parsed = parse_message(raw)
    for field in parsed.headers.fields:
        session.header(field.name, field.value.encode("latin-1"), leading_space_included=True)
    session.end_of_headers()
    body = parsed.body
    for offset in range(0, len(body), chunk):
        session.body(body[offset : offset + chunk])
    session.end_of_message()
    return session


def test_events_in_a_transaction_out_with_the_verdict_of_the_whole_message(
    resolver: Resolver, key: SigningKey
) -> None:
    raw = sign(make_message(), key, "sender.example", "s1")
    transaction = fed(raw, chunk=7).transaction()
    assert (transaction.mail_from, transaction.recipients, transaction.queue_id) == (
        "bob@sender.example",
        ("alice@receiver.example",),
        "QID1",
    )
    assert transaction.connection.macros == {"j": "mx.receiver.example", "{auth_type}": ""}
    assert transaction.body is not None  # hashed as it streamed; the body itself is not kept
    assert transaction.message.body == b""
    streamed = evaluate(transaction, resolver, CONFIG)
    whole = Session(CONFIG)
    whole.connect("192.0.2.10", "", {})
    whole.hello("mx.sender.example")
    whole.mail("bob@sender.example")
    whole.whole_message(parse_message(raw))
    whole.end_of_message("QID1")
    read_whole = evaluate(whole.transaction(), resolver, CONFIG)
    assert streamed.action is read_whole.action is Action.ACCEPT
    assert [d.result for d in streamed.dkim] == [d.result for d in read_whole.dkim] == [AuthResult.PASS]
    assert streamed.authentication_results == read_whole.authentication_results


def test_recipients_are_capped() -> None:
    session = Session(CONFIG)
    session.connect("192.0.2.10", "", {})
    session.mail("<>")
    for n in range(MAX_RECIPIENTS + 5):
        session.rcpt(f"<r{n}@receiver.example>")
    session.end_of_message()
    transaction = session.transaction()
    assert transaction.mail_from == ""
    assert len(transaction.recipients) == MAX_RECIPIENTS
    assert transaction.recipients[-1] == f"r{MAX_RECIPIENTS - 1}@receiver.example"


def test_a_message_failure_lasts_for_its_message_and_a_connection_failure_for_all() -> None:
    session = Session(CONFIG)
    session.connect("192.0.2.10", "", {})
    session.mail("<bob@sender.example>")
    assert session.failed("header", ValueError("bad")) is True
    assert session.failed("body", KeyError("again")) is False  # logged once per message
    session.header("From", b" bob@sender.example")  # still gathered: forged A-R can still go
    session.end_of_message()
    assert session.failure == "ValueError" and len(session.headers().fields) == 1
    with pytest.raises(RuntimeError, match="a callback failed"):
        session.transaction()
    session.mail("<bob@sender.example>")  # the next message starts clean
    assert session.failure == ""
    assert session.failed("hello", OSError("gone")) is True
    session.abort()
    session.mail("<bob@sender.example>")
    assert session.failure == "OSError"  # the connection never got its HELO name


def test_message_events_need_mail_from() -> None:
    session = Session(CONFIG)
    session.connect("192.0.2.10", "", {})
    with pytest.raises(RuntimeError, match="without MAIL FROM"):
        session.rcpt("<alice@receiver.example>")
    session.mail("<bob@sender.example>")
    assert session.abort() is True  # a message was in progress (the adapter counts it ended)
    assert not session.in_message and session.headers().fields == ()
    assert session.abort() is False


def test_mail_from_drops_an_unfinished_message() -> None:
    session = Session(CONFIG)
    session.connect("192.0.2.10", "", {})
    session.mail("<first@sender.example>")
    session.rcpt("<alice@receiver.example>")
    session.mail("<second@sender.example>")
    session.end_of_message()
    assert session.transaction().recipients == ()
    assert session.transaction().mail_from == "second@sender.example"


def test_the_internal_hosts_entry_is_found_at_connect() -> None:
    session = Session(CONFIG)
    session.connect("127.0.0.1", "", {})
    session.mail("<bob@receiver.example>")
    session.end_of_message()
    entry = session.transaction().connection.internal_host
    assert entry is not None and entry.included


@pytest.mark.parametrize(
    ("client_ip", "connect_macros", "mail_macros", "expected"),
    [
        ("192.0.2.10", {}, {}, ""),
        ("127.0.0.1", {}, {}, "internal host (127.0.0.1 at <default>:1)"),
        ("192.0.2.10", {}, {"{auth_authen}": "bob"}, "authenticated as bob"),
        ("192.0.2.10", {"{daemon_name}": "submission"}, {}, "daemon_name submission"),
        ("192.0.2.10", {"{daemon_name}": "submission"}, None, "daemon_name submission"),
        ("192.0.2.10", {}, None, ""),
    ],
)
def test_the_direction_found_once_is_the_one_of_the_complete_envelope(
    client_ip: str, connect_macros: dict[str, str], mail_macros: dict[str, str] | None, expected: str
) -> None:
    # The session finds why a message is outbound once, when MAIL FROM's macros complete the
    # envelope (None: they never come, as in authmilter check), and the body hashes and evaluate()
    # reuse it: it must be what outbound_reason() says of the transaction's final connection.
    config = dataclasses.replace(
        CONFIG, signing=dataclasses.replace(CONFIG.signing, sign_daemon_names=("submission",))
    )
    session = Session(config)
    session.connect(client_ip, "", connect_macros)
    session.mail("<bob@sender.example>")
    if mail_macros is not None:
        session.mail_macros("QID1", mail_macros)
    session.end_of_message()
    transaction = session.transaction()
    assert transaction.outbound == expected == outbound_reason(transaction.connection, config)

"""ARC through Postfix (issue 15): a mailing list hop seals, our MX trusts it or not.

The "list" is a second ``authmilter run`` (its own port, authserv-id lists.example.org, [arc] sealing
on outbound mail) spoken to over the milter protocol as the list's Postfix would: once as the
message arrives from the sender (it verifies and adds its Authentication-Results), then, after the
list software added its footer, as the list re-sends it from 127.0.0.1 (outbound: sealed, with the
results it recorded on arrival). The footer breaks the sender's DKIM signature, and the list's
address is not in the sender's SPF: at our MX (the session Postfix and authmilter) DMARC fails for
the p=reject sender. The message is refused 550 5.7.26 unless lists.example.org is in the MX's
``[arc] trusted_sealers`` (taken up with SIGHUP); then it is delivered, with dmarc=fail and the
override named in our Authentication-Results.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Generator
from pathlib import Path

import pytest
from postfix import SENDING_CLIENT, AuthmilterProcess, Client, Mta, Senders

from dnsserver import AuthoritativeDns, free_port
from milterclient import MessageResult, check_message
from signing import make_message, rsa_key, sign, zone_txt

LIST_DOMAIN = "lists.example.org"
LIST_CLIENT = Client(address="198.51.100.20", name="mail.lists.example.org", helo="mail.lists.example.org")
LIST_SENDER = f"bounces@{LIST_DOMAIN}"
FOOTER = b"--\r\nYou are subscribed to announce@lists.example.org\r\n"
RELOAD_TIMEOUT = 20.0


class ListHop(AuthmilterProcess):
    """authmilter as the list's milter: authserv-id lists.example.org, sealing outbound mail."""

    key_file: Path

    def write_config(self, *, authserv_id: str = LIST_DOMAIN, extra: str = "", milter: str = "") -> None:
        sealing = (
            f'[arc]\nseal = true\nseal_mail = "outbound"\nsigning_domain = "{LIST_DOMAIN}"\n'
            f'selector = "arc"\nkey_file = "{self.key_file}"\n'
        )
        super().write_config(authserv_id=authserv_id, extra=sealing + extra, milter=milter)


@pytest.fixture(scope="module")
def list_hop(
    dns_server: AuthoritativeDns, tmp_path_factory: pytest.TempPathFactory
) -> Generator[ListHop, None, None]:
    key = rsa_key(2048)
    dns_server.add_zone(LIST_DOMAIN, f"arc._domainkey TXT {zone_txt(key.txt_record())}")
    dns_server.reload()
    workdir = tmp_path_factory.mktemp("list-authmilter")
    hop = ListHop(workdir, milter_port=free_port("127.0.0.1"), dns_port=dns_server.port, workers=1)
    hop.key_file = workdir / "arc.key"
    hop.key_file.write_bytes(key.private)
    hop.key_file.chmod(0o600)
    try:
        hop.start()
        yield hop
    finally:
        hop.stop()


def applied(message: bytes, result: MessageResult) -> bytes:
    """The message as the MTA delivers it after the milter's header changes."""
    assert result.response.kind in ("accept", "continue"), result
    head, _, body = message.partition(b"\r\n\r\n")
    fields = _fields(head)
    for change in result.modifications:
        value = change.value.replace("\r\n", "\n").replace("\n", "\r\n").encode()
        if change.kind == "chgheader" and not change.value:
            matching = [
                i for i, (name, _) in enumerate(fields) if name.lower() == change.name.lower().encode()
            ]
            del fields[matching[(change.index or 1) - 1]]
        elif change.kind == "insheader":
            fields.insert(change.index or 0, (change.name.encode(), value))
        elif change.kind == "addheader":
            fields.append((change.name.encode(), value))
    return b"".join(name + b":" + value + b"\r\n" for name, value in fields) + b"\r\n" + body


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields


def through_the_list(hop: ListHop, senders: Senders) -> bytes:
    sender = senders.reject
    original = sign(
        make_message(f"Bob <{sender.address}>", subject="ARC via a list"), sender.rsa, sender.domain, "rsa"
    )
    address = f"inet:{hop.milter_port}@127.0.0.1"
    arrived = check_message(
        address,
        original,
        client_ip=SENDING_CLIENT.address,
        client_name=SENDING_CLIENT.name,
        helo=SENDING_CLIENT.helo,
        mail_from=sender.address,
        recipients=(f"announce@{LIST_DOMAIN}",),
    )
    received = applied(original, arrived)
    assert b"Authentication-Results: lists.example.org;" in received
    assert b"dmarc=pass" in received, received[:600]
    resent = check_message(
        address,
        received + FOOTER,
        client_ip="127.0.0.1",
        client_name="localhost",
        helo="localhost",
        mail_from=LIST_SENDER,
        recipients=("alice@receiver.example",),
    )
    sealed = applied(received + FOOTER, resent)
    assert sealed.startswith(b"ARC-Seal: a=rsa-sha256;"), sealed[:300]
    assert b"cv=none" in sealed, sealed[:1200]
    assert b"ARC-Authentication-Results: i=1;\r\n lists.example.org;" in sealed, sealed[:1200]
    return sealed


def _eventually(condition: Callable[[], bool], timeout: float = RELOAD_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_a_list_copy_is_rejected_unless_the_sealer_is_trusted(
    mta: Mta, senders: Senders, list_hop: ListHop, milter_process: AuthmilterProcess
) -> None:
    if getattr(mta, "name", "postfix") != "postfix":
        # The MX must see the list's address (XCLIENT); an MTA without it (the Sendmail harness
        # on main) would show a loopback client, which is an internal host.
        pytest.skip("needs XCLIENT to claim the list's address")
    message = through_the_list(list_hop, senders)
    untrusted = mta.send(message, mail_from=LIST_SENDER, client=LIST_CLIENT)
    assert untrusted.code == 550 and untrusted.text.startswith("5.7.26"), untrusted
    assert senders.reject.domain in untrusted.text

    milter_process.write_config(extra=f'[arc]\ntrusted_sealers = ["{LIST_DOMAIN}"]\n')
    try:
        milter_process.signal(signal.SIGHUP)
        assert _eventually(lambda: mta.send(message, mail_from=LIST_SENDER, client=LIST_CLIENT).accepted), (
            f"the trusted sealer was never honoured (supervisor running: {milter_process.running})"
        )
    finally:
        milter_process.write_config()
        milter_process.signal(signal.SIGHUP)
    ours = mta.delivered(_message_id(message)).header_values("Authentication-Results")[0]
    assert ours.startswith("mx.receiver.example;"), ours
    assert "dmarc=fail (p=reject dis=none, reject overridden by trusted ARC sealer lists.example.org)" in ours
    assert "arc=pass (i=1 sealers lists.example.org)" in ours and "header.oldest-pass=0" in ours
    assert "smtp.remote-ip=198.51.100.20" in ours
    assert _eventually(lambda: mta.send(message, mail_from=LIST_SENDER, client=LIST_CLIENT).code == 550), (
        "the first config (no trusted sealer) did not return"
    )


def _message_id(message: bytes) -> str:
    start = message.index(b"Message-ID: ") + len(b"Message-ID: ")
    return message[start : message.index(b"\r\n", start)].decode()

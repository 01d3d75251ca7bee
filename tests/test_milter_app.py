"""The milter adapter driven callback by callback, as an MTA would, with pymilter's TestCtx.

What TestCtx cannot do, and what stands in for it here: its ``chgheader`` ignores the index (it
deletes every field of that name), its ``addheader`` ignores the insert position, its
``quarantine`` raises, its ``_connect`` passes the address as a bare string and gives up on a
NOREPLY answer, and its ``_negotiate`` changes the class's default offer in place. ``MtaCtx`` below
keeps TestCtx for everything else and plays the MTA for those: it records every change with its
index and applies it to the header list the way Postfix numbers fields (1-based per name, insert
at 0 = top), so the tests check the resulting header block, not just the calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.name
import dns.rdatatype
import Milter
import pytest
from Milter import testctx

from authmilter import dkim_rsa, milter_app
from authmilter.actions import FailureAction
from authmilter.config import Config, default_config
from authmilter.dkim_sign import SigningSettings
from authmilter.dkim_verify import DkimSettings, verify_dkim
from authmilter.dmarc import DmarcSettings, organizational_domain
from authmilter.history import HistoryError, HistorySettings, read_history
from authmilter.keys import KeyFileError
from authmilter.logformat import JsonFormatter
from authmilter.metrics import MULTIPROCESS_ENV, Metrics
from authmilter.metrics import enable as enable_metrics
from authmilter.milter_app import (
    ACTIONS,
    AuthMilter,
    HistoryRecorder,
    Runtime,
    build_runtime,
    client_ip_from,
    message_counts,
    serve,
)
from authmilter.model import AuthResult, Verdict
from authmilter.pipeline import Transaction
from authmilter.resolver import DnsAnswer, DnsSettings, NameserverSource, Resolver, ZoneFileSource, tempfail
from authmilter.session import MAX_RECIPIENTS
from dnsserver import AuthoritativeDns
from milterclient import split_message
from scrape import parse
from scrape import value as sample
from signing import SigningKey, ed25519_key, make_message, rsa_key, sign, with_tight_fields, zone_txt

AUTHSERV_ID = "mx.receiver.example"
INSIDE_IP = "192.0.2.10"  # allowed by sender.example's SPF record
OUTSIDE_IP = "203.0.113.5"  # not allowed
SOA = "$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n"
DNS_DOWN = dns.name.from_text("dnsdown.example.")
RESOLVER_BUG = dns.name.from_text("bug.example.")
A_R = "Authentication-Results"
# Everything libmilter 1.0.1 can offer.
MTA_OFFER = (Milter.CURR_ACTS, 0x1FFFFF, 0, 0)  # Postfix 3.7: every step, SMFIP_HDR_LEADSPC too
# An MTA without SMFIP_HDR_LEADSPC (it drops one space after each colon and adds one to new fields).
OLD_MTA_OFFER = (Milter.CURR_ACTS, 0x1FFFFF & ~Milter.P_HDR_LEADSPC, 0, 0)
LOGGER = "authmilter.milter_app"


# --- the MTA's side -------------------------------------------------------------------------------


def mta_fields(raw: bytes, leading_space: bool = False) -> list[tuple[str, bytes]]:
    """Header fields as Postfix passes them to a milter (milterclient.split_message), values as bytes."""
    fields, _ = split_message(raw, leading_space)
    return [(name, value.encode("utf-8", "surrogateescape")) for name, value in fields]


class MtaCtx(testctx.TestCtx):  # type: ignore[misc]
    """TestCtx playing the MTA: per-stage macros, header changes applied by index, noreply aware."""

    def __init__(self) -> None:
        super().__init__()
        self.macros: dict[int, dict[str, str]] = {}
        self.failing_stage: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.changes: list[tuple[Any, ...]] = []
        self._stage: int | None = -1
        self._reply: tuple[str, ...] | None = None
        self.offer = MTA_OFFER
        self.connect_reply: int | None = None

    @property
    def reply(self) -> tuple[str, ...]:
        """What setreply() was given: code, enhanced code, text."""
        assert self._reply is not None, "no reply set"
        return self._reply

    @property
    def app(self) -> AuthMilter:
        milter: AuthMilter = self.getpriv()
        return milter

    # libmilter's context, as the milter sees it

    def getsymval(self, name: str) -> str | None:
        if self._stage == self.failing_stage:
            raise RuntimeError("libmilter context gone")
        return self.macros.get(-1 if self._stage is None else self._stage, {}).get(name)

    def addheader(self, field: str, value: str, idx: int) -> None:
        assert self._body is not None, "addheader outside eom"
        if self.leading_space:
            # The MTA adds no space after the colon: the milter must have put it there. Recorded
            # without it, as an MTA without the extension would show the value.
            assert value.startswith(" "), f"{field}:{value!r} would have no space after the colon"
            value = value[1:]
        self.changes.append(("add", field, value, idx))
        self.headers.insert(len(self.headers) if idx < 0 else idx, (field, value))

    def chgheader(self, field: str, idx: int, value: str) -> None:
        assert self._body is not None, "chgheader outside eom"
        self.changes.append(("change", field, idx, value))
        positions = [i for i, (name, _) in enumerate(self.headers) if name.lower() == field.lower()]
        if idx <= len(positions):  # Postfix ignores an index past the last field
            position = positions[idx - 1]
            if value:
                self.headers[position] = (field, value)
            else:
                del self.headers[position]

    def quarantine(self, reason: str) -> None:
        assert self._body is not None, "quarantine outside eom"
        self.changes.append(("quarantine", reason))

    @property
    def leading_space(self) -> bool:
        """SMFIP_HDR_LEADSPC was negotiated."""
        return bool(self._protocol & Milter.P_HDR_LEADSPC)

    @property
    def awaits_mail_reply(self) -> bool:
        """SMFIP_NR_MAIL was not negotiated: the MTA waits for the milter's MAIL FROM reply."""
        return not self._protocol & Milter.P_NR_MAIL

    # the MTA's moves

    def _negotiate(self) -> int:
        self._body = None
        self._priv = None
        self._stage = -1
        self._opts = list(self.offer)
        rc: int = Milter.negotiate_callback(self, self._opts)
        self._protocol = self._opts[1]
        return rc

    def connect(
        self,
        ip: str = INSIDE_IP,
        family: int = socket.AF_INET,
        hostname: str = "mx.sender.example",
        helo: str = "mx.sender.example",
    ) -> None:
        assert self._negotiate() == Milter.CONTINUE
        hostaddr: object = ip  # a unix socket's name
        if family == socket.AF_INET:
            hostaddr = (ip, 40000)
        elif family == socket.AF_INET6:
            hostaddr = (ip, 40000, 0, 0)
        self._stage = Milter.M_CONNECT
        self.connect_reply = Milter.connect_callback(self, hostname, family, hostaddr)
        if self.connect_reply == Milter.ACCEPT:
            return  # the MTA sends this milter nothing more on this connection (milter8.c)
        awaited = not self._protocol & Milter.P_NR_CONN
        assert self.connect_reply == (Milter.CONTINUE if awaited else Milter.NOREPLY)
        self._stage = Milter.M_HELO
        assert self.app.hello(helo) == Milter.NOREPLY

    def start(self, raw: bytes, mail_from: str, rcpts: tuple[str, ...]) -> None:
        """MAIL FROM, RCPT TO and the header fields; none gets a reply but an awaited MAIL FROM."""
        self.changes, self._reply, self._body = [], None, None
        self._stage = Milter.M_ENVFROM
        mail_reply = self.app.envfrom_bytes(f"<{mail_from}>".encode(), b"SIZE=1000")
        assert mail_reply == (Milter.CONTINUE if self.awaits_mail_reply else Milter.NOREPLY)
        self._stage = Milter.M_ENVRCPT
        for rcpt in rcpts:
            assert self.app.envrcpt_bytes(f"<{rcpt}>".encode()) == Milter.NOREPLY
        self._stage = Milter.M_DATA
        fields = mta_fields(raw, self.leading_space)
        self.headers = [(name, value.decode("latin-1")) for name, value in mta_fields(raw)]
        for name, value in fields:
            assert self.app.header_bytes(name, value) == Milter.NOREPLY

    def send(
        self,
        raw: bytes,
        mail_from: str = "bob@sender.example",
        rcpts: tuple[str, ...] = ("alice@receiver.example",),
    ) -> int:
        """One whole message; returns the eom answer."""
        self.start(raw, mail_from, rcpts)
        body = raw.split(b"\r\n\r\n", 1)[1]
        for offset in range(0, len(body), 65535):  # libmilter's MILTER_CHUNK_SIZE
            assert self.app.body(body[offset : offset + 65535]) == Milter.NOREPLY
        rc: int = self._eom()
        return rc

    def rset(self) -> None:
        self._stage = None
        self.app.abort()


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {"rsa": rsa_key(2048), "ed": ed25519_key()}


@pytest.fixture(scope="module")
def zone_files(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]) -> list[Path]:
    folder = tmp_path_factory.mktemp("zones")
    (folder / "sender.example.zone").write_text(
        SOA + '@ IN TXT "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"\n'
        '_dmarc IN TXT "v=DMARC1; p=reject"\n'
        f"rsa1._domainkey IN TXT {zone_txt(keys['rsa'].txt_record())}\n"
        f"ed1._domainkey IN TXT {zone_txt(keys['ed'].txt_record())}\n"
    )
    (folder / "quarantine.example.zone").write_text(
        SOA + '@ IN TXT "v=spf1 ip4:192.0.2.0/24 -all"\n_dmarc IN TXT "v=DMARC1; p=quarantine"\n'
    )
    return sorted(folder.glob("*.zone"))


class ScriptedSource:
    """The zone files, plus a domain whose DNS is down and one that trips a bug in the resolver."""

    def __init__(self, zone_files: list[Path]) -> None:
        self.zones = ZoneFileSource(zone_files)

    def lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> DnsAnswer:
        if name.is_subdomain(DNS_DOWN):
            return tempfail("timeout asking 192.0.2.53")
        if name.is_subdomain(RESOLVER_BUG):
            raise RuntimeError("resolver bug")
        return self.zones.lookup(name, rdtype)


def make_config(policy: dict[str, Any] | None = None, **milter: Any) -> Config:
    base = default_config()
    return dataclasses.replace(
        base,
        milter=dataclasses.replace(base.milter, authserv_id=AUTHSERV_ID, **milter),
        policy=dataclasses.replace(base.policy, **(policy or {})),
    )


class History:
    def __init__(self) -> None:
        self.records: list[tuple[Verdict, Transaction, float]] = []

    def record(self, verdict: Verdict, transaction: Transaction, now: float) -> None:
        self.records.append((verdict, transaction, now))


Connect = Callable[..., MtaCtx]


@pytest.fixture
def history() -> History:
    return History()


@pytest.fixture
def connect(zone_files: list[Path], history: History, monkeypatch: pytest.MonkeyPatch) -> Iterator[Connect]:
    """Open a connection as serve() would: ``connect(config=, resolver=, macros=, offer=, ip=, ...)``."""

    def open_connection(
        config: Config | None = None,
        resolver: Resolver | None = None,
        macros: dict[int, dict[str, str]] | None = None,
        offer: tuple[int, int, int, int] = MTA_OFFER,
        metrics: Metrics | None = None,
        **kw: Any,
    ) -> MtaCtx:
        resolver = resolver or Resolver(ScriptedSource(zone_files), observer=metrics)
        runtime = Runtime(config or make_config(), resolver, history, metrics=metrics)
        monkeypatch.setattr(Milter, "factory", lambda: AuthMilter(runtime))
        ctx = MtaCtx()
        ctx.macros = macros or {}
        ctx.offer = offer
        ctx.connect(**kw)
        return ctx

    yield open_connection


@pytest.fixture
def signed(keys: dict[str, SigningKey]) -> Callable[..., bytes]:
    def make(key: str = "rsa", **kw: Any) -> bytes:
        return sign(make_message(**kw), keys[key], "sender.example", f"{key}1")

    return make


def our_ar(ctx: MtaCtx) -> list[str]:
    return [value for name, value in ctx.headers if name == A_R and value.startswith(AUTHSERV_ID + ";")]


# --- negotiation ----------------------------------------------------------------------------------


def test_negotiates_only_the_actions_and_steps_it_uses(connect: Connect) -> None:
    ctx = connect()
    actions, protocol = ctx._opts[0], ctx._opts[1]
    assert actions == ACTIONS == Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE
    no_reply = Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_RCPT | Milter.P_NR_HDR | Milter.P_NR_BODY
    skipped = Milter.P_NOEOH | Milter.P_NODATA | Milter.P_NOUNKNOWN
    # MAIL FROM too: a zone-file resolver sends nothing ahead, so nothing is gained by awaiting it
    # (the next test).
    assert protocol & (no_reply | Milter.P_NR_MAIL) == no_reply | Milter.P_NR_MAIL
    assert protocol & skipped == skipped
    needed = Milter.P_NOCONNECT | Milter.P_NOHELO | Milter.P_NOMAIL | Milter.P_NORCPT
    unused = Milter.P_SKIP | Milter.P_RCPT_REJ | Milter.P_NR_EOH | Milter.P_NR_DATA
    assert protocol & (needed | Milter.P_NOHDRS | Milter.P_NOBODY | unused) == 0
    assert protocol & Milter.P_HDR_LEADSPC  # header values as sent (see milter_app's docstring)
    assert ctx._opts[2:] == [0, 0]


def test_mail_from_is_awaited_only_when_it_starts_lookups(
    connect: Connect, dns_server: AuthoritativeDns
) -> None:
    """Postfix holds the events it awaits no reply for until one it does: an unawaited MAIL FROM
    reached the milter only at end of data, and the SPF lookups it starts with it."""
    nameservers = NameserverSource([dns_server.host], port=dns_server.port, timeout=2.0)
    prefetching = connect(resolver=Resolver(nameservers))
    assert prefetching.awaits_mail_reply  # [dns] prefetch_queries is on by default
    assert prefetching.send(make_message()) == Milter.ACCEPT
    base = make_config()
    off = dataclasses.replace(base, dns=dataclasses.replace(base.dns, prefetch_queries=0))
    assert not connect(config=off, resolver=Resolver(nameservers)).awaits_mail_reply
    uncached = Resolver(nameservers, cache_size=0)  # a prefetched answer would have nowhere to wait
    assert not connect(resolver=uncached).awaits_mail_reply
    zone_files = connect()  # answered at once: nothing to send ahead
    assert not zone_files.awaits_mail_reply
    assert zone_files.send(make_message()) == Milter.ACCEPT


def test_header_values_reach_dkim_as_sent(connect: Connect, keys: dict[str, SigningKey]) -> None:
    """With SMFIP_HDR_LEADSPC, "Subject:tight" and "To:<TAB>..." stay as they are, so a signature
    with ``simple`` header canonicalization (RFC 6376 §3.4.1) over them verifies."""
    simple = (b"simple", b"simple")
    raw = sign(with_tight_fields(make_message()), keys["rsa"], "sender.example", "rsa1", canonicalize=simple)
    ctx = connect(ip=OUTSIDE_IP)
    assert ctx.send(raw) == Milter.ACCEPT
    [ours] = our_ar(ctx)
    assert "dkim=pass header.d=sender.example" in ours, ours


def test_header_and_body_callbacks_give_no_reply(connect: Connect, signed: Callable[..., bytes]) -> None:
    ctx = connect()
    ctx.start(signed(), "bob@sender.example", ("alice@receiver.example",))
    assert ctx.app.header_bytes("X-Extra", b"value") == Milter.NOREPLY
    assert ctx.app.body(b"Hi\r\n") == Milter.NOREPLY


# --- verdicts applied -----------------------------------------------------------------------------


@pytest.mark.parametrize("offer", [MTA_OFFER, OLD_MTA_OFFER], ids=["leadspc", "no-leadspc"])
@pytest.mark.parametrize("key", ["rsa", "ed"])
def test_signed_message_is_accepted_with_our_ar_on_top(
    connect: Connect, signed: Callable[..., bytes], key: str, offer: tuple[int, int, int, int]
) -> None:
    ctx = connect(offer=offer)
    assert ctx.leading_space == (offer == MTA_OFFER)
    assert ctx.send(signed(key)) == Milter.ACCEPT
    [(kind, name, value, index)] = ctx.changes
    assert (kind, name, index) == ("add", A_R, 0)
    assert ctx.headers[0] == (A_R, value)
    assert value.startswith(f"{AUTHSERV_ID};")
    assert "spf=pass" in value
    assert re.search(rf"dkim=pass header\.d=sender\.example [^;]*header\.s={key}1\s", value)
    assert "dmarc=pass" in value
    assert "\r" not in value  # libmilter adds the CR; folds are LF + TAB
    assert ctx._reply is None


def test_forged_ar_deleted_last_first_and_foreign_kept(
    connect: Connect, signed: Callable[..., bytes]
) -> None:
    ctx = connect()
    extra = (
        f"{A_R}: {AUTHSERV_ID}; dkim=pass header.d=sender.example\r\n"
        f"{A_R}: mx.other.example; spf=pass smtp.mailfrom=other.example\r\n"
        f"{A_R}: MX.Receiver.Example; dmarc=pass header.from=sender.example\r\n"
    )
    assert ctx.send(signed(extra_headers=extra)) == Milter.ACCEPT
    assert [c[:4] for c in ctx.changes[:2]] == [("change", A_R, 3, ""), ("change", A_R, 1, "")]
    assert ctx.changes[2][0::3] == ("add", 0)  # ours inserted after the deletions
    remaining = [value for name, value in ctx.headers if name == A_R]
    assert len(remaining) == 2
    assert remaining[0].startswith(f"{AUTHSERV_ID};\n\tspf=pass")
    assert remaining[1] == "mx.other.example; spf=pass smtp.mailfrom=other.example"


def test_spoofed_message_from_reject_domain_gets_550(connect: Connect) -> None:
    ctx = connect(ip=OUTSIDE_IP)
    assert ctx.send(make_message()) == Milter.REJECT
    code, enhanced, text = ctx.reply
    assert (code, enhanced) == ("550", "5.7.26")
    assert text.startswith("Rejected by the DMARC policy of sender.example: ")
    assert ctx.changes == []


@pytest.mark.parametrize("mode", ["hold", "header"])
def test_quarantine_by_hold_or_header(connect: Connect, mode: str) -> None:
    ctx = connect(config=make_config(quarantine=mode), ip=OUTSIDE_IP)
    raw = make_message(from_header="Bob <bob@quarantine.example>")
    assert ctx.send(raw, mail_from="bob@quarantine.example") == Milter.ACCEPT
    assert ctx.changes[0][0::3] == ("add", 0)
    assert our_ar(ctx) and "dmarc=fail" in our_ar(ctx)[0]
    [quarantine] = ctx.changes[1:]
    if mode == "hold":
        assert quarantine[0] == "quarantine" and quarantine[1].startswith("dmarc=fail")
        assert not any(name == "X-Authmilter-Quarantine" for name, _ in ctx.headers)
    else:
        assert quarantine[:2] == ("add", "X-Authmilter-Quarantine")
        assert quarantine[2].startswith("dmarc=fail") and quarantine[2].isprintable()


def test_dns_temperror_gets_451(connect: Connect) -> None:
    ctx = connect(ip=OUTSIDE_IP)
    raw = make_message(from_header="bob@dnsdown.example")
    assert ctx.send(raw, mail_from="bob@dnsdown.example") == Milter.TEMPFAIL
    code, enhanced, text = ctx.reply
    assert (code, enhanced) == ("451", "4.4.3") and "dnsdown.example" in text
    assert ctx.changes == []


# --- outbound mail: signed, not verified ---------------------------------------------------------


FORGED = f"{A_R}: {AUTHSERV_ID}; dmarc=pass header.from=sender.example\r\n"
SIG = "DKIM-Signature"


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]) -> SigningSettings:
    """KeyTable and SigningTable signing sender.example mail with rsa1 and ed1 (both published)."""
    folder = tmp_path_factory.mktemp("tables")
    for name, key in keys.items():
        path = folder / f"{name}.private"
        path.write_bytes(key.private)
        path.chmod(0o600)
    (folder / "KeyTable").write_text(
        f"rsa sender.example:rsa1:{folder}/rsa.private\ned sender.example:ed1:{folder}/ed.private\n"
    )
    (folder / "SigningTable").write_text("*@sender.example rsa\n*@sender.example ed\n")
    return SigningSettings(
        key_table=str(folder / "KeyTable"),
        signing_table=f"refile:{folder / 'SigningTable'}",
        multiple_signatures=True,
        sign_daemon_names=("submission",),
    )


def signing_config(settings: SigningSettings, **milter: Any) -> Config:
    return dataclasses.replace(make_config(**milter), signing=settings)


def delivered(ctx: MtaCtx, raw: bytes) -> bytes:
    """The message as the MTA writes it after the milter's changes (CRLF, "Name: value")."""
    head = "".join(f"{name}: {value}".replace("\n", "\r\n") + "\r\n" for name, value in ctx.headers)
    return head.encode("latin-1") + b"\r\n" + raw.split(b"\r\n\r\n", 1)[1]


def assert_signed_twice(ctx: MtaCtx, raw: bytes, zone_files: list[Path]) -> None:
    """RSA on top, then Ed25519; both verify on the delivered message; no A-R of ours."""
    added = [change for change in ctx.changes if change[0] == "add"]
    assert [(name, index) for _, name, _, index in added] == [(SIG, 0), (SIG, 0)]
    signatures = [value for name, value in ctx.headers if name == SIG]
    assert [re.search(r"a=([a-z0-9-]+)", v).group(1) for v in signatures] == [  # type: ignore[union-attr]
        "rsa-sha256",
        "ed25519-sha256",
    ]
    assert ctx.headers[0][0] == SIG and our_ar(ctx) == []
    assert all("\r" not in value for value in signatures)
    results = verify_dkim(delivered(ctx, raw), Resolver(ZoneFileSource(zone_files)), DkimSettings())
    assert [(r.result, r.selector) for r in results] == [(AuthResult.PASS, "rsa1"), (AuthResult.PASS, "ed1")]


def test_internal_host_is_signed_not_verified_and_forged_ar_deleted_first(
    connect: Connect,
    zone_files: list[Path],
    signing: SigningSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = Resolver(ScriptedSource(zone_files))
    config = signing_config(signing, internal_hosts=("10.0.0.0/8",))
    ctx = connect(config=config, resolver=resolver, ip="10.1.2.3")
    ctx.macros[Milter.M_EOM] = {"i": "INT1"}
    raw = make_message(extra_headers=FORGED)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert ctx.send(raw) == Milter.ACCEPT
    # The forged A-R goes first: the signatures are made for, and added to, the final header set.
    assert ctx.changes[0] == ("change", A_R, 1, "")
    assert not any(name == A_R for name, _ in ctx.headers)
    assert_signed_twice(ctx, raw, zone_files)
    assert resolver.queries == 0  # not verified at all
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(
        "queue_id=INT1 client=10.1.2.3 from=sender.example outbound: internal host "
        "(10.0.0.0/8 at <defaults>:[milter].internal_hosts:1); signed for bob@sender.example: "
        "d=sender.example s=rsa1 ("
    )
    assert "signatures=2 action=accept" in line


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_authenticated_client_is_signed(
    connect: Connect, zone_files: list[Path], signing: SigningSettings, canonicalization: str
) -> None:
    settings = dataclasses.replace(signing, canonicalization=canonicalization)
    ctx = connect(config=signing_config(settings), ip=OUTSIDE_IP)
    ctx.macros[Milter.M_ENVFROM] = {"{auth_type}": "PLAIN", "{auth_authen}": "bob"}
    raw = make_message()
    assert ctx.send(raw) == Milter.ACCEPT  # not rejected: outbound mail is not judged by DMARC
    assert_signed_twice(ctx, raw, zone_files)


@pytest.mark.parametrize("daemon, signed", [("submission", True), ("smtpd", False)])
def test_daemon_name_decides(
    connect: Connect, zone_files: list[Path], signing: SigningSettings, daemon: str, signed: bool
) -> None:
    ctx = connect(
        config=signing_config(signing), ip=OUTSIDE_IP, macros={Milter.M_CONNECT: {"{daemon_name}": daemon}}
    )
    raw = make_message()
    if signed:
        assert ctx.send(raw) == Milter.ACCEPT
        assert_signed_twice(ctx, raw, zone_files)
    else:  # verified like any inbound mail: DMARC p=reject, spoofed from outside
        assert ctx.send(raw) == Milter.REJECT


def test_outside_mail_is_verified_not_signed(
    connect: Connect, signed: Callable[..., bytes], signing: SigningSettings
) -> None:
    ctx = connect(config=signing_config(signing))
    assert ctx.send(signed()) == Milter.ACCEPT
    assert [c[1] for c in ctx.changes] == [A_R]
    assert "dmarc=pass" in our_ar(ctx)[0]
    assert [name for name, _ in ctx.headers].count(SIG) == 1  # the sender's own, nothing added


def test_outbound_without_a_table_entry_passes_unsigned_saying_why(
    connect: Connect, signing: SigningSettings, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = connect(config=signing_config(signing), ip="127.0.0.1")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert (
            ctx.send(make_message(from_header="olga@other.example"), mail_from="olga@other.example")
            == Milter.ACCEPT
        )
    assert ctx.changes == []
    assert "not signed: no SigningTable entry for olga@other.example (tried 2 patterns against" in caplog.text
    assert "signatures=0 action=accept" in caplog.text


def test_internal_hosts_by_verified_name_and_exclusion(
    connect: Connect, signing: SigningSettings, caplog: pytest.LogCaptureFixture
) -> None:
    config = signing_config(signing, internal_hosts=(".sender.example", "!bad.sender.example"))
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        inside = connect(config=config, ip=OUTSIDE_IP, hostname="mx.sender.example")
    assert "client=203.0.113.5 name=mx.sender.example internal_hosts: .sender.example at " in caplog.text
    assert inside.send(make_message()) == Milter.ACCEPT
    assert [name for name, _ in inside.headers[:2]] == [SIG, SIG]
    excluded = connect(config=config, ip=OUTSIDE_IP, hostname="bad.sender.example")
    assert excluded.send(make_message()) == Milter.REJECT
    unverified = connect(config=config, ip=OUTSIDE_IP, hostname="[203.0.113.5]")  # no PTR name
    assert unverified.send(make_message()) == Milter.REJECT


def test_ignored_host_is_accepted_at_connect_and_internal_host_still_signed(
    connect: Connect, zone_files: list[Path], signing: SigningSettings, caplog: pytest.LogCaptureFixture
) -> None:
    config = signing_config(signing, internal_hosts=("10.0.0.0/8",), ignore_hosts=("192.0.2.0/24",))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ignored = connect(config=config, ip="192.0.2.99")
    # Accepted at connect, and the MTA was made to wait for that answer: it then leaves the
    # milter out of the whole connection (no A-R removed or added, no signature, no history).
    assert ignored.connect_reply == Milter.ACCEPT
    assert not ignored._protocol & Milter.P_NR_CONN
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("client=192.0.2.99 name=mx.sender.example ignored (ignore_hosts: 192.0.2.0/24 at ")
    internal = connect(config=config, ip="10.1.2.3")
    assert internal.connect_reply == Milter.CONTINUE
    raw = make_message()
    assert internal.send(raw) == Milter.ACCEPT
    assert_signed_twice(internal, raw, zone_files)
    inbound = connect(config=config, ip=OUTSIDE_IP)
    assert inbound.connect_reply == Milter.CONTINUE
    assert inbound.send(make_message()) == Milter.REJECT  # still verified: p=reject, spoofed


def test_a_r_of_the_sites_other_authserv_ids_are_removed(
    connect: Connect, signed: Callable[..., bytes]
) -> None:
    config = make_config(remove_authserv_ids=("mx2.receiver.example",))
    ctx = connect(config=config)
    raw = signed(
        extra_headers=f"{A_R}: MX2.Receiver.Example; dmarc=pass header.from=sender.example\r\n"
        f"{A_R}: other.example; dmarc=pass header.from=sender.example\r\n"
    )
    assert ctx.send(raw) == Milter.ACCEPT
    assert ("change", A_R, 1, "") in ctx.changes
    kept = [value.split(";")[0] for name, value in ctx.headers if name == A_R]
    assert kept == [AUTHSERV_ID, "other.example"]


def test_unreadable_key_tempfails_rather_than_send_unsigned(
    connect: Connect, tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    key = tmp_path / "rsa.private"
    key.write_bytes(keys["rsa"].private)
    key.chmod(0o600)
    (tmp_path / "KeyTable").write_text(f"rsa sender.example:rsa1:{key}\n")
    (tmp_path / "SigningTable").write_text("sender.example rsa\n")
    settings = SigningSettings(
        key_table=str(tmp_path / "KeyTable"), signing_table=str(tmp_path / "SigningTable")
    )
    config = signing_config(settings)
    assert config.signing_table is not None  # valid when loaded
    key.unlink()
    ctx = connect(config=config, ip="127.0.0.1")
    assert ctx.send(make_message()) == Milter.TEMPFAIL
    assert ctx.reply[:2] == ("451", "4.3.0")
    with pytest.raises(KeyFileError, match="cannot read the key file"):
        build_runtime(config)


def test_authenticated_client_is_not_verified(connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    ctx = connect(ip=OUTSIDE_IP)
    ctx.macros[Milter.M_ENVFROM] = {"{auth_type}": "PLAIN", "{auth_authen}": "bob"}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert ctx.send(make_message(extra_headers=FORGED)) == Milter.ACCEPT
    assert ctx.changes == [("change", A_R, 1, "")]
    assert "outbound: authenticated as bob; not signed: no signing tables configured" in caplog.text


def test_authenticated_client_verified_when_configured(connect: Connect) -> None:
    ctx = connect(config=make_config(skip_authenticated=False), ip=OUTSIDE_IP)
    ctx.macros[Milter.M_ENVFROM] = {"{auth_type}": "PLAIN", "{auth_authen}": "bob"}
    assert ctx.send(make_message()) == Milter.REJECT


def test_local_submission_counts_as_loopback(connect: Connect) -> None:
    ctx = connect(ip="/var/spool/postfix/public/cleanup", family=socket.AF_UNIX)
    assert ctx.send(make_message()) == Milter.ACCEPT
    assert our_ar(ctx) == []
    ctx = connect(config=make_config(internal_hosts=()), ip="/run/sock", family=socket.AF_UNIX)
    assert ctx.send(make_message()) == Milter.REJECT  # no address: SPF none, DMARC fails


# --- connection details ---------------------------------------------------------------------------


@pytest.mark.parametrize("ip, expected", [("2001:db8::25", "2001:db8::25"), ("::ffff:192.0.2.10", INSIDE_IP)])
def test_ipv6_client(connect: Connect, caplog: pytest.LogCaptureFixture, ip: str, expected: str) -> None:
    ctx = connect(ip=ip, family=socket.AF_INET6)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert ctx.send(make_message()) == Milter.ACCEPT
    assert "spf=pass" in our_ar(ctx)[0]
    assert f"client={expected} " in caplog.text


@pytest.mark.parametrize(
    "family, hostaddr, expected",
    [
        (socket.AF_INET, ("192.0.2.1", 25), "192.0.2.1"),
        (socket.AF_INET6, ("2001:DB8::1", 25, 0, 0), "2001:db8::1"),
        (socket.AF_INET6, ("fe80::1%eth0", 25, 0, 2), "fe80::1"),
        (socket.AF_INET6, ("::FFFF:192.0.2.1", 25, 0, 0), "192.0.2.1"),  # RFC 4291 §2.5.5.2
        (socket.AF_INET, "192.0.2.1", "192.0.2.1"),
        (socket.AF_UNIX, "/run/sock", ""),
        (socket.AF_INET, None, ""),
        (socket.AF_INET, ("not an address", 25), ""),
    ],
)
def test_client_ip_from(family: int, hostaddr: object, expected: str) -> None:
    assert client_ip_from(family, hostaddr) == expected


def test_envelope_and_macros_reach_the_transaction(
    connect: Connect, signed: Callable[..., bytes], history: History
) -> None:
    connect_macros = {"j": "mx.receiver.example", "{daemon_name}": "smtpd", "v": "Postfix"}
    ctx = connect(hostname="[192.0.2.10]", macros={Milter.M_CONNECT: connect_macros})
    ctx.macros[Milter.M_ENVFROM] = {"i": "EARLY1"}
    rcpts = tuple(f"user{n}@receiver.example" for n in range(MAX_RECIPIENTS + 5))
    assert ctx.send(signed(), rcpts=rcpts) == Milter.ACCEPT
    [(_, transaction, _)] = history.records
    assert transaction.queue_id == "EARLY1"  # no `i` at eom: the one from MAIL FROM stays
    assert transaction.mail_from == "bob@sender.example"
    assert transaction.recipients == rcpts[:MAX_RECIPIENTS]
    connection = transaction.connection
    assert (connection.client_ip, connection.helo, connection.client_name) == (
        INSIDE_IP,
        "mx.sender.example",
        "",
    )
    assert connection.macros == {"j": "mx.receiver.example", "{daemon_name}": "smtpd"}


def test_queue_id_is_made_safe_for_every_line_that_names_it(
    connect: Connect, signed: Callable[..., bytes], history: History
) -> None:
    ctx = connect()
    ctx.macros[Milter.M_ENVFROM] = {"i": "Q1\nauthmilter[1]: INFO forged"}
    assert ctx.send(signed()) == Milter.ACCEPT
    [(_, transaction, _)] = history.records
    # The pipeline and the resolver log transaction.queue_id as it is: no line break may reach them.
    assert transaction.queue_id == "Q1?authmilter[1]: INFO forged"


# --- failures -------------------------------------------------------------------------------------


def test_a_check_that_raises_is_its_temperror_with_queue_id(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = connect(ip=OUTSIDE_IP)
    ctx.macros[Milter.M_EOM] = {"i": "QBUG1"}
    raw = make_message(from_header="bob@bug.example")
    with caplog.at_level(logging.INFO):
        assert ctx.send(raw, mail_from="bob@bug.example") == Milter.TEMPFAIL
    assert ctx.reply[:2] == ("451", "4.4.3")  # [policy] dmarc_temperror, not internal_error
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "QBUG1" in errors[0].getMessage() and errors[0].exc_info is not None


def test_a_check_that_raises_keeps_the_other_results(connect: Connect) -> None:
    ctx = connect(config=make_config(policy={"dmarc_temperror": FailureAction.ACCEPT}), ip=OUTSIDE_IP)
    raw = make_message(from_header="bob@bug.example")
    assert ctx.send(raw, mail_from="bob@bug.example") == Milter.ACCEPT
    (value,) = our_ar(ctx)
    # pyspf turns the resolver's exception into its own permerror; DMARC's becomes dmarc=temperror.
    assert [clause.split()[0] for clause in value.split(";")[1:]] == [
        "spf=permerror",
        "spf=none",
        "dkim=none",
        "dmarc=temperror",
        "arc=none",
    ]


@pytest.mark.parametrize("stage", [Milter.M_CONNECT, Milter.M_ENVFROM, Milter.M_EOM])
def test_exception_in_a_callback_tempfails(
    connect: Connect, signed: Callable[..., bytes], caplog: pytest.LogCaptureFixture, stage: int
) -> None:
    healthy = connect()  # also installs the factory for the next one
    ctx = MtaCtx()
    ctx.macros = {Milter.M_ENVFROM: {"i": "QFAIL1"}, Milter.M_EOM: {"i": "QFAIL1"}}
    ctx.failing_stage = stage
    ctx.connect()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert ctx.send(signed()) == Milter.TEMPFAIL
    assert ctx.reply[:2] == ("451", "4.3.0") and "RuntimeError" in ctx.reply[2]
    assert ctx.changes == []
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.exc_info is not None and "libmilter context gone" in error.getMessage()
    assert "queue_id=QFAIL1" in caplog.text and "action=tempfail" in caplog.text
    assert healthy.send(signed()) == Milter.ACCEPT  # another connection is unaffected


def test_failure_is_per_message_but_per_connection_after_connect(
    connect: Connect, signed: Callable[..., bytes]
) -> None:
    ctx = connect()
    ctx.failing_stage = Milter.M_ENVFROM
    assert ctx.send(signed()) == Milter.TEMPFAIL
    ctx.failing_stage = None
    assert ctx.send(signed()) == Milter.ACCEPT
    ctx = MtaCtx()
    ctx.failing_stage = Milter.M_CONNECT
    ctx.connect()
    ctx.failing_stage = None
    assert ctx.send(signed()) == Milter.TEMPFAIL
    assert ctx.send(signed()) == Milter.TEMPFAIL  # the connection never got its client address


@pytest.mark.parametrize("choice", [FailureAction.REJECT, FailureAction.ACCEPT])
def test_failure_action_is_configurable(
    connect: Connect, signed: Callable[..., bytes], choice: FailureAction
) -> None:
    ctx = connect(config=make_config(policy={"internal_error": choice}))
    ctx.failing_stage = Milter.M_ENVFROM
    rc = ctx.send(signed(extra_headers=FORGED))
    if choice is FailureAction.REJECT:
        assert rc == Milter.REJECT and ctx.reply[:2] == ("550", "5.3.0")
    else:  # accepted unchecked, as configured: said so in our A-R, and the forged one is still gone
        assert rc == Milter.ACCEPT
        assert [value for name, value in ctx.headers if name == A_R] == [f"{AUTHSERV_ID}; none"]


@pytest.mark.parametrize("choice", [FailureAction.TEMPFAIL, FailureAction.ACCEPT])
def test_mta_without_quarantine_action(
    connect: Connect, zone_files: list[Path], choice: FailureAction
) -> None:
    healthy = connect(config=make_config(policy={"internal_error": choice}), ip=OUTSIDE_IP)
    ctx = MtaCtx()
    ctx.offer = (Milter.CURR_ACTS & ~Milter.QUARANTINE, *MTA_OFFER[1:])
    ctx.connect(ip=OUTSIDE_IP)
    raw = make_message(from_header="bob@quarantine.example")
    rc = ctx.send(raw, mail_from="bob@quarantine.example")
    if choice is FailureAction.TEMPFAIL:  # never delivered without the hold it should have had
        assert rc == Milter.TEMPFAIL and ctx.reply[:2] == ("451", "4.3.0")
    else:  # accepted as configured, with the A-R already sent and no second one
        assert rc == Milter.ACCEPT and len(our_ar(ctx)) == 1
    assert healthy.send(raw, mail_from="bob@quarantine.example") == Milter.ACCEPT
    assert healthy.changes[-1][0] == "quarantine"


def test_history_failure_does_not_change_the_verdict(
    connect: Connect, signed: Callable[..., bytes], history: History, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(verdict: Verdict, transaction: Transaction, now: float) -> None:
        raise OSError("disk full")

    history.record = broken  # type: ignore[method-assign]
    ctx = connect()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert ctx.send(signed()) == Milter.ACCEPT
    assert len(our_ar(ctx)) == 1
    assert "cannot write the history record" in caplog.text


def test_metrics_count_connections_verdicts_and_lost_history_records(
    connect: Connect,
    signed: Callable[..., bytes],
    history: History,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(verdict: Verdict, transaction: Transaction, now: float) -> None:
        raise HistoryError("disk full")

    history.record = broken  # type: ignore[method-assign]
    monkeypatch.delenv(MULTIPROCESS_ENV, raising=False)  # enable() sets it; restored afterwards
    metrics = enable_metrics(str(tmp_path))
    try:
        ctx = connect(metrics=metrics)
        assert ctx.send(signed()) == Milter.ACCEPT
        during = parse(metrics.render()[0].decode())
        ctx.app.close()
        after = parse(metrics.render()[0].decode())
    finally:
        metrics.close()
    assert sample(during, "authmilter_connections_in_flight") == 1
    assert sample(after, "authmilter_connections_in_flight") == 0
    assert sample(after, "authmilter_actions_total", action="accept", direction="inbound") == 1
    assert sample(after, "authmilter_auth_results_total", method="dkim", result="pass") == 1
    assert sample(after, "authmilter_check_duration_seconds_count", check="dmarc") == 1
    assert sample(after, "authmilter_dns_cache_lookups_total", result="miss") > 0
    assert sample(after, "authmilter_history_write_errors_total") == 1


def test_history_gets_dmarc_evaluated_messages_only(
    connect: Connect, signed: Callable[..., bytes], history: History
) -> None:
    ctx = connect()
    assert ctx.send(signed()) == Milter.ACCEPT
    [(verdict, transaction, now)] = history.records
    assert verdict.dmarc is not None and verdict.dmarc.result is AuthResult.PASS
    assert transaction.message.headers.get_all("From")[0].value == " Bob <bob@sender.example>"
    assert now > 1.7e9
    ctx.macros[Milter.M_ENVFROM] = {"{auth_authen}": "bob"}
    assert ctx.send(signed()) == Milter.ACCEPT
    assert len(history.records) == 1  # skipped: nothing evaluated, nothing recorded


# --- messages and connections ---------------------------------------------------------------------


def test_several_messages_on_one_connection(connect: Connect, signed: Callable[..., bytes]) -> None:
    ctx = connect()
    assert ctx.send(signed()) == Milter.ACCEPT
    assert ctx.send(make_message(), mail_from="bob@outside.example") == Milter.REJECT
    # RSET after the headers of a third: nothing of it may reach the fourth.
    ctx.start(make_message(from_header="eve@quarantine.example"), "eve@quarantine.example", ("a@b.example",))
    ctx.rset()
    assert ctx.send(signed()) == Milter.ACCEPT
    assert len(our_ar(ctx)) == 1 and "dmarc=pass" in our_ar(ctx)[0]


def test_message_counts_span_mail_from_to_the_end_of_the_message(
    connect: Connect, signed: Callable[..., bytes]
) -> None:
    """What a stopping worker waits for: messages (on stop) and connections (on reload)."""
    before = message_counts()

    def counted() -> tuple[int, int]:
        now = message_counts()
        return now.in_progress - before.in_progress, now.ended - before.ended

    def connections() -> int:
        return message_counts().connections - before.connections

    first, second = connect(), connect()
    assert counted() == (0, 0), "a connection without a message is idle"
    assert connections() == 2
    first.start(signed(), "bob@sender.example", ("a@b.example",))
    second.start(make_message(), "bob@sender.example", ("a@b.example",))
    assert counted() == (2, 0)
    assert first._eom() == Milter.ACCEPT
    assert counted() == (1, 1)
    second.start(make_message(), "bob@sender.example", ("a@b.example",))  # MAIL FROM again: a new one
    assert counted() == (1, 2)
    second.rset()
    assert counted() == (0, 3)
    first.start(make_message(), "bob@sender.example", ("a@b.example",))
    first.app.close()  # the MTA went away mid-message
    assert counted() == (0, 4)
    assert connections() == 1
    first.app.close()
    assert counted() == (0, 4)
    assert connections() == 1, "close() is counted once"
    second.app.close()
    assert connections() == 0


@pytest.mark.parametrize("chunk_size", [65535, 1000, 7])
def test_body_is_hashed_as_it_streams_and_never_kept(
    connect: Connect, keys: dict[str, SigningKey], chunk_size: int
) -> None:
    # Two signatures, simple (with l=) and relaxed, over a body whose trailing WSP and empty lines
    # straddle chunk boundaries; the milter keeps only the hashes, never the body.
    body = "All work and no play makes Jack a dull boy. \t \r\n" * 6000 + " \r\n\r\n\r\n"
    message = make_message(body=body)
    simple, relaxed = (b"simple", b"simple"), (b"relaxed", b"relaxed")
    message = sign(message, keys["rsa"], "sender.example", "rsa1", canonicalize=simple, length=True)
    message = sign(message, keys["ed"], "sender.example", "ed1", canonicalize=relaxed)
    ctx = connect()
    ctx.start(message, "bob@sender.example", ("alice@receiver.example",))
    body_bytes = message.split(b"\r\n\r\n", 1)[1]
    for offset in range(0, len(body_bytes), chunk_size):
        assert ctx.app.body(body_bytes[offset : offset + chunk_size]) == Milter.NOREPLY
    gathered = vars(ctx.app._session._message).values()
    kept = [value for value in gathered if isinstance(value, (bytes, bytearray))]
    assert not kept
    assert ctx._eom() == Milter.ACCEPT
    [ar] = our_ar(ctx)
    assert ar.count("dkim=pass") == 2, ar


def test_headers_past_the_limit_keep_from_fields_and_say_when_one_was_dropped(connect: Connect) -> None:
    ctx = connect(config=make_config(max_headers=10))
    junk = "".join(f"X-Junk-{n}: {n}\r\n" for n in range(12))
    assert ctx.send(make_message(extra_headers=junk + FORGED)) == Milter.ACCEPT
    assert ("change", A_R, 1, "") in ctx.changes  # a forged A-R behind junk is still found
    froms = "".join("From: eve@evil.example\r\n" for _ in range(25))
    assert ctx.send(make_message(extra_headers=junk + froms)) == Milter.REJECT
    assert "too many header fields" in ctx.reply[2]  # not just "26 From header fields"


def test_log_line(connect: Connect, signed: Callable[..., bytes], caplog: pytest.LogCaptureFixture) -> None:
    ctx = connect()
    ctx.macros[Milter.M_EOM] = {"i": "4XyZ1"}
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert ctx.send(signed()) == Milter.ACCEPT
    [info] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert re.fullmatch(
        r"queue_id=4XyZ1 client=192\.0\.2\.10 from=sender\.example spf=pass dkim=pass:sender\.example "
        r"dmarc=pass action=accept ms=\d+\.\d "
        r"checks=spf:\d+\.\d,helo:\d+\.\d,dkim:\d+\.\d,arc:\d+\.\d,dmarc:\d+\.\d",
        info,
    )
    [debug] = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug.startswith("queue_id=4XyZ1 why: action=accept") and "dmarc: " in debug


def test_log_line_as_json(
    connect: Connect, signed: Callable[..., bytes], caplog: pytest.LogCaptureFixture
) -> None:
    ctx = connect()
    ctx.macros[Milter.M_EOM] = {"i": "4XyZ1"}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert ctx.send(signed()) == Milter.ACCEPT
    [info] = [r for r in caplog.records if r.levelno == logging.INFO]
    line = JsonFormatter().format(info)
    assert "\n" not in line
    entry = json.loads(line)
    assert {k: entry[k] for k in ("queue_id", "client", "from", "spf", "helo", "dmarc", "action")} == {
        "queue_id": "4XyZ1",
        "client": "192.0.2.10",
        "from": "sender.example",
        "spf": "pass",
        "helo": "none",
        "dmarc": "pass",
        "action": "accept",
    }
    assert entry["dkim"] == [{"result": "pass", "domain": "sender.example", "selector": "rsa1"}]
    assert list(entry["check_ms"]) == ["spf", "helo", "dkim", "arc", "dmarc"]
    assert all(isinstance(ms, float) for ms in entry["check_ms"].values())
    assert isinstance(entry["ms"], float) and entry["level"] == "info"
    assert entry["message"] == info.getMessage()


def test_log_values_are_one_bounded_json_line(connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    ctx = connect(ip=OUTSIDE_IP)
    ctx.macros[Milter.M_ENVFROM] = {"{auth_authen}": "bob\r\nqueue_id=FAKE " + "x" * 500}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert ctx.send(make_message()) == Milter.ACCEPT
    [record] = caplog.records
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line and len(line) < 1000
    assert json.loads(line)["reason"].startswith("outbound: authenticated as bob??queue_id=FAKE xxx")


def test_log_values_are_one_bounded_line(connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    ctx = connect(ip=OUTSIDE_IP)
    ctx.macros[Milter.M_ENVFROM] = {"{auth_authen}": "bob\r\nqueue_id=FAKE " + "x" * 500}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert ctx.send(make_message()) == Milter.ACCEPT
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and "\r" not in line
    assert "authenticated as bob??queue_id=FAKE xxx" in line
    assert len(line) < 400


# --- building and serving -------------------------------------------------------------------------


def test_build_runtime(zone_files: list[Path], history: History) -> None:
    config = dataclasses.replace(make_config(), dns=DnsSettings(zone_files=tuple(map(str, zone_files))))
    runtime = build_runtime(config, history)
    assert runtime.config is config and runtime.history is history
    assert runtime.resolver.txt("_dmarc.sender.example").texts == ("v=DMARC1; p=reject",)
    assert dkim_rsa.installed()
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.history = None  # type: ignore[misc]


def test_build_runtime_reads_the_pinned_public_suffix_list(zone_files: list[Path], tmp_path: Path) -> None:
    """The list is read when the worker starts: a later edit waits for a reload, a lost file stops it."""
    pinned = tmp_path / "psl.dat"
    pinned.write_text("com\nfoo.com\n", encoding="utf-8")  # foo.com is a public suffix here
    dns = DnsSettings(zone_files=tuple(map(str, zone_files)))
    config = dataclasses.replace(
        make_config(), dns=dns, dmarc=DmarcSettings(org_domain="psl", psl_file=str(pinned))
    )
    runtime = build_runtime(config)
    pinned.write_text("com\n", encoding="utf-8")
    assert organizational_domain("a.b.foo.com", runtime.resolver, config.dmarc) == "b.foo.com"
    gone = DmarcSettings(org_domain="psl", psl_file=str(tmp_path / "gone.dat"))
    with pytest.raises(FileNotFoundError, match=r"gone\.dat"):
        build_runtime(dataclasses.replace(config, dmarc=gone))


def test_serve_registers_factory_and_flags(monkeypatch: pytest.MonkeyPatch, zone_files: list[Path]) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(Milter, "factory", Milter.factory)  # restored after the test
    monkeypatch.setattr(Milter, "set_flags", lambda flags: calls.append(("flags", flags)))
    monkeypatch.setattr(Milter, "runmilter", lambda *args: calls.append(("run", *args)))
    # The worker's garbage collector settings, not this test process's.
    monkeypatch.setattr(milter_app, "_settle_collector", lambda: calls.append(("gc",)))
    config = make_config()
    config = dataclasses.replace(config, milter=dataclasses.replace(config.milter, idle_timeout=42))
    runtime = Runtime(config, Resolver(ScriptedSource(zone_files)), None)
    serve("fd:3", runtime)
    assert calls == [("flags", ACTIONS), ("gc",), ("run", "authmilter", "fd:3", 42)]  # [milter] idle_timeout
    made = Milter.factory()
    assert isinstance(made, AuthMilter) and made._runtime is runtime


def test_history_path_in_config_records_dmarc_verdicts(
    zone_files: list[Path], signed: Callable[..., bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_runtime opens the configured history file; a DMARC-evaluated message adds one line."""
    path = tmp_path / "history.jsonl"
    base = make_config()
    config = dataclasses.replace(
        base,
        history=HistorySettings(path=str(path)),
        dns=dataclasses.replace(base.dns, zone_files=tuple(str(z) for z in zone_files)),
    )
    runtime = build_runtime(config)
    assert isinstance(runtime.history, HistoryRecorder)
    monkeypatch.setattr(Milter, "factory", lambda: AuthMilter(runtime))
    ctx = MtaCtx()
    ctx.connect()
    assert ctx.send(signed()) == Milter.ACCEPT
    [record] = list(read_history(str(path)))
    assert record["v"] == 1
    assert "sender.example" in json.dumps(record)

"""A small MTA side of the milter protocol (version 6), for tests and the benchmark.

It speaks what Postfix and Sendmail speak to a milter: option negotiation, the SMTP stages with
their macros, headers, body chunks, end of message, and it collects the milter's modification
actions and its final response. It honours what the milter negotiates: stages the milter does not
want (``SMFIP_NO*``) are not sent, stages it will not answer (``SMFIP_NR_*``) are not waited for,
and header values keep the whitespace after the colon only with ``SMFIP_HDR_LEADSPC``, as in
Postfix's milter8.c (without it one space is dropped from the fields sent and added to the fields
the milter adds).

Wire format (libmilter's mfdef.h; Sendmail's doc/MILTER protocol notes): every packet is a 32-bit
big-endian length, one command byte, then the data; strings are NUL-terminated.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

PROTOCOL_VERSION = 6
MAX_BODY_CHUNK = 65535  # MILTER_CHUNK_SIZE: the largest body packet an MTA sends

# Actions the MTA allows (SMFIF_*).
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

# Protocol flags (SMFIP_*): stages not sent (NO*) and stages not answered (NR_*).
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
# What Postfix 3.7 offers: every stage flag up to HDR_LEADSPC.
ALL_PROTOCOL = 0x1FFFFF

# Per stage: the command byte, the flag that suppresses it, the flag that says "no reply".
_STAGES: dict[str, tuple[bytes, int, int]] = {
    "connect": (b"C", SMFIP_NOCONNECT, SMFIP_NR_CONN),
    "helo": (b"H", SMFIP_NOHELO, SMFIP_NR_HELO),
    "mail": (b"M", SMFIP_NOMAIL, SMFIP_NR_MAIL),
    "rcpt": (b"R", SMFIP_NORCPT, SMFIP_NR_RCPT),
    "data": (b"T", SMFIP_NODATA, SMFIP_NR_DATA),
    "header": (b"L", SMFIP_NOHDRS, SMFIP_NR_HDR),
    "eoh": (b"N", SMFIP_NOEOH, SMFIP_NR_EOH),
    "body": (b"B", SMFIP_NOBODY, SMFIP_NR_BODY),
}

# Modifications whose value is a header field's (what follows "Name:").
HEADER_CHANGES = frozenset({"addheader", "insheader", "chgheader"})

# Replies that end a stage (everything else before them is a modification or progress).
FINAL_REPLIES = {
    b"a": "accept",
    b"c": "continue",
    b"d": "discard",
    b"r": "reject",
    b"t": "tempfail",
    b"y": "replycode",
    b"s": "skip",
    b"f": "connfail",
    b"4": "shutdown",
}
MODIFICATIONS = {
    b"h": "addheader",
    b"i": "insheader",
    b"m": "chgheader",
    b"q": "quarantine",
    b"+": "addrcpt",
    b"-": "delrcpt",
    b"2": "addrcpt_par",
    b"e": "chgfrom",
    b"b": "replbody",
}
PROGRESS = b"p"

_FAMILIES = {socket.AF_INET: b"4", socket.AF_INET6: b"6", socket.AF_UNIX: b"L"}


class MilterProtocolError(Exception):
    """The milter sent something the protocol does not allow here (or closed the connection)."""


@dataclass(frozen=True)
class Negotiated:
    """The milter's answer to OPTNEG: its version, the actions it wants, its protocol flags."""

    version: int
    actions: int
    protocol: int

    def sends(self, stage: str) -> bool:
        return not self.protocol & _STAGES[stage][1]

    def replies(self, stage: str) -> bool:
        return not self.protocol & _STAGES[stage][2]

    @property
    def leading_space(self) -> bool:
        """SMFIP_HDR_LEADSPC: header values as they are after the colon, both ways."""
        return bool(self.protocol & SMFIP_HDR_LEADSPC)


@dataclass(frozen=True)
class Modification:
    """A change the milter asked for at end of message.

    Attributes:
        kind: ``addheader``, ``insheader``, ``chgheader``, ``quarantine``, ``addrcpt``, ...
        index: the header index for insheader/chgheader (1-based occurrence for chgheader).
        name: the header name, or the recipient/sender for envelope changes.
        value: for a header field, what the MTA writes after the colon (the space it adds without
            SMFIP_HDR_LEADSPC included, so ``name + ":" + value`` is the field); the quarantine
            reason, or raw data for the rest.
    """

    kind: str
    index: int | None = None
    name: str = ""
    value: str = ""


@dataclass(frozen=True)
class Response:
    """A stage's final answer: ``kind`` is accept, continue, reject, tempfail, replycode, ...

    ``text`` is the whole SMTP reply for replycode (``550 5.7.1 ...``), else empty.
    """

    kind: str
    text: str = ""

    @property
    def code(self) -> str:
        return self.text[:3]


@dataclass(frozen=True)
class MessageResult:
    """What happened to one message.

    Attributes:
        stage: the stage whose response ended the message ("eom" when it got that far).
        response: that response.
        modifications: the end-of-message modifications, in the order received.
    """

    stage: str
    response: Response
    modifications: tuple[Modification, ...] = field(default_factory=tuple)

    def headers_added(self, kind: str = "insheader") -> list[Modification]:
        return [m for m in self.modifications if m.kind == kind]


def _cstr(text: str | bytes) -> bytes:
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return raw + b"\0"


def _split_cstrs(data: bytes) -> list[str]:
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def parse_address(address: str) -> tuple[int, object]:
    """A libmilter connection string (``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:PATH``,
    ``local:PATH``) → (address family, socket address)."""
    kind, _, rest = address.partition(":")
    if kind in ("unix", "local"):
        return socket.AF_UNIX, rest
    port, _, host = rest.partition("@")
    host = host.strip("[]")
    if kind == "inet6":
        return socket.AF_INET6, (host or "::1", int(port))
    if kind == "inet":
        return socket.AF_INET, (host or "127.0.0.1", int(port))
    raise ValueError(f"not a milter address: {address!r}")


class MilterClient:
    """One connection to a milter, driven stage by stage like an MTA does.

    Args:
        sock: a connected stream socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.negotiated: Negotiated | None = None

    @classmethod
    def connect(cls, address: str, timeout: float = 10.0, nagle: bool = False) -> MilterClient:
        """Open a connection to ``address`` (a libmilter connection string).

        ``nagle=True`` keeps Nagle's algorithm on a TCP connection, as Postfix's milter client does.
        """
        family, sockaddr = parse_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError:
            sock.close()
            raise
        if family != socket.AF_UNIX and not nagle:
            # The MTA side of Nagle: without it a small packet waits for the milter's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- packets ---------------------------------------------------------------------------

    def send(self, command: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(data) + 1) + command + data)

    def _recv_exact(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = self.sock.recv(size)
            if not chunk:
                raise MilterProtocolError("the milter closed the connection")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> tuple[bytes, bytes]:
        """One packet from the milter → (command byte, data)."""
        (length,) = struct.unpack("!I", self._recv_exact(4))
        if length < 1:
            raise MilterProtocolError("empty packet")
        packet = self._recv_exact(length)
        return packet[:1], packet[1:]

    def _macros(self, command: bytes, macros: Mapping[str, str] | None) -> None:
        # SMFIC_MACRO: sent before the command it belongs to; never answered.
        if macros:
            data = command + b"".join(_cstr(k) + _cstr(v) for k, v in macros.items())
            self.send(b"D", data)

    def _final(self) -> Response:
        while True:
            command, data = self.receive()
            if command == PROGRESS:
                continue
            if command in FINAL_REPLIES:
                text = data.rstrip(b"\0").decode("utf-8", "replace") if command == b"y" else ""
                return Response(FINAL_REPLIES[command], text)
            raise MilterProtocolError(f"unexpected reply {command!r} before a stage's response")

    def _stage(self, stage: str, data: bytes, macros: Mapping[str, str] | None = None) -> Response | None:
        """Send one stage; returns its response, or None when not sent or not answered."""
        agreed = self._agreed
        command = _STAGES[stage][0]
        self._macros(command, macros)
        if not agreed.sends(stage):
            return None
        self.send(command, data)
        return self._final() if agreed.replies(stage) else None

    @property
    def _agreed(self) -> Negotiated:
        if self.negotiated is None:
            raise MilterProtocolError("negotiate() first")
        return self.negotiated

    # --- stages ----------------------------------------------------------------------------

    def negotiate(self, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> Negotiated:
        """SMFIC_OPTNEG: offer ``actions`` and ``protocol`` flags; the milter's choice is kept."""
        self.send(b"O", struct.pack("!III", PROTOCOL_VERSION, actions, protocol))
        command, data = self.receive()
        if command != b"O" or len(data) < 12:
            raise MilterProtocolError(f"bad OPTNEG reply {command!r}")
        version, milter_actions, milter_protocol = struct.unpack("!III", data[:12])
        # Anything after the three words is the milter's macro list (SMFIF_SETSYMLIST); ignored.
        self.negotiated = Negotiated(version, milter_actions, milter_protocol)
        return self.negotiated

    def connect_info(
        self,
        hostname: str,
        address: str,
        port: int = 25,
        family: int = socket.AF_INET,
        macros: Mapping[str, str] | None = None,
    ) -> Response | None:
        """SMFIC_CONNECT: the client's host name, family, port and address."""
        data = _cstr(hostname) + _FAMILIES[family] + struct.pack("!H", port) + _cstr(address)
        return self._stage("connect", data, macros)

    def helo(self, name: str, macros: Mapping[str, str] | None = None) -> Response | None:
        return self._stage("helo", _cstr(name), macros)

    def mail(
        self, sender: str, args: Sequence[str] = (), macros: Mapping[str, str] | None = None
    ) -> Response | None:
        """SMFIC_MAIL: ``sender`` without brackets; ESMTP ``args`` like ``SIZE=100``."""
        return self._stage("mail", _cstr(f"<{sender}>") + b"".join(_cstr(a) for a in args), macros)

    def rcpt(self, recipient: str, macros: Mapping[str, str] | None = None) -> Response | None:
        return self._stage("rcpt", _cstr(f"<{recipient}>"), macros)

    def data(self, macros: Mapping[str, str] | None = None) -> Response | None:
        return self._stage("data", b"", macros)

    def header(self, name: str, value: str) -> Response | None:
        return self._stage("header", _cstr(name) + _cstr(value))

    def end_of_headers(self) -> Response | None:
        return self._stage("eoh", b"")

    def body(self, data: bytes) -> Response | None:
        """SMFIC_BODY in chunks of at most 65535 bytes; returns the first non-continue answer."""
        for start in range(0, len(data), MAX_BODY_CHUNK):
            response = self._stage("body", data[start : start + MAX_BODY_CHUNK])
            if response is not None and response.kind != "continue":
                return response
        return None

    def end_of_message(
        self, macros: Mapping[str, str] | None = None
    ) -> tuple[tuple[Modification, ...], Response]:
        """SMFIC_BODYEOB: collects the modifications, then the final response."""
        self._macros(b"E", macros)
        self.send(b"E")
        modifications: list[Modification] = []
        while True:
            command, data = self.receive()
            if command == PROGRESS:
                continue
            if command in MODIFICATIONS:
                modifications.append(self._as_written(_modification(command, data)))
                continue
            if command in FINAL_REPLIES:
                text = data.rstrip(b"\0").decode("utf-8", "replace") if command == b"y" else ""
                return tuple(modifications), Response(FINAL_REPLIES[command], text)
            raise MilterProtocolError(f"unexpected reply {command!r} at end of message")

    def _as_written(self, change: Modification) -> Modification:
        # Postfix milter8.c (MILTER8_HDR_SPACE): a space after the colon unless HDR_LEADSPC; an
        # empty chgheader value deletes the field.
        if change.kind in HEADER_CHANGES and change.value and not self._agreed.leading_space:
            return Modification(change.kind, change.index, change.name, " " + change.value)
        return change

    def abort(self) -> None:
        """SMFIC_ABORT: the transaction ends without a message (never answered)."""
        self.send(b"A")

    def quit(self) -> None:
        self.send(b"Q")
        self.close()

    # --- a whole message -------------------------------------------------------------------

    def send_message(
        self,
        message: bytes,
        mail_from: str,
        recipients: Iterable[str],
        mail_macros: Mapping[str, str] | None = None,
        eom_macros: Mapping[str, str] | None = None,
    ) -> MessageResult:
        """One transaction on a connection that is past HELO; stops at the first non-continue answer.

        An early answer (e.g. accept at MAIL for an authenticated client) ends the transaction
        as it ends an MTA's: the rest is not sent and an abort resets the milter.
        """
        headers, body = split_message(message, self._agreed.leading_space)
        Step = Callable[[], Response | None]
        steps: list[tuple[str, Step]] = [("mail", lambda: self.mail(mail_from, macros=mail_macros))]
        steps += [("rcpt", lambda r=r: self.rcpt(r)) for r in recipients]
        steps.append(("data", self.data))
        steps += [("header", lambda n=n, v=v: self.header(n, v)) for n, v in headers]
        steps.append(("eoh", self.end_of_headers))
        steps.append(("body", lambda: self.body(body)))
        for stage, step in steps:
            response = step()
            if response is not None and response.kind != "continue":
                self.abort()
                return MessageResult(stage, response)
        modifications, response = self.end_of_message(eom_macros)
        return MessageResult("eom", response, modifications)


def _modification(command: bytes, data: bytes) -> Modification:
    kind = MODIFICATIONS[command]
    if kind in ("insheader", "chgheader"):
        (index,) = struct.unpack("!I", data[:4])
        name, value = [*_split_cstrs(data[4:]), "", ""][:2]
        return Modification(kind, index, name, value)
    if kind == "addheader":
        name, value = [*_split_cstrs(data), "", ""][:2]
        return Modification(kind, None, name, value)
    if kind == "replbody":
        return Modification(kind, value=data.decode("utf-8", "replace"))
    strings = _split_cstrs(data)
    return Modification(kind, None, strings[0] if strings else "", " ".join(strings[1:]))


def split_message(message: bytes, leading_space: bool = False) -> tuple[list[tuple[str, str]], bytes]:
    """A raw message → ([(name, value)] as an MTA sends them, body with CRLF line ends).

    Values keep their folding with LF line breaks, which is what libmilter hands to ``xxfi_header``,
    and lose the one space after the colon unless ``leading_space`` (SMFIP_HDR_LEADSPC).
    """
    normalised = message.replace(b"\r\n", b"\n")
    head, sep, body = normalised.partition(b"\n\n")
    if not sep:
        head, body = normalised, b""
    headers: list[tuple[str, str]] = []
    for line in head.split(b"\n"):
        text = line.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, f"{value}\n{text}")
        elif ":" in text:
            name, _, value = text.partition(":")
            # Postfix passes the name without the whitespace before the colon (milter8_header).
            if not leading_space:
                value = value.removeprefix(" ")  # one space, never a tab, as Postfix drops it
            headers.append((name.rstrip(" \t"), value))
    return headers, body.replace(b"\n", b"\r\n")


def check_message(
    address: str,
    message: bytes,
    *,
    client_ip: str = "192.0.2.10",
    client_name: str = "mx.sender.example",
    helo: str = "mx.sender.example",
    mail_from: str = "bob@sender.example",
    recipients: Sequence[str] = ("alice@receiver.example",),
    connect_macros: Mapping[str, str] | None = None,
    mail_macros: Mapping[str, str] | None = None,
    eom_macros: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> MessageResult:
    """One message over a fresh connection, start to QUIT, as Postfix sends it.

    Returns the result of the first stage that did not continue (connect, helo, ...) or of eom.
    """
    family = socket.AF_INET6 if ":" in client_ip else socket.AF_INET
    macros = {"j": "mx.receiver.example", "{daemon_name}": "smtpd", **(connect_macros or {})}
    with MilterClient.connect(address, timeout) as client:
        client.negotiate()
        for stage, step in (
            ("connect", lambda: client.connect_info(client_name, client_ip, 25, family, macros)),
            ("helo", lambda: client.helo(helo)),
        ):
            response = step()
            if response is not None and response.kind != "continue":
                client.quit()
                return MessageResult(stage, response)
        eom = {"i": "4XyZ1234", **(eom_macros or {})}
        result = client.send_message(message, mail_from, recipients, mail_macros, eom)
        client.quit()
        return result

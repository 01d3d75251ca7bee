"""The SMTP sink Postfix relays to: it keeps every delivered message as a file for the tests to read.

One file per message transaction, written under a temporary name and renamed into place only once
complete, so a reader never sees half a message. The file's first line is the envelope as JSON, the
rest is the message exactly as received (dot-stuffing undone, RFC 5321 §4.5.2).

The sink answers 250 to DATA only after the file is in place: Postfix then removes the message from
its queue, so a message Postfix has accepted is either in the sink's folder or still in Postfix's
queue, never lost between the two.

Also a script, for set-ups started outside the tests (docker):
``python tests/integration/sink.py --listen 0.0.0.0:2525 --dir /var/sink``.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import itertools
import json
import os
import socketserver
import threading
import time
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

# A message transaction beyond this many bytes is refused (552) rather than kept in memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Seconds a silent client may hold a connection (RFC 5321 §4.5.3.2 asks servers for minutes; a
# test run wants a stuck Postfix to fail fast instead).
IDLE_TIMEOUT = 60.0
POLL_INTERVAL = 0.05
SUFFIX = ".msg"


@dataclass(frozen=True)
class DeliveredMessage:
    """One message as the sink received it."""

    path: Path
    mail_from: str
    rcpt_to: tuple[str, ...]
    data: bytes

    @property
    def parsed(self) -> Message:
        # compat32 keeps header values as they are on the wire (folding included).
        return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(self.data, headersonly=True)

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name``, in message order, unfolded."""
        return [_unfold(v) for v in self.parsed.get_all(name, [])]

    def header_names(self) -> list[str]:
        """The header field names in message order."""
        return list(self.parsed.keys())

    @property
    def message_id(self) -> str:
        return (self.parsed.get("Message-ID") or "").strip()


def _unfold(value: str) -> str:
    return " ".join(str(value).split())


class MessageStore:
    """Reads the messages a sink wrote into ``directory`` (works for a sink in another process too).

    Args:
        directory: the sink's folder.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def messages(self) -> list[DeliveredMessage]:
        """Every delivered message, oldest first."""
        return [_read(path) for path in sorted(self.directory.glob(f"*{SUFFIX}"))]

    def find(self, message_id: str) -> list[DeliveredMessage]:
        """The delivered copies of the message with this Message-ID (``<...>`` included)."""
        return [m for m in self.messages() if m.message_id == message_id]

    def wait_for(self, message_id: str, timeout: float) -> DeliveredMessage:
        """The delivered message with this Message-ID, waiting for it up to ``timeout`` seconds.

        Raises:
            AssertionError: it did not arrive in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(message_id)
            if found:
                return found[0]
            if time.monotonic() >= deadline:
                raise AssertionError(f"message {message_id} was not delivered to the sink within {timeout} s")
            time.sleep(POLL_INTERVAL)


def _read(path: Path) -> DeliveredMessage:
    envelope_line, _, data = path.read_bytes().partition(b"\n")
    envelope = json.loads(envelope_line)
    return DeliveredMessage(path, envelope["mail_from"], tuple(envelope["rcpt_to"]), data)


class _Transaction:
    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []


class _SmtpHandler(socketserver.StreamRequestHandler):
    """Just enough RFC 5321 server for Postfix's smtp client: EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    server: SinkServer
    timeout = IDLE_TIMEOUT

    def handle(self) -> None:
        self._reply("220 sink.example ESMTP test sink")
        transaction = _Transaction()
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            verb, _, argument = line.decode("ascii", "replace").strip().partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                transaction = _Transaction()
                self._reply(
                    f"250-sink.example\r\n250-8BITMIME\r\n250 SIZE {MAX_MESSAGE_BYTES}"
                    if verb == "EHLO"
                    else "250 sink.example"
                )
            elif verb == "MAIL":
                transaction = _Transaction()
                transaction.mail_from = _address(argument)
                self._reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                if transaction.mail_from is None:
                    self._reply("503 5.5.1 MAIL first")
                    continue
                transaction.rcpt_to.append(_address(argument))
                self._reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if transaction.mail_from is None or not transaction.rcpt_to:
                    self._reply("503 5.5.1 MAIL and RCPT first")
                    continue
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    self._reply("552 5.3.4 Message too big")
                else:
                    self.server.store(transaction.mail_from, transaction.rcpt_to, data)
                    self._reply("250 2.0.0 Ok: kept")
                transaction = _Transaction()
            elif verb == "RSET":
                transaction = _Transaction()
                self._reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self._reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self._reply("221 2.0.0 Bye")
                return
            else:
                self._reply("502 5.5.2 Command not implemented")

    def _read_data(self) -> bytes | None:
        """The message up to the lone dot, dot-stuffing undone; None when it exceeds the limit."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(1 << 20)
            if not line:
                raise ConnectionError("client closed the connection inside DATA")
            if line in (b".\r\n", b".\n"):
                return None if size > MAX_MESSAGE_BYTES else b"".join(lines)
            size += len(line)
            if size <= MAX_MESSAGE_BYTES:
                lines.append(line[1:] if line.startswith(b".") else line)

    def _reply(self, text: str) -> None:
        self.wfile.write(text.encode("ascii") + b"\r\n")
        self.wfile.flush()


def _address(argument: str) -> str:
    # "FROM:<a@b> SIZE=1" -> "a@b"
    _, _, rest = argument.partition(":")
    return rest.strip().split(" ")[0].strip("<>")


class SinkServer(socketserver.ThreadingTCPServer):
    """A threaded SMTP server writing each message into ``directory``; ``port`` 0 picks a free one.

    Args:
        host: address to listen on.
        port: TCP port (0: any free port; read it back from :attr:`port`).
        directory: where messages are written (created if missing).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.store_directory = directory
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _SmtpHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def store(self, mail_from: str, rcpt_to: list[str], data: bytes) -> Path:
        """Write one message atomically (temporary name, then rename) and return its path."""
        with self._lock:
            number = next(self._counter)
        # Nanoseconds first, so names sort by arrival across sink restarts too.
        name = f"{time.time_ns():020d}-{os.getpid()}-{number:06d}"
        temporary = self.store_directory / f".{name}.tmp"
        envelope = json.dumps({"mail_from": mail_from, "rcpt_to": rcpt_to}).encode()
        temporary.write_bytes(envelope + b"\n" + data)
        final = self.store_directory / f"{name}{SUFFIX}"
        temporary.rename(final)
        return final

    def start(self) -> None:
        """Serve in a daemon thread; the socket is already listening, so it is ready at once."""
        self._thread = threading.Thread(target=self.serve_forever, name="smtp-sink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SMTP sink keeping each message as a file")
    parser.add_argument("--listen", default="127.0.0.1:2525", help="HOST:PORT")
    parser.add_argument("--dir", required=True, type=Path, help="folder for the messages")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = SinkServer(host, int(port), args.dir)
    print(f"sink listening on {host}:{server.port}, writing to {args.dir}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

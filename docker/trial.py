"""Send the trial's two messages through the containerised Postfix and check what authmilter did.

1. From sender.example, claiming (XCLIENT) its SPF-authorised address 203.0.113.5: accepted, and
   delivered to the sink with our Authentication-Results first, spf=pass and dmarc=pass.
2. The same From claiming 198.51.100.7, which SPF does not allow: sender.example publishes p=reject,
   so the answer to DATA is 550 5.7.x and nothing is delivered.

Standard library only, so it runs in the set-up's own namespace (``docker compose exec sink python
/opt/trial/trial.py``) as well as on the host (``docker/test-docker.sh``). Until authmilter and the
DNS server answer, Postfix tempfails (milter_default_action); the first message is retried for up
to ``--timeout`` seconds, which makes it the readiness check too.

Exit status 0 when both outcomes are as expected, 1 otherwise.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import smtplib
import sys
import time
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

AUTHSERV_ID = "mx.receiver.example"
SENDER = "alice@sender.example"
RECIPIENT = "bob@receiver.example"
ALLOWED_CLIENT = "203.0.113.5"
SPOOFING_CLIENT = "198.51.100.7"
CLIENT_HELO = "mx.sender.example"
RETRY_INTERVAL = 1.0
DELIVERY_TIMEOUT = 20.0
SMTP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Reply:
    """The SMTP reply to a transaction: DATA's, or that of the command that refused it."""

    code: int
    text: str


def compose(subject: str) -> tuple[str, bytes]:
    """A small message from SENDER to RECIPIENT; returns its Message-ID and its bytes (CRLF)."""
    message_id = f"<{uuid.uuid4().hex}@sender.example>"
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = RECIPIENT
    message["Subject"] = subject
    message["Message-ID"] = message_id
    message.set_content("A trial message for authmilter.\n")
    return message_id, message.as_bytes(policy=email.policy.SMTP)


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def send(host: str, port: int, client_address: str, data: bytes) -> Reply:
    """Send ``data`` claiming ``client_address`` with XCLIENT (Postfix's XCLIENT_README).

    Returns:
        the reply; code 0 when the connection failed before one.
    """
    try:
        with smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT) as smtp:
            smtp.ehlo("trial.client")
            code, text = smtp.docmd("XCLIENT", f"ADDR={client_address} NAME={CLIENT_HELO} HELO={CLIENT_HELO}")
            if code != 220:
                return Reply(code, _text(text))
            # XCLIENT restarts the session (a new 220): greet again as the claimed client.
            smtp.ehlo(CLIENT_HELO)
            smtp.sendmail(SENDER, [RECIPIENT], data)
            return Reply(250, "accepted")
    except smtplib.SMTPResponseException as e:
        return Reply(e.smtp_code, _text(e.smtp_error))
    except smtplib.SMTPRecipientsRefused as e:
        code, text = next(iter(e.recipients.values()))
        return Reply(code, _text(text))
    except (OSError, smtplib.SMTPException) as e:
        return Reply(0, str(e))


def send_until_accepted(host: str, port: int, data: bytes, timeout: float) -> Reply:
    """Retry a message Postfix tempfails (authmilter or DNS not ready yet) until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        reply = send(host, port, ALLOWED_CLIENT, data)
        if reply.code == 250 or 500 <= reply.code < 600 or time.monotonic() > deadline:
            return reply
        time.sleep(RETRY_INTERVAL)


def delivered(sink_dir: Path, message_id: str, timeout: float) -> EmailMessage | None:
    """The message the sink stored with this Message-ID (first line: the envelope), or None."""
    parser = email.parser.BytesParser(policy=email.policy.default)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sink_dir.glob("*.msg"):
            _envelope, _, raw = path.read_bytes().partition(b"\n")
            message = parser.parsebytes(raw)
            if message.get("Message-ID") == message_id:
                assert isinstance(message, EmailMessage)
                return message
        time.sleep(0.2)
    return None


def check_pass(host: str, port: int, sink_dir: Path, timeout: float) -> list[str]:
    """Case 1; returns the problems found (none: as expected)."""
    message_id, data = compose("trial: authorised client")
    reply = send_until_accepted(host, port, data, timeout)
    if reply.code != 250:
        return [f"authorised message refused: {reply.code} {reply.text}"]
    message = delivered(sink_dir, message_id, DELIVERY_TIMEOUT)
    if message is None:
        return [f"authorised message accepted but not in {sink_dir} after {DELIVERY_TIMEOUT:.0f} s"]
    first_name, first_value = message.items()[0]
    results = " ".join(str(first_value).split())
    print(f"delivered, first header: {first_name}: {results}")
    if first_name.lower() != "authentication-results" or not results.startswith(AUTHSERV_ID):
        return [f"first header is not our Authentication-Results: {first_name}: {results}"]
    return [f"expected {want} in our A-R" for want in ("spf=pass", "dmarc=pass") if want not in results]


def check_spoof(host: str, port: int) -> list[str]:
    """Case 2; returns the problems found (none: as expected)."""
    _message_id, data = compose("trial: spoofed client")
    reply = send(host, port, SPOOFING_CLIENT, data)
    print(f"spoofed message: {reply.code} {reply.text}")
    if reply.code != 550 or not reply.text.startswith("5.7."):
        return [f"spoofed message: expected 550 5.7.x, got {reply.code} {reply.text}"]
    return []


def main(argv: list[str] | None = None) -> int:
    """Run both cases.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        the exit status: 0 when both outcomes are as expected.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smtp", default="127.0.0.1:2525", help="Postfix's smtpd, HOST:PORT")
    parser.add_argument("--sink-dir", type=Path, default=Path("/var/sink"), help="the sink's folder")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    host, _, port = args.smtp.rpartition(":")
    problems = check_pass(host, int(port), args.sink_dir, args.timeout) + check_spoof(host, int(port))
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if not problems:
        print("trial: both messages handled as expected")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""The floor of a milter on pymilter: one that checks nothing (``bench/run.py --floor``).

    python bench/floor_milter.py unix:/path/to.sock | inet:PORT@127.0.0.1

Every callback before end of message is a ``Milter.noreply`` no-op, so the MTA sends those events
without waiting, as it does to authmilter. End of message adds one Authentication-Results field
(:data:`FLOOR_FIELD`, which the benchmark looks for in every delivered message) and accepts. What
it costs and the wait it adds are libmilter's and pymilter's own: authmilter's figures beyond them
are its own Python (bench/README.md, "Round 9"). One process, whose threads serve every connection:
it does too little for a second interpreter to matter. The benchmark runs it over unix sockets only:
over TCP, plain libmilter waits on the MTA's delayed ACKs, which authmilter's socket options avoid.
"""

from __future__ import annotations

import os
import sys

import Milter

FLOOR_AUTHSERV_ID = "floor.bench.example"
FLOOR_FIELD = ("Authentication-Results", f"{FLOOR_AUTHSERV_ID}; none")
TIMEOUT = 240  # seconds libmilter waits for the MTA, as authmilter's default


class DoNothing(Milter.Base):  # type: ignore[misc]  # pymilter has no type information
    """Nothing before end of message; one header field at it."""

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply
    def hello(self, hostname: str) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply
    def envfrom(self, sender: str, *params: str) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply
    def envrcpt(self, recipient: str, *params: str) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply
    def header(self, name: str, value: str) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply
    def eoh(self) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        self.addheader(*FLOOR_FIELD, idx=1)
        return int(Milter.ACCEPT)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith(("unix:", "inet:")):
        print("usage: floor_milter.py unix:/path/to.sock | inet:PORT@127.0.0.1", file=sys.stderr)
        return 2
    Milter.factory = DoNothing
    Milter.set_flags(Milter.ADDHDRS)
    # Postfix's smtpd (user postfix) connects to the unix socket this process (root) creates.
    os.umask(0)
    Milter.runmilter("floor", argv[0], TIMEOUT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

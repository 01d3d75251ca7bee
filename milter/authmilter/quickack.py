"""Prompt TCP acknowledgements on milter connections over TCP (Linux ``TCP_QUICKACK``).

Why: Postfix's milter client (milter8.c) buffers the events it does not await a reply for
(everything before end of message, since we negotiate ``SMFIP_NR_*``) in a 4 KB stream buffer and
writes it out in 4 KB pieces, on a socket without ``TCP_NODELAY``. Nagle's algorithm then holds
each piece after the first until the milter's kernel acknowledges the previous one; the milter,
having nothing to say until end of message, acknowledges late: Linux delays an ACK by up to 40 ms
on a connection it considers interactive ("pingpong" mode, entered as soon as we answer the
option negotiation). Every message of more than 4 KB then waits ~40 ms (measured in bench/,
README "TCP"). Over unix sockets there is no Nagle and nothing to do.

``TCP_QUICKACK`` makes the kernel send the pending ACK at once and leave pingpong mode, after
which it acknowledges promptly (RFC 1122 §4.2.3.2 allows both); it is not permanent, so it is set
again where a reply of ours has put the connection back into pingpong mode.

libmilter owns the connection socket: connection_socket.py finds it, and it is used only when it
proves to be a TCP socket accepted on our own listening port; when anything does not match,
acknowledgements stay as the kernel does them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket

from authmilter.connection_socket import connection_descriptor, inherited_listener, listener_identity

log = logging.getLogger(__name__)

# Linux <netinet/tcp.h>; socket.TCP_QUICKACK exists only where the platform has it.
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


class QuickAck:
    """Finds a connection's TCP socket and asks the kernel to acknowledge now.

    Args:
        listen_port: the TCP port the milter listens on; None (a unix socket, or not Linux)
            turns the whole thing off.
    """

    def __init__(self, listen_port: int | None) -> None:
        self._port = listen_port
        self._libc = _libc() if listen_port is not None else None
        self._one = ctypes.c_int(1)

    @property
    def enabled(self) -> bool:
        return self._port is not None and self._libc is not None

    @classmethod
    def for_listener(cls, connection: str) -> QuickAck:
        """The policy for libmilter's connection string.

        Args:
            connection: what the worker hands libmilter: ``fd:N``, the supervisor's listening
                socket. Any other string is a socket libmilter opens itself: left alone.

        Returns:
            An enabled QuickAck for a TCP listener on Linux, a disabled one otherwise.
        """
        fd = inherited_listener(connection)
        port = _tcp_port_of(fd) if fd is not None else None
        return cls(port if os.uname().sysname == "Linux" else None)

    def connection_fd(self, context: object) -> int | None:
        """The descriptor of the MTA connection behind a pymilter context, if it is one of ours.

        Args:
            context: the ``milter.Context`` of the connection (``Milter.Base._ctx``).

        Returns:
            The descriptor of a TCP socket accepted on our listening port, or None.
        """
        if not self.enabled:
            return None
        return connection_descriptor(context, self._port)

    def acknowledge(self, fd: int | None) -> None:
        """Send any delayed ACK on ``fd`` now and leave pingpong mode (a no-op for None)."""
        if fd is None or self._libc is None:
            return
        if self._libc.setsockopt(fd, socket.IPPROTO_TCP, TCP_QUICKACK, ctypes.byref(self._one), 4) != 0:
            log.debug("TCP_QUICKACK on fd %d failed: %s", fd, os.strerror(ctypes.get_errno()))


def _tcp_port_of(fd: int) -> int | None:
    """The local port of a TCP socket, None for any other descriptor (never closes ``fd``)."""
    identity = listener_identity(fd)
    return identity if isinstance(identity, int) else None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None

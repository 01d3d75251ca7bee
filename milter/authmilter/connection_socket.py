"""The socket of an MTA connection, which libmilter owns and pymilter does not expose.

Two things need it: prompt TCP acknowledgements (quickack.py) and closing a connection the worker
has no room for (milter_app.py, ``[milter] max_connections``). The descriptor is read from
pymilter's context object (``milter_ContextObject.ctx`` → libmilter's ``SMFICTX.ctx_sd``, the
second member of both) and used only after it proves to be a stream socket accepted on our own
listener (same TCP port, or same unix socket path); when anything does not match, None.
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat

_POINTER = ctypes.sizeof(ctypes.c_void_p)
# pymilter's milter.Context (milter_ContextObject): PyObject_HEAD, then SMFICTX *ctx,
# PyObject *priv, PyThreadState *t.
_CONTEXT_SIZE = object.__basicsize__ + 3 * _POINTER
# libmilter's struct smfi_str starts with ctx_id, then socket_t (int) ctx_sd: an unsigned int id in
# sendmail's current libmilter.h, a pthread_t in Debian's build (seen: the descriptor at offset 8).
_SD_OFFSETS = (ctypes.sizeof(ctypes.c_uint), ctypes.sizeof(ctypes.c_ulong))

# What every connection accepted on one listener shares: its local TCP port or unix socket path.
ListenerIdentity = int | str


def inherited_listener(connection: str) -> int | None:
    """The descriptor in libmilter's ``fd:N`` connection string (the supervisor's socket), else None.

    Any other string names a socket libmilter opens itself, whose descriptor we do not know.
    """
    kind, _, fd = connection.partition(":")
    return int(fd) if kind == "fd" and fd.isdigit() else None


def listener_identity(fd: int) -> ListenerIdentity | None:
    """The local TCP port or unix socket path of a stream socket; None for anything else.

    An accepted socket has the listener's identity. ``fd`` is never closed.
    """
    try:
        if fd < 0 or not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.type != socket.SOCK_STREAM:
            return None
        address = sock.getsockname()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            port = address[1]
            return port if isinstance(port, int) else None
        if sock.family == socket.AF_UNIX and isinstance(address, str) and address:
            return address
        return None
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor stays libmilter's (or the supervisor's)


def connection_descriptor(context: object, identity: ListenerIdentity | None) -> int | None:
    """The descriptor of the MTA connection behind a pymilter context, if it is one of ours.

    Args:
        context: the ``milter.Context`` of the connection (``Milter.Base._ctx``).
        identity: :func:`listener_identity` of the listening socket; None: nothing matches.

    Returns:
        The descriptor of a socket accepted on that listener, or None.
    """
    if identity is None or type(context).__name__ != "Context":
        return None
    if type(context).__basicsize__ != _CONTEXT_SIZE:
        return None  # another pymilter layout: do not guess
    smfictx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not smfictx:
        return None
    for offset in _SD_OFFSETS:
        fd = ctypes.c_int.from_address(smfictx + offset).value
        # Above stdio, and a socket on our listener: nothing else in the struct can be that.
        if fd > 2 and listener_identity(fd) == identity:
            return fd
    return None


def shut_down(fd: int) -> bool:
    """End the connection on ``fd`` in both directions; the peer sees it closed at once.

    The descriptor stays open (libmilter closes it when its read fails), so no other thread can
    be handed the same number while libmilter still uses it.

    Returns:
        True when the socket was shut down.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.detach()

"""The prefork supervisor: owns the listening socket, (re)spawns workers, handles signals, reports readiness.

Process model (issue 3): Python work is GIL-bound, so the daemon runs N worker processes, each a
libmilter instance whose threads serve connections. The supervisor

- creates the listening socket itself (TCP_NODELAY: without it Nagle's algorithm and the MTA's
  delayed ACK add ~40 ms to every message, since libmilter writes a reply in several pieces;
  O_NONBLOCK: several workers wait on one socket and all but one find nothing to accept);
- loads everything the workers need (config, zone files, Public Suffix List, signing keys, the
  history file's writer: the :class:`~authmilter.milter_app.Runtime`) once per start or reload,
  and forks every worker of that generation, replacements included, from that snapshot: a
  replacement never depends on files still being as they were (a key file edited or a zone file
  broken after the reload cannot stop it);
- forks the workers before any thread exists, and never afterwards from a thread or a callback;
  each worker hands the inherited socket to libmilter as ``fd:N`` (Debian's libmilter carries the
  "fd passing" patch that adds this connection string to smfi_setconn) and says "ready" once
  libmilter serves it;
- reaps a dead worker and starts a new one, with a back-off against crash loops; when
  ``MAX_FAILED_STARTS`` workers in a row die before serving and none serves, it closes the socket
  and exits 1, so that systemd restarts it (a socket that nobody serves would make every SMTP
  session wait out the MTA's milter timeout);
- raises its soft descriptor limit to the hard one (inherited by the workers);
- on SIGTERM or SIGINT stops the workers gracefully and kills what is left after
  ``shutdown_timeout``;
- on SIGHUP reloads the config: a valid one is served by a fresh generation of workers, started
  before the old one is stopped, on the same socket; an invalid one is logged and the old workers
  keep serving. Fresh workers also reopen every file they write (the history file);
- tells systemd (``Type=notify``) when the workers accept, reload and stop;
- with ``[metrics] listen``, serves the Prometheus endpoint from its poll loop (metrics.py says why)
  and counts worker starts, exits and reloads there.

The supervisor runs no threads: one ``poll()`` loop, with signals delivered through a wakeup pipe.
Each worker has a socketpair to it: the worker sends "ready", the supervisor sends "stop" (or
goes away, which also means stop), and the stopping worker answers "closed" once it no longer
accepts. A reload is announced (log line, READY=1 to systemd) only when every old worker has
said "closed" or exited: from then on each new connection meets the new configuration.

A graceful stop is not libmilter's smfi_stop(): Debian builds libmilter with its worker pool
(_FFR_WORKERS_POOL), whose controller and worker threads quit as soon as a stop is flagged, so
sessions in progress would hang unanswered. Instead a stopping worker stops *accepting*: it
puts a socket nobody can reach in place of the listening descriptor (dup2), lets the pool finish
the messages in progress (``milter_app.message_counts``), and exits when none is left. The
others keep accepting on the shared socket meanwhile. The MTA holds a milter connection open for
a whole SMTP session (Postfix milter8.c connects at the SMTP connect event and closes at the
disconnect) and does not reconnect within it: once the connection fails, the session's next
message gets ``milter_default_action``. So the two kinds of stop drain differently:
on SIGTERM (STOP) a worker waits for the messages in progress only, and idle sessions get
tempfail for their next message (the client retries); after a reload (RETIRE) an old worker
waits for its connections to close, so no client sees a 4xx because of a reload; both are
bounded by ``shutdown_timeout``. (A SIGTERM sent to a worker directly, as systemd's KillMode=control-group
does, is libmilter's immediate stop: run the unit with KillMode=mixed.)
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import logging
import logging.handlers
import os
import resource
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from authmilter.config import Config, ConfigError, LogSettings, MilterSettings, load_config
from authmilter.keys import KeyFileError
from authmilter.logformat import JsonFormatter
from authmilter.metrics import Metrics, MetricsEndpoint
from authmilter.metrics import enable as enable_metrics
from authmilter.milter_app import (
    HistoryRecorder,
    Runtime,
    build_runtime,
    connection_cap,
    message_counts,
    serve,
)
from authmilter.reload import Outcome, StatusFile, status_path
from authmilter.resolver import ZoneFileError

log = logging.getLogger(__name__)

# Respawn back-off: first retry after 0.1 s, doubling up to 2 s (longer would leave the socket
# without a worker for that long); a worker that lived this long was healthy, so its death
# starts the back-off afresh.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0
STABLE_LIFETIME = 10.0
# Workers in a row that die before serving while no other serves: the supervisor gives up
# (0.1 + 0.2 + 0.4 + 0.8 s of back-off in between: about 2 s with the socket unserved).
MAX_FAILED_STARTS = 5
# How long a new generation of workers may take to build its runtime and report ready.
READY_TIMEOUT = 60.0
# The most libmilter queues; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = socket.SOMAXCONN
# Seconds between checks while a stopping worker waits for its messages to end.
SESSION_POLL = 0.1
# The control socketpair's messages. From the worker: READY, then CLOSED once it has stopped accepting.
READY = b"R"
CLOSED = b"C"
# Stop: drain the messages in progress; an SMTP session still open gets the MTA's default
# action for its next message (Postfix does not reconnect a milter within a session, milter8.c).
STOP = b"S"
# Retire after a reload: drain the connections, so open SMTP sessions finish on the old worker
# and a reload costs no client a 4xx (bounded by shutdown_timeout).
RETIRE = b"T"
# libmilter's listener thread (the worker's main thread) sleeps in poll() on the listening
# descriptor for up to MI_CHK_TIME (5 s). A signal with a no-op handler ends that poll (EINTR),
# so it polls the replaced descriptor at once.
WAKE_SIGNAL = signal.SIGUSR1

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# RFC 5424 §6.2.1 severities, which journald reads from a "<N>" prefix on stderr lines.
_SEVERITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_FORMAT = "authmilter[%(process)d]: %(levelname)s %(message)s"

# A worker: (listening socket, its generation's runtime, a callable to say "ready" once serving)
# → returns when libmilter stops.
WorkerMain = Callable[[socket.socket, Runtime, Callable[[], None]], None]


class StartupError(Exception):
    """The daemon cannot start (address in use, unknown group, ...); the message says why."""


# --- logging ---------------------------------------------------------------------------------


class _JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog severity, which journald turns into the priority."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_SEVERITIES.get(record.levelno, 6)}>{super().format(record)}"


class _JournalJsonFormatter(_JournalFormatter, JsonFormatter):
    """JSON lines (``[log] format = "json"``) with the severity prefix journald reads."""


def _formatter(settings: LogSettings, syslog: bool) -> logging.Formatter:
    if settings.format == "json":
        if syslog:
            return JsonFormatter(syslog_tag=True)
        return _JournalJsonFormatter() if _stderr_is_journal() else JsonFormatter()
    if syslog:
        return logging.Formatter(_FORMAT)
    return _JournalFormatter(_FORMAT) if _stderr_is_journal() else logging.Formatter(_FORMAT)


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM to "DEVICE:INODE" of the stream it connected (systemd.exec(5)).
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def configure_logging(settings: LogSettings, syslog_address: str = "/dev/log") -> None:
    """Send every log record (root logger) to stderr or syslog, at the configured level.

    Replaces the handlers set before, so a reload can switch destination. When syslog cannot
    be reached the records go to stderr, with a warning.

    Args:
        settings: the ``[log]`` section.
        syslog_address: the syslog socket (tests point it elsewhere).
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler: logging.Handler | None = None
    failure = ""
    if settings.destination == "syslog":
        # SysLogHandler defers connection errors to each record (printing a traceback per record):
        # find out now, once.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                probe.connect(syslog_address)
        except OSError as e:
            failure = f"cannot log to syslog at {syslog_address} ({e.strerror}); logging to stderr"
        else:
            facility = logging.handlers.SysLogHandler.facility_names[settings.syslog_facility]
            handler = logging.handlers.SysLogHandler(syslog_address, facility)
            handler.setFormatter(_formatter(settings, syslog=True))
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_formatter(settings, syslog=False))
    root.addHandler(handler)
    root.setLevel(_LEVELS[settings.level])
    if failure:
        log.warning("%s", failure)


# --- the listening socket --------------------------------------------------------------------


def socket_address(spec: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """A libmilter connection string → (family, address to bind).

    ``inet:PORT@HOST``, ``inet6:PORT@HOST`` (HOST may be ``[::1]``), ``unix:/path`` or
    ``local:/path`` (config.py has already checked the form).

    Raises:
        StartupError: the host name does not resolve for that family.
    """
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local"):
        return socket.AF_UNIX, rest
    port, _, host = rest.partition("@")
    family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
    try:
        info = socket.getaddrinfo(host.strip("[]"), int(port), family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise StartupError(f"milter socket {spec}: cannot resolve {host}: {e.strerror}") from None
    address = info[0][4]
    return family, (str(address[0]), int(address[1]))


@dataclass
class Listener:
    """The listening socket and, for a unix socket, the identity of the file it created."""

    sock: socket.socket
    spec: str
    file_id: tuple[int, int] | None = None

    def close(self) -> None:
        """Close the socket; a unix socket's file is removed if it is still the one we made."""
        if self.file_id is not None:
            path = self.spec.partition(":")[2]
            with contextlib.suppress(OSError):
                current = os.stat(path)
                if (current.st_dev, current.st_ino) == self.file_id:
                    os.unlink(path)
        self.sock.close()


def open_listener(settings: MilterSettings) -> Listener:
    """Create, bind and listen on the configured socket, ready to be inherited by the workers.

    Returns:
        A non-blocking, inheritable listening socket; TCP_NODELAY for inet sockets (accepted
        connections inherit it); for unix sockets the file has ``socket_mode`` and ``socket_group``.

    Raises:
        StartupError: the address is in use, the path is not a stale socket, the group is unknown...
    """
    family, address = socket_address(settings.socket)
    sock = socket.socket(family, socket.SOCK_STREAM)
    file_id = None
    try:
        if isinstance(address, str):
            file_id = _bind_unix(sock, address, settings)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise StartupError(f"milter socket {settings.socket}: cannot bind: {e.strerror}") from None
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    sock.set_inheritable(True)
    return Listener(sock, settings.socket, file_id)


def _bind_unix(sock: socket.socket, path: str, settings: MilterSettings) -> tuple[int, int]:
    _remove_stale_socket(path, settings.socket)
    gid = _group_id(settings.socket_group) if settings.socket_group else -1
    # Bound with no permissions for others, then opened up: no moment with a wider mode.
    previous = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        raise StartupError(f"milter socket {settings.socket}: cannot bind: {e.strerror}") from None
    finally:
        os.umask(previous)
    try:
        os.chown(path, -1, gid)
        os.chmod(path, int(settings.socket_mode, 8))
        info = os.stat(path)
    except OSError as e:
        os.unlink(path)
        raise StartupError(
            f"milter socket {settings.socket}: cannot set group or mode: {e.strerror}"
        ) from None
    return info.st_dev, info.st_ino


def _remove_stale_socket(path: str, spec: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"milter socket {spec}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left over from a daemon that did not clean up
            return
    raise StartupError(f"milter socket {spec}: another process is listening on {path}")


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError(f"socket_group: no group named '{name}'") from None


# --- systemd ---------------------------------------------------------------------------------


def notify(*assignments: str) -> bool:
    """Send ``READY=1``-style assignments to systemd's notification socket (sd_notify(3)).

    Without ``$NOTIFY_SOCKET`` (not started by systemd with Type=notify) nothing is sent.
    An address starting with '@' is in the abstract namespace.

    Returns:
        True when the datagram was sent.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%s: only unix socket addresses are supported", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(assignments).encode("utf-8"), address)
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), e.strerror)
        return False
    return True


# --- the workers -----------------------------------------------------------------------------


def serve_worker(listener: socket.socket, runtime: Runtime, ready: Callable[[], None]) -> None:
    """The work of one worker process: serve with the runtime loaded before the fork.

    Returns when libmilter stops (not on a graceful stop, which ends the process: see above).
    """
    return_large_buffers()
    serve(f"fd:{listener.fileno()}", runtime, ready=ready)


def load_runtime(config: Config, metrics: Metrics | None = None) -> Runtime:
    """Load what every worker of a generation uses (milter_app.build_runtime), in the supervisor.

    Raises:
        StartupError: a zone file, a signing key or the Public Suffix List cannot be used; the
            message names the file and why.
    """
    try:
        runtime = build_runtime(config, metrics=metrics)
    except (ZoneFileError, KeyFileError, OSError) as e:
        raise StartupError(str(e)) from None
    configured = config.milter.max_connections
    if (cap := connection_cap(configured)) < configured:
        log.warning(
            "[milter] max_connections = %d is more than the descriptor limit (RLIMIT_NOFILE %d) "
            "leaves room for: each worker serves at most %d connections; raise LimitNOFILE=",
            configured,
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            cap,
        )
    return runtime


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as nginx and others do; workers inherit it.

    The soft limit is usually 1024, which a worker reaches with about a thousand idle SMTP
    sessions; the hard limit is the administrator's (systemd: ``LimitNOFILE=``).

    Returns:
        The soft limit in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
    return soft


# glibc mallopt(3) parameters.
_M_MMAP_THRESHOLD = -3
LARGE_BUFFER_BYTES = 1024 * 1024


def return_large_buffers() -> bool:
    """Make glibc give every buffer of 1 MiB or more back to the system when it is freed.

    Why: by default glibc raises its mmap threshold to the size of the largest block freed (up to
    32 MiB), after which a 10 MB message's copies come from the heap of whichever of libmilter's
    threads checked it, and stay there: the peak RSS of 20 concurrent 10 MB messages varied from
    170 to 250 MB between runs (bench/). A fixed threshold (which also turns the dynamic one off)
    keeps memory to what messages in progress use. Small allocations are unaffected.

    Returns:
        True when glibc took the setting (False elsewhere, e.g. musl: nothing changes).
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES))
    except (OSError, AttributeError):
        return False


def _stop_when_asked(control: socket.socket, listener: socket.socket) -> None:
    """A worker's control thread: on "stop" (or the supervisor's end), drain and exit."""
    request = STOP
    with contextlib.suppress(OSError):
        request = control.recv(1) or STOP
    # A connected socketpair that never carries data (its other end stays open until the exit, or
    # poll() would report a hang-up): libmilter's listener idles on it; nobody can connect to it.
    unreachable, _kept_open = socket.socketpair()
    unreachable.setblocking(False)
    os.dup2(unreachable.fileno(), listener.fileno(), inheritable=False)
    main = threading.main_thread().ident
    if main is not None:
        signal.pthread_kill(main, WAKE_SIGNAL)
    with contextlib.suppress(OSError):  # the supervisor may be gone: it does not need to know then
        control.sendall(CLOSED)
    # libmilter sends the end-of-message reply after the callback has returned, i.e. after the
    # message counts as ended: exit only when nothing started or ended for a whole interval.
    previous = None
    while (
        (counts := message_counts()).in_progress
        or counts != previous
        or (request == RETIRE and counts.connections)
    ):
        previous = counts
        time.sleep(SESSION_POLL)
    log.debug("worker %d: no %s left, exiting", os.getpid(), "connection" if request == RETIRE else "message")
    _exit_worker(0)


def _exit_worker(status: int) -> NoReturn:
    # os._exit: libmilter's threads may still run; the interpreter must not be torn down under them.
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(status)


@dataclass
class Worker:
    """A worker process as the supervisor tracks it."""

    pid: int
    generation: int
    control: socket.socket | None  # None once the worker has closed it
    started: float
    ready: bool = False
    accepting: bool = True  # False once it has said CLOSED
    stopping: bool = False
    kill_at: float | None = None  # while stopping: SIGKILL at this time (None once killed)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def worker_count(settings: MilterSettings) -> int:
    """The configured number of workers; 0 means one per CPU."""
    return settings.workers or os.cpu_count() or 1


class Supervisor:
    """The supervisor's state and its poll loop.

    Workers come in generations: the first start and each reload start a *pending* generation,
    which replaces the serving one once all its workers are ready.

    Args:
        runtime: what the first workers get (:func:`load_runtime`).
        listener: from :func:`open_listener`; it lives as long as the supervisor.
        worker_main: what a worker process runs after the fork.
        endpoint: the metrics endpoint, served from the poll loop (metrics.py says why).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(
        self,
        runtime: Runtime,
        listener: Listener,
        worker_main: WorkerMain = serve_worker,
        status: StatusFile | None = None,
        endpoint: MetricsEndpoint | None = None,
    ) -> None:
        self.runtime = runtime
        self.endpoint = endpoint
        self.listener = listener
        self.worker_main = worker_main
        self.workers: dict[int, Worker] = {}
        self.generation = 0  # the generation that serves (0: none yet)
        self.last_generation = 0
        self.pending: tuple[int, Runtime, float] | None = None  # (generation, runtime, ready deadline)
        # The status to announce once no worker of an older generation accepts any more.
        self.handover: str | None = None
        self.respawn_at: list[float] = []
        self.backoff = BACKOFF_FIRST
        self.failed_starts = 0  # workers in a row of the serving generation that died before serving
        self.stopping = False
        self.failed = False
        self.poller = select.poll()
        # What `authmilter reload` reads: SIGHUPs answered, and the last outcome (reload.py).
        self.status = status or StatusFile(None)
        self.reloads = 0
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self.wakeup_r, select.POLLIN)
        if endpoint is not None:
            endpoint.watch(self.poller)

    @property
    def config(self) -> Config:
        """The configuration of the serving generation (of the first one, until it serves)."""
        return self.runtime.config

    def run(self) -> int:
        """Start the workers and supervise them until stopped.

        Returns:
            0 after a clean stop, 1 when the workers could not start or be kept alive.
        """
        for signum in self.SIGNALS:
            signal.signal(signum, lambda *_: None)  # delivered through the wakeup pipe
        signal.set_wakeup_fd(self.wakeup_w)
        try:
            self._start_generation(self.runtime)
            while not (self.stopping and not self.workers):
                self._wait_and_handle()
                self._handle_timers()
        finally:
            signal.set_wakeup_fd(-1)
            for signum in self.SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
        log.info("stopped")
        return 1 if self.failed else 0

    # --- the loop ---

    def _wait_and_handle(self) -> None:
        deadlines = [*self.respawn_at, *(w.kill_at for w in self.workers.values() if w.kill_at)]
        if self.pending is not None:
            deadlines.append(self.pending[2])
        if self.endpoint is not None and (client_deadline := self.endpoint.deadline()) is not None:
            deadlines.append(client_deadline)
        timeout = max(0.0, min(deadlines) - time.monotonic()) * 1000 if deadlines else None
        for fd, _ in self.poller.poll(timeout):
            if fd == self.wakeup_r:
                self._handle_signals()
            elif self.endpoint is not None and self.endpoint.owns(fd):
                self.endpoint.handle(fd)
            else:
                self._handle_control(fd)

    def _handle_signals(self) -> None:
        try:
            received = os.read(self.wakeup_r, 512)
        except BlockingIOError:
            return
        for signum in received:
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self._stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self._reload()

    def _handle_timers(self) -> None:
        now = time.monotonic()
        if self.endpoint is not None:
            self.endpoint.expire(now)
        for worker in self.workers.values():
            if worker.kill_at is not None and now >= worker.kill_at:
                log.warning("worker %d did not stop within the shutdown timeout: killing it", worker.pid)
                worker.kill_at = None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
        if self.pending is not None and now >= self.pending[2]:
            self._abandon_pending(f"not ready after {READY_TIMEOUT:g} s")
        due = [t for t in self.respawn_at if t <= now]
        if due:
            self.respawn_at = [t for t in self.respawn_at if t > now]
            for _ in due:
                self._spawn(self.generation, self.runtime)

    # --- workers ---

    def _spawn(self, generation: int, runtime: Runtime) -> None:
        # fork() copies only the calling thread: a lock held by another thread would stay locked.
        if threading.active_count() != 1:
            raise RuntimeError("refusing to fork: the supervisor must not run threads")
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            ours.close()
            self._become_worker(runtime, theirs)
        theirs.close()
        if runtime.metrics is not None:
            runtime.metrics.worker_started()
        self.workers[pid] = Worker(pid, generation, ours, time.monotonic())
        self.poller.register(ours.fileno(), select.POLLIN)
        log.debug("worker %d started (generation %d)", pid, generation)

    def _become_worker(self, runtime: Runtime, control: socket.socket) -> NoReturn:
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            # libmilter blocks SIGTERM and SIGHUP and waits for them in its own thread (its
            # immediate stop). SIGINT from a terminal reaches the whole process group: the
            # supervisor decides.
            for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(WAKE_SIGNAL, lambda *_: None)  # only to interrupt poll()
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            for worker in self.workers.values():
                if worker.control is not None:
                    worker.control.close()
            if self.endpoint is not None:
                self.endpoint.close()  # the supervisor's: a worker must not hold the port
            threading.Thread(
                target=_stop_when_asked, args=(control, self.listener.sock), name="stop", daemon=True
            ).start()
            self.worker_main(self.listener.sock, runtime, lambda: control.sendall(READY))
            status = 0
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            _exit_worker(status)

    def _handle_control(self, fd: int) -> None:
        worker = next((w for w in self.workers.values() if w.control and w.control.fileno() == fd), None)
        if worker is None or worker.control is None:  # reaped by an earlier event of the same poll()
            return
        try:
            received = worker.control.recv(16)
        except OSError:  # reset: it exited with our "stop" unread
            received = b""
        if not received:  # the worker exited; SIGCHLD does the rest
            self._forget_control(worker)
            return
        if READY in received:
            worker.ready = True
            self.failed_starts = 0
            log.debug("worker %d ready", worker.pid)
            self._promote_if_ready()
        if CLOSED in received:
            worker.accepting = False
            log.debug("worker %d no longer accepts connections", worker.pid)
            self._announce_after_handover()

    def _forget_control(self, worker: Worker) -> None:
        if worker.control is not None:
            self.poller.unregister(worker.control.fileno())
            worker.control.close()
            worker.control = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                if self.runtime.metrics is not None:
                    self.runtime.metrics.worker_exited(pid, worker.stopping)
                self._forget_control(worker)
                self._worker_exited(worker, status)
                self._announce_after_handover()

    def _worker_exited(self, worker: Worker, status: int) -> None:
        how = _describe_status(status)
        if worker.stopping:
            log.info("worker %d stopped (%s)", worker.pid, how)
        elif self.pending is not None and worker.generation == self.pending[0]:
            self._abandon_pending(f"worker {worker.pid} {how}")
        elif not worker.ready and self._cannot_keep_workers_alive():
            self._give_up(f"worker {worker.pid} {how}")
        else:
            lived = time.monotonic() - worker.started
            if lived >= STABLE_LIFETIME:
                self.backoff = BACKOFF_FIRST
            log.error(
                "worker %d %s after %.1f s; starting another in %.1f s", worker.pid, how, lived, self.backoff
            )
            self.respawn_at.append(time.monotonic() + self.backoff)
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def _cannot_keep_workers_alive(self) -> bool:
        """Count a worker that died before serving; True when too many did and none serves."""
        self.failed_starts += 1
        serving = any(
            w.ready and not w.stopping for w in self.workers.values() if w.generation == self.generation
        )
        return self.failed_starts >= MAX_FAILED_STARTS and not serving

    def _give_up(self, last: str) -> None:
        log.error(
            "%d workers in a row exited before serving (the last: %s) and none serves: closing %s and "
            "exiting with status 1 so that the service manager restarts authmilter; the reason is "
            "logged above",
            self.failed_starts,
            last,
            self.config.milter.socket,
        )
        self.failed = True
        self._stop("workers cannot be kept alive")

    def _retire(self, worker: Worker, timeout: float, request: bytes = STOP) -> None:
        """Ask a worker to stop gracefully (STOP or RETIRE); it is killed after ``timeout`` seconds."""
        if not worker.stopping:
            worker.stopping = True
            worker.kill_at = time.monotonic() + timeout
            if worker.control is not None:
                with contextlib.suppress(OSError):  # it may be exiting already
                    worker.control.sendall(request)

    # --- generations: start, reload, stop ---

    def _start_generation(self, runtime: Runtime) -> None:
        self.last_generation += 1
        self.pending = (self.last_generation, runtime, time.monotonic() + READY_TIMEOUT)
        for _ in range(worker_count(runtime.config.milter)):
            self._spawn(self.last_generation, runtime)

    def _promote_if_ready(self) -> None:
        if self.pending is None:
            return
        generation, runtime, _ = self.pending
        config = runtime.config
        workers = [w for w in self.workers.values() if w.generation == generation]
        if len(workers) < worker_count(config.milter) or not all(w.ready for w in workers):
            return
        first = self.generation == 0
        self.pending = None
        if not first:
            _release_files(self.runtime)
        self.generation, self.runtime = generation, runtime
        self.failed_starts = 0
        self.respawn_at.clear()
        self.backoff = BACKOFF_FIRST
        for worker in self.workers.values():
            if worker.generation != generation:
                self._retire(worker, config.milter.shutdown_timeout, RETIRE)
        status = f"serving {config.milter.socket} with {len(workers)} workers, config {config.path}"
        self.handover = status if first else f"configuration reloaded: {status}"
        if not first:
            self._count_reload("succeeded")
        self._announce_after_handover()

    def _announce_after_handover(self) -> None:
        """Say "ready" once the serving generation is the only one that accepts connections.

        An old worker accepts until its control thread has replaced the listening descriptor
        (it says CLOSED then), or it exits (killed at the latest after shutdown_timeout).
        """
        if self.handover is None:
            return
        if any(w.accepting for w in self.workers.values() if w.generation < self.generation):
            return
        log.info("%s", self.handover)
        self.status.write(self.reloads, Outcome.READY, self.handover)
        notify("READY=1", f"STATUS={self.handover}", f"MAINPID={os.getpid()}")
        self.handover = None

    def _discard_pending(self) -> None:
        if self.pending is not None:
            generation, runtime, _ = self.pending
            self.pending = None
            if runtime is not self.runtime:
                _release_files(runtime)
            for worker in self.workers.values():
                if worker.generation == generation:
                    self._retire(worker, runtime.config.milter.shutdown_timeout)

    def _abandon_pending(self, why: str) -> None:
        self._discard_pending()
        if self.generation == 0:
            log.error("the workers could not start (%s)", why)
            self.failed = True
            self._stop("start-up failure")
            return
        log.error("the new configuration's workers could not start (%s); the running ones stay", why)
        self._count_reload("failed")
        status = f"reload failed ({why}); serving with {self.config.path}"
        self.status.write(self.reloads, Outcome.FAILED, status)
        notify("READY=1", f"STATUS={status}")

    def _reload(self) -> None:
        if self.stopping:
            return
        notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        log.info("SIGHUP: reloading %s", self.config.path)
        self.reloads += 1
        try:
            config = load_config(self.config.path)
            runtime = load_runtime(config, self.runtime.metrics)
        except (ConfigError, StartupError) as e:
            log.error("reload refused, the running configuration stays: %s", e)
            self._count_reload("refused")
            self.status.write(self.reloads, Outcome.REFUSED, f"reload refused: {e}")
            notify("READY=1", f"STATUS=reload refused: {e}")
            return
        if config.milter.socket != self.config.milter.socket:
            log.warning(
                "the socket does not change on reload: still %s (restart for %s)",
                self.config.milter.socket,
                config.milter.socket,
            )
        if config.metrics.listen != self.config.metrics.listen:
            log.warning(
                "[metrics] listen does not change on reload: still %r (restart for %r)",
                self.config.metrics.listen,
                config.metrics.listen,
            )
        configure_logging(config.log)
        self._discard_pending()  # a reload during a reload: the newest file wins
        self._start_generation(runtime)

    def _count_reload(self, outcome: str) -> None:
        if self.runtime.metrics is not None:
            self.runtime.metrics.reload(outcome)

    def _stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.pending = None
        self.handover = None
        self.respawn_at.clear()
        notify("STOPPING=1")
        timeout = self.config.milter.shutdown_timeout
        log.info("%s: stopping the workers (at most %g s)", why, timeout)
        for worker in self.workers.values():
            self._retire(worker, timeout)


def _release_files(runtime: Runtime) -> None:
    """Close what a superseded runtime holds open in the supervisor (its history file)."""
    if isinstance(runtime.history, HistoryRecorder):
        runtime.history.reopen()


def run(config: Config) -> int:
    """``authmilter run``: log as configured, load, open the socket, supervise workers until stopped.

    Returns:
        The exit status: 0 after a clean stop, 1 when the workers could not start or be kept alive.

    Raises:
        StartupError: the runtime could not be loaded or the socket could not be created.
    """
    configure_logging(config.log)
    raise_descriptor_limit()
    metrics, endpoint = start_metrics(config)
    try:
        runtime = load_runtime(config, metrics)
        listener = open_listener(config.milter)
        status = StatusFile(status_path(config.milter.status_file))
        try:
            log.info("listening on %s", config.milter.socket)
            return Supervisor(runtime, listener, status=status, endpoint=endpoint).run()
        finally:
            status.remove()
            listener.close()
    finally:
        if endpoint is not None:
            endpoint.close()
        if metrics is not None:
            metrics.close()


def start_metrics(config: Config) -> tuple[Metrics | None, MetricsEndpoint | None]:
    """``[metrics] listen``: the metrics (multiprocess directory made) and their bound endpoint.

    Raises:
        StartupError: the endpoint's address cannot be bound.
    """
    address = config.metrics.address
    if address is None:
        return None, None
    metrics = enable_metrics()
    try:
        endpoint = MetricsEndpoint(address, metrics.render)
    except OSError as e:
        metrics.close()
        raise StartupError(f"[metrics] listen = {config.metrics.listen}: cannot bind: {e.strerror}") from None
    log.info("metrics at http://%s/metrics", config.metrics.listen)
    return metrics, endpoint


__all__ = [
    "Listener",
    "StartupError",
    "Supervisor",
    "configure_logging",
    "load_runtime",
    "notify",
    "open_listener",
    "raise_descriptor_limit",
    "run",
    "serve_worker",
    "socket_address",
    "worker_count",
]

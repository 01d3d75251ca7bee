"""A private Sendmail for the integration tests: Debian's binary, unpacked, never installed.

Debian's ``sendmail-bin`` conflicts with the ``postfix`` package the other half of the suite needs,
so ``make test`` does not install it: it downloads ``sendmail-bin`` and ``sendmail-cf`` with
``apt-get download`` and unpacks them with ``dpkg-deb -x`` into :data:`UNPACKED` (the Makefile's
``sendmail`` target). The binary ``usr/libexec/sendmail/sendmail`` then runs with ``-C`` and a
sendmail.cf that m4 builds from the unpacked ``cf/`` tree and the .mc written here.

:class:`SendmailInstance` runs it as ``sendmail -bD`` (daemon in the foreground, so the harness owns
the process) inside a private mount and UTS namespace (``unshare``), where

- the host name is ``mx.receiver.example``: Sendmail insists on a qualified name of its own and
  sleeps a minute before each retry when it finds none (``runsc`` on a container);
- ``/etc/hosts`` and ``/etc/nsswitch.conf`` ("hosts: files") are our own, so the reverse lookup of
  each client (libc's ``gethostbyaddr``, not Sendmail's service switch) is answered from the file
  and never sent to the machine's resolver;
- ``/dev/log`` leads to a datagram socket of :class:`SyslogReceiver`, so what Sendmail logs lands in
  ``maillog`` beside the test instead of in the machine's syslog (or nowhere, where there is none).

Sendmail has no XCLIENT: a test client takes its identity by connecting from its own loopback
address (:attr:`postfix.Client.loopback`, e.g. 127.0.0.5), which the namespace's hosts file names.

Also a script, for ``make test-docker``: ``python tests/integration/sendmail.py --dir DIR --smtp-port
... --submission-port ... --sink-port ... --milter-port ...`` writes the same .mc (with the
container's paths), ``hosts`` and ``service.switch`` into the build context of docker/sendmail.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from postfix import (
    COMMAND_TIMEOUT,
    READY_TIMEOUT,
    SASL_MECHANISM,
    SENDING_CLIENT,
    SPOOFING_CLIENT,
    STOP_TIMEOUT,
    SUBMISSION_DAEMON,
    Client,
    HarnessError,
    _die_with_parent,
    _wait_for,
    find_program,
    remove_keeping_log,
    smtp_banner_ready,
    tail,
)
from sink import MessageStore

from processes import stop_process

REPO = Path(__file__).resolve().parents[2]
# Where `make sendmail` unpacks the packages (ignored by git).
UNPACKED = REPO / ".cache" / "sendmail" / "root"
SENDMAIL = UNPACKED / "usr" / "libexec" / "sendmail" / "sendmail"
CF_DIR = UNPACKED / "usr" / "share" / "sendmail" / "cf"
HOSTNAME = "mx.receiver.example"
# The containerised Sendmail (docker/sendmail): the same program, .mc and name files as here.
CONTAINER_SENDMAIL = Path("/usr/libexec/sendmail/sendmail")
CONTAINER_ROOT = Path("/etc/mail/authmilter")
CONTAINER_CONFIG = CONTAINER_ROOT / "sendmail.cf"
CONTAINER_QUEUE = Path("/var/spool/mqueue")
# The daemon's name in {daemon_name} for the port with the milter (DaemonPortOptions Name=).
DAEMON_NAME = "MTA"
# Seconds between queue runs: a message whose delivery to the sink failed is retried soon.
QUEUE_INTERVAL = "5s"
# The devices Sendmail opens, bound into the namespace's own /dev (which also holds /dev/log).
DEVICES = ("null", "zero", "random", "urandom")
SYSLOG_DATAGRAM = 8192

# Runs as `sh -c NAMESPACE_SCRIPT sh ROOT PROGRAM ARGS...` in new mount and UTS namespaces
# (`unshare` makes their mounts private: nothing here is seen outside). See the module docstring.
NAMESPACE_SCRIPT = f"""set -e
root="$1"; shift
hostname {HOSTNAME}
mount --bind "$root/hosts" /etc/hosts
mount --bind "$root/nsswitch.conf" /etc/nsswitch.conf
for device in {" ".join(DEVICES)}; do mount --bind "/dev/$device" "$root/dev/$device"; done
mount --rbind "$root/dev" /dev
exec "$@"
"""

# Milter options as docs/deploy.md gives them: tempfail when authmilter is unreachable (F=T), and
# timeouts longer than one message's checks (T=: send, reply, overall from end of message).
MILTER_FLAGS = "F=T, T=S:30s;R:60s;E:5m"
# Sendmail's own defaults (cf/m4/cfhead.m4), spelled out as docs/deploy.md tells a site that sets
# them to do: authmilter reads j and {daemon_name} at connect, i, {auth_type} and {auth_authen} at
# MAIL FROM. Sendmail knows the queue id (i) at MAIL FROM already; Postfix does not.
MILTER_MACROS_CONNECT = "j, _, {daemon_name}, {if_name}, {if_addr}"
MILTER_MACROS_ENVFROM = (
    "i, {auth_type}, {auth_authen}, {auth_ssf}, {auth_author}, {mail_mailer}, {mail_host}, {mail_addr}"
)
# `sendmail -bp -qQ` lists each quarantined message as "ID SIZE DATE <SENDER>", then
# "QUARANTINE: reason" and its recipients on indented lines ("*" after ID: being delivered).
_LISTED_ID = re.compile(r"^(\w+)\*?\s+\d+\s")


class SyslogReceiver:
    """A datagram socket standing in for /dev/log: each message becomes a line of ``log_path``."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(socket_path))
        self._log_path = log_path
        self._thread = threading.Thread(target=self._receive, name="sendmail-syslog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _receive(self) -> None:
        with self._log_path.open("ab") as log:
            while True:
                try:
                    datagram = self._socket.recv(SYSLOG_DATAGRAM)
                except OSError:  # closed by stop()
                    return
                if not datagram:  # shut down by stop(); syslog(3) sends no empty messages
                    return
                log.write(datagram.rstrip(b"\n") + b"\n")
                log.flush()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        self._thread.join(timeout=5)


class SendmailInstance:
    """A private Sendmail: config, queue, pid file and log under its own ROOT, listening on loopback.

    Everything it accepts is relayed to the sink on 127.0.0.1 (SMART_HOST), after authmilter
    (INPUT_MAIL_FILTER) had its say. ROOT is a fresh directory under the system's temporary folder
    (a Unix socket path must stay short); :meth:`remove` deletes it after keeping the log.

    Args:
        log_dir: where the log is kept after the instance is gone.
        smtp_port: the daemon with authmilter as its input filter, on 127.0.0.1.
        submission_port: a second such daemon, whose {daemon_name} is :data:`SUBMISSION_DAEMON`.
        sink_port: the sink on 127.0.0.1 that every message is relayed to.
        milter_port: authmilter's port on 127.0.0.1.
        clients: the test clients, whose loopback addresses the namespace's hosts file names.

    Raises:
        HarnessError: not root, or Sendmail is not unpacked.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        smtp_port: int,
        submission_port: int,
        sink_port: int,
        milter_port: int,
        clients: Sequence[Client],
    ) -> None:
        if os.geteuid() != 0:
            raise HarnessError("the integration tests start a private Sendmail in a namespace and need root")
        if not SENDMAIL.exists():
            raise HarnessError(
                f"{SENDMAIL} is missing: the Sendmail cases need Debian's sendmail-bin and sendmail-cf "
                "unpacked there. Run `make sendmail` (part of `make test`)."
            )
        self._m4 = find_program("m4")
        self._unshare = find_program("unshare")
        self.root = Path(tempfile.mkdtemp(prefix="authmilter-sendmail-"))
        self.root.chmod(0o755)
        self.log_dir = log_dir
        self.queue_dir = self.root / "queue"
        self.config_path = self.root / "sendmail.cf"
        self.log_path = self.root / "maillog"
        self.host = "127.0.0.1"
        self.smtp_port = smtp_port
        self.submission_port = submission_port
        self.sink_port = sink_port
        self.milter_port = milter_port
        self.clients = tuple(clients)
        self._process: subprocess.Popen[bytes] | None = None
        self._syslog: SyslogReceiver | None = None

    def write_config(self) -> None:
        """Build sendmail.cf with m4 and write the namespace's hosts, nsswitch.conf and /dev.

        Raises:
            HarnessError: m4 failed.
        """
        # Sendmail refuses a queue directory others may write to; it runs as root, so 0700 root.
        self.queue_dir.mkdir(mode=0o700, exist_ok=True)
        (self.root / "sendmail.mc").write_text(self._mc(), encoding="utf-8")
        built = subprocess.run(
            [self._m4, f"-D_CF_DIR_={CF_DIR}/", str(CF_DIR / "m4" / "cf.m4"), str(self.root / "sendmail.mc")],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if built.returncode != 0 or not built.stdout:
            raise HarnessError(f"m4 could not build sendmail.cf ({built.returncode}): {built.stderr}")
        self.config_path.write_text(built.stdout, encoding="utf-8")
        write_name_files(self.root, self.clients)
        (self.root / "nsswitch.conf").write_text("hosts: files\n", encoding="utf-8")
        devices = self.root / "dev"
        devices.mkdir(exist_ok=True)
        for device in DEVICES:
            (devices / device).touch()
        (devices / "log").unlink(missing_ok=True)
        (devices / "log").symlink_to(self.root / "syslog")

    def _mc(self) -> str:
        return sendmail_mc(
            root=self.root,
            queue_dir=self.queue_dir,
            smtp_port=self.smtp_port,
            submission_port=self.submission_port,
            sink_port=self.sink_port,
            milter_port=self.milter_port,
        )

    def _command(self, *args: str) -> list[str]:
        """``sendmail -C OUR_CONFIG ARGS`` run inside the private namespaces."""
        return self._in_namespaces([str(SENDMAIL), "-C", str(self.config_path), *args])

    def _in_namespaces(self, argv: list[str]) -> list[str]:
        return [self._unshare, "--mount", "--uts", "sh", "-c", NAMESPACE_SCRIPT, "sh", str(self.root), *argv]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """One command inside the private namespaces (e.g. ``sendmail -bp -qQ``), waited for."""
        return subprocess.run(
            self._in_namespaces(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )

    def start(self) -> None:
        """Build the config, start the daemon, return once it greets with 220.

        Raises:
            HarnessError: the daemon exited or did not greet within :data:`READY_TIMEOUT`.
        """
        self.write_config()
        self._syslog = SyslogReceiver(self.root / "syslog", self.log_path)
        self._syslog.start()
        with (self.root / "sendmail.out").open("ab") as output:
            self._process = subprocess.Popen(
                self._command("-bD", f"-q{QUEUE_INTERVAL}"),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        process = self._process
        for port in (self.smtp_port, self.submission_port):
            if not _wait_for(
                lambda p=port: process.poll() is not None or smtp_banner_ready(self.host, p),  # type: ignore[misc]
                READY_TIMEOUT,
            ) or process.poll() is not None:
                raise HarnessError(
                    f"Sendmail on {self.host}:{port} did not greet within {READY_TIMEOUT} s "
                    f"(exit status {process.poll()}):\n"
                    f"{tail(self.root / 'sendmail.out')}\n{tail(self.log_path)}"
                )

    def stop(self) -> None:
        """SIGTERM the daemon (SIGKILL after the timeout) and stop listening for its log."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, STOP_TIMEOUT)
        if self._syslog is not None:
            self._syslog.stop()
            self._syslog = None

    def remove(self) -> None:
        """Delete ROOT (call after :meth:`stop`); the log is copied into ``log_dir`` first."""
        self.log_path = remove_keeping_log(self.root, self.log_path, self.log_dir)

    def quarantine(self) -> SendmailQuarantine:
        return SendmailQuarantine(self.run, [str(SENDMAIL), "-C", str(self.config_path)], self.queue_dir)


def sendmail_mc(
    *, root: Path, queue_dir: Path, smtp_port: int, submission_port: int, sink_port: int, milter_port: int
) -> str:
    """The .mc of the tests' Sendmail (m4 makes sendmail.cf of it), natively or in a container.

    Args:
        root: its folder: pid and statistics files, ``hosts`` and ``service.switch``.
        queue_dir: its queue.
        smtp_port, submission_port: its two daemons on 127.0.0.1 (``Name=`` MTA and submission).
        sink_port: the sink on 127.0.0.1 it relays everything to.
        milter_port: authmilter on 127.0.0.1.
    """
    return f"""divert(-1)
# Written by tests/integration/sendmail.py: a private, loopback-only instance.
divert(0)dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{HOSTNAME}')dnl
dnl No DontBlameSendmail: Sendmail runs as root, and ROOT (0755), this config and the queue (0700)
dnl belong to root, so its file safety checks pass as they are (they log "unsafe" otherwise).
define(`QUEUE_DIR', `{queue_dir}')dnl
define(`STATUS_FILE', `{root}/statistics')dnl
define(`confPID_FILE', `{root}/sendmail.pid')dnl
dnl No local delivery: every recipient is relayed to the sink, so no aliases file is needed.
define(`ALIAS_FILE', `')dnl
dnl Host names from the namespace's files only: Sendmail asks no DNS server (authmilter asks Knot).
define(`confSERVICE_SWITCH_FILE', `{root}/service.switch')dnl
define(`confHOSTS_FILE', `{root}/hosts')dnl
define(`confDONT_PROBE_INTERFACES', `true')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
dnl AUTH for the signing tests ({{auth_authen}}); this mechanism needs no Sendmail.conf or sasldb.
define(`confAUTH_MECHANISMS', `{SASL_MECHANISM}')dnl
define(`confTO_IDENT', `0')dnl
dnl A loaded test machine must not make Sendmail queue or refuse mail (load average limits).
define(`confQUEUE_LA', `1000')dnl
define(`confREFUSE_LA', `1000')dnl
define(`confDELAY_LA', `0')dnl
define(`confDELIVERY_MODE', `background')dnl
dnl An inbound MX for receiver.example; everything goes on to the sink.
RELAY_DOMAIN(`receiver.example')dnl
define(`SMART_HOST', `relay:[127.0.0.1]')dnl
define(`RELAY_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`confTO_CONNECT', `5s')dnl
dnl Only our port: no MSA on 587, no daemon on 25.
FEATURE(`no_default_msa')dnl
DAEMON_OPTIONS(`Port={smtp_port}, Addr=127.0.0.1, Name={DAEMON_NAME}')dnl
dnl Name= is what milters get as {{daemon_name}}.
DAEMON_OPTIONS(`Port={submission_port}, Addr=127.0.0.1, Name={SUBMISSION_DAEMON}')dnl
INPUT_MAIL_FILTER(`authmilter', `S=inet:{milter_port}@127.0.0.1, {MILTER_FLAGS}')dnl
define(`confMILTER_MACROS_CONNECT', `{MILTER_MACROS_CONNECT}')dnl
define(`confMILTER_MACROS_ENVFROM', `{MILTER_MACROS_ENVFROM}')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""


def write_name_files(folder: Path, clients: Sequence[Client]) -> None:
    """``hosts`` (our name and the test clients' loopback addresses) and Sendmail's ``service.switch``
    (host names from files only) in ``folder``."""
    names = "".join(f"{c.loopback} {c.name}\n" for c in clients if c.loopback)
    (folder / "hosts").write_text(f"127.0.0.1 localhost {HOSTNAME}\n{names}", encoding="utf-8")
    (folder / "service.switch").write_text("hosts files\naliases files\n", encoding="utf-8")


class SendmailQuarantine:
    """Sendmail's quarantine: queued messages that smfi_quarantine set aside (``mailq -qQ``).

    Args:
        run: runs a command (program first) where that Sendmail is, and returns its result.
        sendmail: the command line of that Sendmail up to its arguments (program, ``-C`` config).
        queue_dir: its queue, as ``run`` sees it.
    """

    def __init__(
        self,
        run: Callable[[list[str]], subprocess.CompletedProcess[str]],
        sendmail: list[str],
        queue_dir: Path,
    ) -> None:
        self._run = run
        self._sendmail = sendmail
        self._queue_dir = queue_dir

    def queue_ids(self) -> list[str]:
        """The ids of the quarantined messages (``sendmail -bp -qQ``)."""
        listing = self._checked([*self._sendmail, "-bp", "-qQ"]).stdout
        return [m.group(1) for line in listing.splitlines() if (m := _LISTED_ID.match(line))]

    def delete(self, queue_id: str) -> None:
        """Remove a quarantined message: Sendmail has no command for it, so its queue files go.

        A quarantined message's control file is ``hf<ID>`` (instead of ``qf<ID>``), its body ``df<ID>``.
        """
        files = [str(self._queue_dir / f"{prefix}{queue_id}") for prefix in ("hf", "df")]
        self._checked(["rm", "-f", *files])

    def _checked(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        done = self._run(argv)
        if done.returncode != 0:
            raise HarnessError(f"{' '.join(argv)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done


def external_quarantine(command_prefix: str) -> SendmailQuarantine:
    """The quarantine of the containerised Sendmail, reached by a command prefix (``podman exec sm``)."""
    prefix = shlex.split(command_prefix)

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )

    return SendmailQuarantine(run, [str(CONTAINER_SENDMAIL), "-C", str(CONTAINER_CONFIG)], CONTAINER_QUEUE)


@dataclass(frozen=True)
class LocalSendmail:
    """The natively started Sendmail with the sink's messages, and the milter port it names."""

    sendmail: SendmailInstance
    sink: MessageStore
    milter_port: int


def write_container_context(
    folder: Path, *, smtp_port: int, submission_port: int, sink_port: int, milter_port: int
) -> None:
    """What docker/sendmail/Dockerfile copies besides itself: the .mc, ``hosts`` and ``service.switch``."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = sendmail_mc(
        root=CONTAINER_ROOT,
        queue_dir=CONTAINER_QUEUE,
        smtp_port=smtp_port,
        submission_port=submission_port,
        sink_port=sink_port,
        milter_port=milter_port,
    )
    (folder / "sendmail.mc").write_text(mc, encoding="utf-8")
    write_name_files(folder, (SENDING_CLIENT, SPOOFING_CLIENT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the containerised Sendmail's config (test-docker.sh)")
    parser.add_argument("--dir", required=True, type=Path, help="the image's build context")
    for port in ("smtp", "submission", "sink", "milter"):
        parser.add_argument(f"--{port}-port", required=True, type=int)
    args = parser.parse_args(argv)
    write_container_context(
        args.dir,
        smtp_port=args.smtp_port,
        submission_port=args.submission_port,
        sink_port=args.sink_port,
        milter_port=args.milter_port,
    )


if __name__ == "__main__":
    main()

"""Session fixtures for the integration tests: sink, private Postfix and Sendmail, authmilter, sender zones.

Natively (the default, and CI) everything runs on loopback and is stopped at session end. The
``mta`` fixture is parametrised over the MTAs ("postfix", "sendmail"): each test that takes it runs
against both, which share the session's Knot server and sink; each MTA asks its own authmilter
daemon (tests reconfigure and signal it, and its DNS cache must not serve the other MTA's tests).
With ``AUTHMILTER_SMTP=host:port`` the tests talk to a set-up started elsewhere (docker) instead;
see README.md in this folder for the variables that set-up must provide.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from postfix import (
    READY_TIMEOUT,
    SENDING_CLIENT,
    SPOOFING_CLIENT,
    Authmilter,
    AuthmilterProcess,
    ContainerAuthmilter,
    HarnessError,
    LocalPostfix,
    Mta,
    PostfixInstance,
    Sender,
    Senders,
    _wait_for,
    external_hold_queue,
    read_from,
    size_of,
    smtp_banner_ready,
    spf_record,
)
from sendmail import LocalSendmail, SendmailInstance, external_quarantine
from sink import MessageStore, SinkServer

from dnsserver import AuthoritativeDns, DnsServerMissing, free_port
from signing import ed25519_key, rsa_key, zone_txt

EXTERNAL_SMTP = os.environ.get("AUTHMILTER_SMTP", "")
MTAS = ("postfix", "sendmail")

# Logs shown with a failing test: name -> path. Filled as the servers start.
_LOGS: dict[str, Path] = {}
_LOG_OFFSETS = pytest.StashKey[dict[str, int]]()


def _fail(error: Exception) -> BaseException:
    # A missing or broken server is a broken set-up, not a reason to skip.
    return pytest.fail.Exception(str(error), pytrace=False)


if EXTERNAL_SMTP:

    @pytest.fixture(scope="session")
    def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthoritativeDns]:
        """Knot on the fixed port the external authmilter was configured with (AUTHMILTER_DNS_PORT)."""
        try:
            server = AuthoritativeDns(tmp_path_factory.mktemp("dns"))
        except DnsServerMissing as e:
            raise _fail(e) from None
        server.port = int(os.environ.get("AUTHMILTER_DNS_PORT", "5353"))
        server.add_zone("example", "")
        with server:
            yield server


def _publish(dns: AuthoritativeDns, domain: str, policy: str) -> Sender:
    sender = Sender(domain, rsa_key(), ed25519_key())
    dns.add_zone(
        domain,
        f"""
        @ TXT {zone_txt(spf_record(sender.client))}
        rsa._domainkey TXT {zone_txt(sender.rsa.txt_record())}
        ed._domainkey TXT {zone_txt(sender.ed25519.txt_record())}
        _dmarc TXT {zone_txt(f"v=DMARC1; p={policy}; rua=mailto:dmarc@{domain}")}
        """,
    )
    return sender


@pytest.fixture(scope="session")
def senders(dns_server: AuthoritativeDns) -> Senders:
    published = Senders(
        reject=_publish(dns_server, "pf-reject.example", "reject"),
        quarantine=_publish(dns_server, "pf-quarantine.example", "quarantine"),
        outage={name: _publish(dns_server, f"pf-outage-{name}.example", "reject") for name in MTAS},
    )
    dns_server.reload()
    return published


@pytest.fixture(scope="session")
def sink_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkServer]:
    """The one sink every local MTA relays to (message ids tell the tests' messages apart)."""
    sink = SinkServer("127.0.0.1", 0, tmp_path_factory.mktemp("sink"))
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


@contextmanager
def _serving(mta: PostfixInstance | SendmailInstance, log_name: str) -> Iterator[None]:
    """The private MTA running while the block runs; its log attached to failed tests' reports."""
    _LOGS[log_name] = mta.log_path
    try:
        mta.start()
        yield
    except HarnessError as e:
        raise _fail(e) from None
    finally:
        mta.stop()
        mta.remove()
        _LOGS[log_name] = mta.log_path


@pytest.fixture(scope="session")
def local_postfix(
    tmp_path_factory: pytest.TempPathFactory, sink_server: SinkServer
) -> Generator[LocalPostfix, None, None]:
    """Private Postfix (its milter port chosen now, for authmilter to bind later)."""
    if EXTERNAL_SMTP:
        pytest.skip("AUTHMILTER_SMTP is set: Postfix runs outside the tests")
    milter_port = free_port("127.0.0.1")
    try:
        postfix = PostfixInstance(
            tmp_path_factory.mktemp("postfix"),
            smtp_port=free_port("127.0.0.1"),
            bare_smtp_port=free_port("127.0.0.1"),
            sink_port=sink_server.port,
            milter=f"inet:127.0.0.1:{milter_port}",
            submission_port=free_port("127.0.0.1"),
        )
    except HarnessError as e:
        raise _fail(e) from None
    with _serving(postfix, "postfix maillog"):
        yield LocalPostfix(postfix, MessageStore(sink_server.store_directory), milter_port)


@pytest.fixture(scope="session")
def local_sendmail(
    tmp_path_factory: pytest.TempPathFactory, sink_server: SinkServer
) -> Generator[LocalSendmail, None, None]:
    """Private Sendmail from the unpacked Debian packages (its milter port chosen now)."""
    milter_port = free_port("127.0.0.1")
    try:
        sendmail = SendmailInstance(
            tmp_path_factory.mktemp("sendmail"),
            smtp_port=free_port("127.0.0.1"),
            submission_port=free_port("127.0.0.1"),
            sink_port=sink_server.port,
            milter_port=milter_port,
            clients=(SENDING_CLIENT, SPOOFING_CLIENT),
        )
    except HarnessError as e:
        raise _fail(e) from None
    with _serving(sendmail, "sendmail maillog"):
        yield LocalSendmail(sendmail, MessageStore(sink_server.store_directory), milter_port)


def _authmilter(
    mta_name: str, milter_port: int, dns_server: AuthoritativeDns, tmp_path_factory: pytest.TempPathFactory
) -> Generator[AuthmilterProcess, None, None]:
    """``authmilter run`` with 2 workers on the port the MTA's milter setting names, metrics on."""
    process = AuthmilterProcess(
        tmp_path_factory.mktemp(f"authmilter-{mta_name}"),
        milter_port=milter_port,
        dns_port=dns_server.port,
        metrics_port=free_port("127.0.0.1"),
    )
    _LOGS[f"authmilter log ({mta_name})"] = process.log_path
    try:
        process.start()
        yield process
    except HarnessError as e:
        raise _fail(e) from None
    finally:
        process.stop()


@pytest.fixture(scope="session")
def postfix_authmilter(
    local_postfix: LocalPostfix, dns_server: AuthoritativeDns, tmp_path_factory: pytest.TempPathFactory
) -> Generator[AuthmilterProcess, None, None]:
    yield from _authmilter("postfix", local_postfix.milter_port, dns_server, tmp_path_factory)


@pytest.fixture(scope="session")
def sendmail_authmilter(
    local_sendmail: LocalSendmail, dns_server: AuthoritativeDns, tmp_path_factory: pytest.TempPathFactory
) -> Generator[AuthmilterProcess, None, None]:
    yield from _authmilter("sendmail", local_sendmail.milter_port, dns_server, tmp_path_factory)


@pytest.fixture(scope="session", params=MTAS)
def mta(request: pytest.FixtureRequest, senders: Senders) -> Mta:
    """An MTA with authmilter in front: Postfix or Sendmail here, or (AUTHMILTER_SMTP) one run elsewhere."""
    name: str = request.param
    if EXTERNAL_SMTP:
        if name == "sendmail":
            return _external_sendmail(milter=_container_authmilter())
        return _external_postfix(EXTERNAL_SMTP, milter=_container_authmilter())
    milter: AuthmilterProcess = request.getfixturevalue(f"{name}_authmilter")
    if name == "postfix":
        local: LocalPostfix = request.getfixturevalue("local_postfix")
        postfix = local.postfix
        return Mta(
            name,
            postfix.host,
            postfix.smtp_port,
            local.sink,
            postfix.hold_queue(),
            milter=milter,
            submission_port=postfix.submission_port,
        )
    local_sendmail: LocalSendmail = request.getfixturevalue("local_sendmail")
    sendmail = local_sendmail.sendmail
    # Sendmail has no XCLIENT: clients connect from their own loopback addresses (sendmail.py).
    return Mta(
        name,
        sendmail.host,
        sendmail.smtp_port,
        local_sendmail.sink,
        sendmail.quarantine(),
        xclient=False,
        milter=milter,
        submission_port=sendmail.submission_port,
    )


@pytest.fixture(scope="session")
def bare_postfix(request: pytest.FixtureRequest) -> Mta:
    """Postfix's smtpd port without any milter, to check the harness on its own."""
    if EXTERNAL_SMTP:
        address = os.environ.get("AUTHMILTER_BARE_SMTP")
        if not address:
            pytest.skip("AUTHMILTER_SMTP is set without AUTHMILTER_BARE_SMTP: no milter-free port to check")
        return _external_postfix(address, milter=None)
    local: LocalPostfix = request.getfixturevalue("local_postfix")
    postfix = local.postfix
    return Mta("postfix", postfix.host, postfix.bare_smtp_port, local.sink, postfix.hold_queue())


def _external_postfix(address: str, milter: ContainerAuthmilter | None) -> Mta:
    """The Postfix of a set-up started elsewhere, at ``address`` (host:port)."""
    host, _, port = address.rpartition(":")
    sink_dir = os.environ.get("AUTHMILTER_SINK_DIR")
    postqueue_prefix = os.environ.get("AUTHMILTER_POSTFIX_EXEC")
    if not sink_dir or not postqueue_prefix:
        raise _fail(RuntimeError("AUTHMILTER_SMTP needs AUTHMILTER_SINK_DIR and AUTHMILTER_POSTFIX_EXEC too"))
    return Mta(
        "postfix",
        host,
        int(port),
        MessageStore(Path(sink_dir)),
        external_hold_queue(postqueue_prefix),
        milter=milter,
        submission_port=int(os.environ.get("AUTHMILTER_SUBMISSION_PORT", "0")),
    )


def _external_sendmail(milter: ContainerAuthmilter | None) -> Mta:
    """The Sendmail of a set-up started elsewhere (AUTHMILTER_SENDMAIL_SMTP), once it greets."""
    address = os.environ.get("AUTHMILTER_SENDMAIL_SMTP")
    if not address:
        pytest.skip("AUTHMILTER_SMTP is set without AUTHMILTER_SENDMAIL_SMTP: that set-up runs no Sendmail")
    exec_prefix = os.environ.get("AUTHMILTER_SENDMAIL_EXEC")
    sink_dir = os.environ.get("AUTHMILTER_SINK_DIR")
    if not exec_prefix or not sink_dir:
        raise _fail(
            RuntimeError("AUTHMILTER_SENDMAIL_SMTP needs AUTHMILTER_SENDMAIL_EXEC and AUTHMILTER_SINK_DIR")
        )
    host, _, port = address.rpartition(":")
    if not _wait_for(lambda: smtp_banner_ready(host, int(port)), READY_TIMEOUT):
        raise _fail(RuntimeError(f"Sendmail at {address} did not greet within {READY_TIMEOUT} s"))
    return Mta(
        "sendmail",
        host,
        int(port),
        MessageStore(Path(sink_dir)),
        external_quarantine(exec_prefix),
        xclient=False,
        milter=milter,
        submission_port=int(os.environ.get("AUTHMILTER_SENDMAIL_SUBMISSION_PORT", "0")),
    )


def _container_authmilter() -> ContainerAuthmilter | None:
    """The set-up's authmilter, when AUTHMILTER_PID and its companions say where it is."""
    pid = os.environ.get("AUTHMILTER_PID")
    if not pid:
        return None
    names = (
        "AUTHMILTER_CONFIG",
        "AUTHMILTER_STATE_DIR",
        "AUTHMILTER_SHARED_DIR",
        "AUTHMILTER_LOG",
        "AUTHMILTER_MILTER_PORT",
    )
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        raise _fail(RuntimeError(f"AUTHMILTER_PID needs {', '.join(missing)} too"))
    milter = ContainerAuthmilter(
        pid=int(pid),
        config_path=Path(os.environ["AUTHMILTER_CONFIG"]),
        state_dir=Path(os.environ["AUTHMILTER_STATE_DIR"]),
        shared_dir=Path(os.environ["AUTHMILTER_SHARED_DIR"]),
        log_path=Path(os.environ["AUTHMILTER_LOG"]),
        milter_port=int(os.environ["AUTHMILTER_MILTER_PORT"]),
        dns_port=int(os.environ.get("AUTHMILTER_DNS_PORT", "5353")),
    )
    _LOGS["authmilter log (container)"] = milter.log_path
    return milter


@pytest.fixture
def milter_process(mta: Mta) -> Authmilter:
    """The authmilter the MTA asks, for tests that signal it or read its files."""
    if mta.milter is None:
        pytest.skip(
            "AUTHMILTER_SMTP is set without AUTHMILTER_PID: the authmilter process is not reachable "
            "(docker/test-docker.sh sets AUTHMILTER_PID, _CONFIG, _STATE_DIR and _LOG)"
        )
    return mta.milter


@pytest.fixture(autouse=True)
def _remember_log_offsets(request: pytest.FixtureRequest) -> None:
    request.node.stash[_LOG_OFFSETS] = {name: size_of(path) for name, path in _LOGS.items()}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach what the servers logged during a failed test to its report."""
    report = yield
    if report.failed:
        offsets = item.stash.get(_LOG_OFFSETS, {})
        for name, path in _LOGS.items():
            report.sections.append((f"{name} ({path})", read_from(path, offsets.get(name, 0))[-20000:]))
    return report

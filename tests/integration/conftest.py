"""Session fixtures for the integration tests: sink, private Postfix, authmilter, sender zones.

Natively (the default, and CI) everything runs on loopback and is stopped at session end. With
``AUTHMILTER_SMTP=host:port`` the tests talk to a set-up started elsewhere (docker) instead; see
README.md in this folder for the variables that set-up must provide.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from postfix import (
    AuthmilterProcess,
    HarnessError,
    LocalPostfix,
    Mta,
    PostfixInstance,
    Sender,
    Senders,
    external_hold_queue,
    read_from,
    size_of,
)
from sink import MessageStore, SinkServer

from dnsserver import AuthoritativeDns, DnsServerMissing, free_port
from signing import ed25519_key, rsa_key, zone_txt

EXTERNAL_SMTP = os.environ.get("AUTHMILTER_SMTP", "")

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
        @ TXT {zone_txt(f"v=spf1 ip4:{sender.client.address} -all")}
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
        outage=_publish(dns_server, "pf-outage.example", "reject"),
    )
    dns_server.reload()
    return published


@pytest.fixture(scope="session")
def local_postfix(tmp_path_factory: pytest.TempPathFactory) -> Generator[LocalPostfix, None, None]:
    """Sink and private Postfix (its milter port chosen now, for authmilter to bind later)."""
    if EXTERNAL_SMTP:
        pytest.skip("AUTHMILTER_SMTP is set: Postfix runs outside the tests")
    workdir = tmp_path_factory.mktemp("postfix")
    sink = SinkServer("127.0.0.1", 0, workdir / "sink")
    sink.start()
    milter_port = free_port("127.0.0.1")
    try:
        postfix = PostfixInstance(
            workdir,
            smtp_port=free_port("127.0.0.1"),
            bare_smtp_port=free_port("127.0.0.1"),
            sink_port=sink.port,
            milter=f"inet:127.0.0.1:{milter_port}",
        )
    except HarnessError as e:
        sink.stop()
        raise _fail(e) from None
    _LOGS["postfix maillog"] = postfix.log_path
    try:
        postfix.start()
        yield LocalPostfix(postfix, MessageStore(sink.store_directory), milter_port)
    except HarnessError as e:
        raise _fail(e) from None
    finally:
        postfix.stop()
        postfix.remove()
        _LOGS["postfix maillog"] = postfix.log_path
        sink.stop()


@pytest.fixture(scope="session")
def authmilter(
    local_postfix: LocalPostfix, dns_server: AuthoritativeDns, tmp_path_factory: pytest.TempPathFactory
) -> Generator[AuthmilterProcess, None, None]:
    """``authmilter run`` with 2 workers on the port Postfix's smtpd_milters names."""
    process = AuthmilterProcess(
        tmp_path_factory.mktemp("authmilter"), milter_port=local_postfix.milter_port, dns_port=dns_server.port
    )
    _LOGS["authmilter log"] = process.log_path
    try:
        process.start()
        yield process
    except HarnessError as e:
        raise _fail(e) from None
    finally:
        process.stop()


@pytest.fixture(scope="session")
def mta(request: pytest.FixtureRequest, senders: Senders) -> Mta:
    """Postfix with authmilter in front, natively or (AUTHMILTER_SMTP) as started elsewhere."""
    if EXTERNAL_SMTP:
        host, _, port = EXTERNAL_SMTP.rpartition(":")
        sink_dir = os.environ.get("AUTHMILTER_SINK_DIR")
        postqueue_prefix = os.environ.get("AUTHMILTER_POSTFIX_EXEC")
        if not sink_dir or not postqueue_prefix:
            raise _fail(
                RuntimeError("AUTHMILTER_SMTP needs AUTHMILTER_SINK_DIR and AUTHMILTER_POSTFIX_EXEC too")
            )
        return Mta(host, int(port), MessageStore(Path(sink_dir)), external_hold_queue(postqueue_prefix))
    local: LocalPostfix = request.getfixturevalue("local_postfix")
    request.getfixturevalue("authmilter")
    postfix = local.postfix
    return Mta(postfix.host, postfix.smtp_port, local.sink, postfix.hold_queue())


@pytest.fixture
def milter_process(request: pytest.FixtureRequest, mta: Mta) -> AuthmilterProcess:
    """The local authmilter, for tests that signal it (not reachable in an external set-up)."""
    if EXTERNAL_SMTP:
        pytest.skip("AUTHMILTER_SMTP is set: the authmilter process is not ours to signal")
    process: AuthmilterProcess = request.getfixturevalue("authmilter")
    return process


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

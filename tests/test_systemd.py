"""systemd/authmilter.service and authmilter.sysusers: systemd's own checkers accept them, the
hardening is there, and MemoryDenyWriteExecute does not break the crypto we run.

Needs systemd-analyze and systemd-sysusers (Debian package ``systemd``); systemd itself need not
run: ``systemd-analyze verify`` and ``security --offline`` only read files.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from authmilter import cli
from authmilter.config import load_config

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "authmilter.service"
SYSUSERS = ROOT / "systemd" / "authmilter.sysusers"
CONFIG = ROOT / "conf" / "authmilter.toml"
# `systemd-analyze security` exposure, in tenths (0 = fully locked down, 100 = unprotected).
MAX_EXPOSURE_TENTHS = 20


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install the Debian package 'systemd' (apt-get install systemd)"
    return path


def service_settings(text: str) -> dict[str, list[str]]:
    """The [Service] section as key -> values (a key may repeat; an empty value resets)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verifiable_copy(tmp_path: Path, text: str, name: str = "authmilter.service") -> Path:
    """The unit with only ExecStart's program swapped for an executable that exists here:
    `verify` insists the program exists, and authmilter is not installed in /opt on a test box."""
    program = tmp_path / "authmilter"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    lines = []
    for line in text.splitlines():
        if line.startswith(("ExecStart=", "ExecReload=")):
            key, arguments = line.split(" ", 1)
            line = f"{key.split('=')[0]}={program} {arguments}"
        lines.append(line)
    unit = tmp_path / name
    unit.write_text("\n".join(lines) + "\n")
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    result = verify(verifiable_copy(tmp_path, UNIT.read_text()))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # verify exits 0 for unknown keys: only its output shows them, which the test above demands empty.
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomeDir=yes")
    result = verify(verifiable_copy(tmp_path, broken))
    assert "Unknown key" in result.stdout + result.stderr


def test_hardening_and_lifecycle_settings() -> None:
    settings = service_settings(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "authmilter",
        "ExecReload": "/opt/authmilter/bin/authmilter reload --config /etc/authmilter/authmilter.toml "
        "--pid $MAINPID",
        "KillMode": "mixed",
        "Restart": "on-failure",
        "RuntimeDirectory": "authmilter",
        "StateDirectory": "authmilter",
        "UMask": "0007",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
    }
    actual = {key: settings.get(key, ["<missing>"])[-1] for key in expected}
    assert actual == expected
    assert "DynamicUser" not in settings


def test_exec_start_runs_the_daemon_with_the_etc_config() -> None:
    (exec_start,) = service_settings(UNIT.read_text())["ExecStart"]
    program, *arguments = exec_start.split()
    assert Path(program).is_absolute() and Path(program).name == "authmilter"
    assert arguments == ["run", "--config", "/etc/authmilter/authmilter.toml"]


def test_exec_reload_waits_for_the_daemons_outcome() -> None:
    """`kill -HUP` reports success before the daemon has even read its config (systemd 252)."""
    settings = service_settings(UNIT.read_text())
    (exec_reload,) = settings["ExecReload"]
    program, *arguments = exec_reload.split()
    assert program == settings["ExecStart"][0].split()[0]
    args = cli.parse_args([a.replace("$MAINPID", "4242") for a in arguments])
    assert (args.command, args.pid) == ("reload", 4242)
    assert str(args.config) == settings["ExecStart"][0].split()[-1], "the daemon's own config"
    assert args.timeout <= 90, "within systemd's default reload timeout (TimeoutStartSec=90s)"
    # The status file `reload` reads is in the runtime directory systemd creates and names.
    assert settings["RuntimeDirectory"] == ["authmilter"]
    assert load_config(CONFIG).milter.status_file == ""
    assert "Type=notify-reload" in UNIT.read_text(), "the systemd >= 253 alternative is noted"


def test_stop_timeout_outlasts_the_shutdown_timeout() -> None:
    # systemd must not SIGKILL workers still finishing messages within [milter] shutdown_timeout.
    (stop,) = service_settings(UNIT.read_text())["TimeoutStopSec"]
    assert stop.endswith("s") and stop[:-1].isdigit()
    assert int(stop[:-1]) > load_config(CONFIG).milter.shutdown_timeout + 5


def test_exposure_is_low(tmp_path: Path) -> None:
    assert_low_exposure(verifiable_copy(tmp_path, UNIT.read_text()))


def assert_low_exposure(unit: Path) -> None:
    """systemd-analyze security rates the unit at most MAX_EXPOSURE_TENTHS / 10."""
    result = subprocess.run(
        [
            tool("systemd-analyze"),
            "security",
            "--offline=yes",
            f"--threshold={MAX_EXPOSURE_TENTHS}",
            "--no-pager",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    summary = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    assert result.returncode == 0, f"exposure above {MAX_EXPOSURE_TENTHS / 10}: {summary}"


def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [tool("systemd-sysusers"), f"--root={tmp_path}", "-"],
        input=SYSUSERS.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    entries = [line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()]
    (user,) = [e for e in entries if e[0] == service_settings(UNIT.read_text())["User"][0]]
    assert int(user[2]) < 1000, "not a system user"
    assert user[5:] == ["/var/lib/authmilter", "/usr/sbin/nologin"]


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

UNDER_MDWE = textwrap.dedent(
    f"""
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_MDWE) failed: errno %d" % ctypes.get_errno())
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X mapping allowed: MDWE is not in force")
    except OSError:
        pass
    import Milter, nacl.signing, cryptography.hazmat.primitives.asymmetric.rsa  # noqa
    import pytest
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
    """
)


def mdwe_supported() -> bool:
    # The kernel's memory-deny-write-execute (Linux 6.3) refuses what systemd's
    # MemoryDenyWriteExecute= refuses through seccomp: W+X mappings and making memory executable.
    code = """import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
sys.exit(0 if libc.prctl(65, 1, 0, 0, 0) == 0 else ctypes.get_errno())"""
    result = subprocess.run([sys.executable, "-c", code], check=False, timeout=30)
    if result.returncode not in (0, errno.EINVAL):
        pytest.fail(f"prctl(PR_SET_MDWE) failed unexpectedly: errno {result.returncode}")
    return result.returncode == 0


def test_crypto_and_pipeline_work_without_writable_executable_memory() -> None:
    if not mdwe_supported():
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3): cannot emulate MemoryDenyWriteExecute")
    tests = ["tests/test_dkim_verify.py", "tests/test_dkim_rsa.py", "tests/test_pipeline.py"]
    result = subprocess.run(
        [sys.executable, "-c", UNDER_MDWE, *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed" in result.stdout

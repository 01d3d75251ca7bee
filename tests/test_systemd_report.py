"""systemd/authmilter-report.service and .timer: systemd's checker accepts them, the timer runs the
service hourly, and the service imports then sends as the daemon's user, hardened like the daemon."""

from __future__ import annotations

import subprocess
from pathlib import Path

from test_systemd import ROOT, assert_low_exposure, service_settings, tool, verifiable_copy

SERVICE = ROOT / "systemd" / "authmilter-report.service"
TIMER = ROOT / "systemd" / "authmilter-report.timer"
DAEMON = ROOT / "systemd" / "authmilter.service"


def section(text: str, name: str) -> dict[str, str]:
    values: dict[str, str] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            current = line
        elif current == name and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    service = verifiable_copy(tmp_path, SERVICE.read_text(), name=SERVICE.name)
    timer = tmp_path / TIMER.name
    timer.write_text(TIMER.read_text())
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", str(service), str(timer)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


def test_the_service_imports_then_sends_with_the_etc_config() -> None:
    settings = service_settings(SERVICE.read_text())
    assert settings["Type"] == ["oneshot"]
    commands = [line.split()[1:] for line in settings["ExecStart"]]
    config = ["--config", "/etc/authmilter/authmilter.toml"]
    assert commands == [["report", "import", *config], ["report", "send", *config]]


def test_the_service_runs_as_the_daemon_with_its_state_and_hardening() -> None:
    daemon = service_settings(DAEMON.read_text())
    report = service_settings(SERVICE.read_text())
    shared = [
        "User", "Group", "StateDirectory", "UMask", "ProtectSystem", "ProtectHome", "NoNewPrivileges",
        "CapabilityBoundingSet", "RestrictAddressFamilies", "MemoryDenyWriteExecute", "SystemCallFilter",
    ]  # fmt: skip
    assert {key: report.get(key) for key in shared} == {key: daemon.get(key) for key in shared}


def test_the_timer_runs_hourly_and_catches_up_after_downtime() -> None:
    timer = section(TIMER.read_text(), "[Timer]")
    assert timer["OnCalendar"] == "hourly"
    assert timer["Persistent"] == "yes"
    assert "Unit" not in timer  # the service of the same name
    assert section(TIMER.read_text(), "[Install]")["WantedBy"] == "timers.target"


def test_exposure_is_low(tmp_path: Path) -> None:
    assert_low_exposure(verifiable_copy(tmp_path, SERVICE.read_text(), name=SERVICE.name))

"""`authmilter checkconf` finds what `run` would fail on, as the daemon's user; `genkey --owner`.

The tests that check as another user need root (they run `checkconf --user nobody`); the files
they use live in a directory everyone may enter, as /etc/authmilter is.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from authmilter import cli
from authmilter.cli import main

NOBODY = "nobody"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user needs root")


@pytest.fixture(autouse=True)
def no_unit_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --user, checkconf as root checks as the unit's user, should this machine have one."""
    monkeypatch.setattr(cli, "UNIT_USER", "no-such-user-authmilter-tests")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user can enter and read (pytest's tmp_path is root's own, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="authmilter-checkconf-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def write_config(directory: Path, text: str) -> Path:
    config = directory / "authmilter.toml"
    config.write_text(text)
    config.chmod(0o644)
    return config


def signing_config(directory: Path, key: Path) -> Path:
    (directory / "KeyTable").write_text(f"k1 example.com:s1:{key}\n")
    (directory / "SigningTable").write_text("*@example.com k1\n")
    return write_config(
        directory, '[signing]\nkey_table = "KeyTable"\nsigning_table = "refile:SigningTable"\n'
    )


def genkey(directory: Path, *owner: str) -> Path:
    args = ["genkey", "--domain", "example.com", "--selector", "s1", "--dir", str(directory), *owner]
    assert main(args) == 0
    return directory / "s1.private"


@needs_root
def test_a_key_only_root_can_read_fails_for_the_daemons_user_with_a_chown_hint(
    open_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = genkey(open_dir)  # root:root 0600, as genkey wrote it before --owner
    config = signing_config(open_dir, key)
    capsys.readouterr()
    assert main(["checkconf", "--config", str(config), "--user", "root"]) == 0
    assert main(["checkconf", "--config", str(config), "--user", NOBODY]) == 1
    error = capsys.readouterr().err
    assert f"{config}:2: [signing] key_table" in error
    assert f"cannot read the key file: Permission denied: the milter runs as {NOBODY}" in error
    assert f"chown {NOBODY} {key}" in error and f"genkey --owner {NOBODY}" in error


@needs_root
def test_genkey_owner_gives_the_key_to_the_daemons_user(
    open_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = genkey(open_dir, "--owner", NOBODY)
    nobody = pwd.getpwnam(NOBODY)
    info = key.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (nobody.pw_uid, nobody.pw_gid, 0o600)
    assert f"mode 0600, owner {NOBODY}:" in capsys.readouterr().out
    config = signing_config(open_dir, key)
    assert main(["checkconf", "--config", str(config), "--user", NOBODY]) == 0
    assert f"{config}: OK (checked as user {NOBODY})" in capsys.readouterr().out


def test_genkey_owner_must_name_a_user(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["genkey", "--domain", "x.example", "--selector", "s", "--owner", "no-such-user-x"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.parse_args(["genkey", "--domain", "x.example", "--selector", "s", "--owner", "root:no-such-grp"])


@needs_root
def test_as_root_checkconf_checks_as_the_units_user_by_default(
    open_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "UNIT_USER", NOBODY)
    config = signing_config(open_dir, genkey(open_dir))
    capsys.readouterr()
    assert main(["checkconf", "--config", str(config)]) == 1
    assert f"chown {NOBODY}" in capsys.readouterr().err


def test_a_missing_socket_directory_and_an_unknown_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path,
        f'[milter]\nsocket = "unix:{tmp_path}/missing/sock"\nsocket_group = "no-such-group-x"\n',
    )
    assert main(["checkconf", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert f"{config}:2: [milter] socket: the directory {tmp_path}/missing does not exist" in error
    assert f"{config}:3: [milter] socket_group: no group named 'no-such-group-x'" in error


@needs_root
def test_a_socket_directory_the_user_cannot_write(open_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (open_dir / "run").mkdir(mode=0o755)
    config = write_config(open_dir, f'[milter]\nsocket = "unix:{open_dir}/run/sock"\n')
    assert main(["checkconf", "--config", str(config), "--user", NOBODY]) == 1
    assert f"{NOBODY} cannot create the socket in {open_dir}/run" in capsys.readouterr().err


def test_a_status_file_in_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, f'[milter]\nstatus_file = "{tmp_path}/run/status"\n')
    assert main(["checkconf", "--config", str(config)]) == 1
    user = pwd.getpwuid(os.geteuid()).pw_name
    error = capsys.readouterr().err
    assert f"{config}:2: [milter] status_file: {user} cannot write in {tmp_path}/run" in error


def test_a_missing_history_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, f'[history]\npath = "{tmp_path}/state/history.jsonl"\n')
    assert main(["checkconf", "--config", str(config)]) == 1
    assert f"{config}:2: [history] path: the directory {tmp_path}/state does not exist" in (
        capsys.readouterr().err
    )
    (tmp_path / "state").mkdir()
    assert main(["checkconf", "--config", str(config)]) == 0


@needs_root
def test_a_history_directory_the_user_cannot_write(
    open_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (open_dir / "state").mkdir(mode=0o755)
    config = write_config(open_dir, f'[history]\npath = "{open_dir}/state/history.jsonl"\n')
    assert main(["checkconf", "--config", str(config), "--user", NOBODY]) == 1
    assert f"{NOBODY} cannot create history.jsonl in {open_dir}/state" in capsys.readouterr().err
    os.chown(open_dir / "state", pwd.getpwnam(NOBODY).pw_uid, -1)
    assert main(["checkconf", "--config", str(config), "--user", NOBODY]) == 0


def test_nameservers_with_a_port_load_and_a_host_name_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_config(tmp_path, '[dns]\nnameservers = ["127.0.0.1:21053", "[::1]:21053"]\n')
    assert main(["checkconf", "--config", str(good)]) == 0
    bad = write_config(tmp_path, '[dns]\nnameservers = ["ns1.example.net"]\n')
    capsys.readouterr()
    assert main(["checkconf", "--config", str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}:2: [dns] nameservers: 'ns1.example.net' is not an IP address" in captured.err
    assert "Traceback" not in captured.err


def test_json_prints_only_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, '[milter]\nauthserv_id = "mx.example"\n')
    assert main(["checkconf", "--config", str(config), "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["milter"]["authserv_id"] == "mx.example"


def test_a_toml_syntax_error_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, '[milter]\nworkers = 2\nworkers = 3\n')
    assert main(["checkconf", "--config", str(config), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"authmilter: {config}:3: TOML syntax error: Cannot overwrite a value")

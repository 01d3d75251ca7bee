"""What ``authmilter run`` needs beyond a valid config, checked by ``authmilter checkconf``.

Loading the config already reads every table, key and dataset; building the resolver reads the
zone files. What is left fails only when the daemon starts or writes: the socket's directory and
group, and the history file's directory. Each problem names the setting (file:line) and what to
do. The checks run as the process's own user: checkconf calls them after taking the daemon's
user (``--user``), so "readable" and "writable" mean readable and writable for the daemon.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

from authmilter.config import Config, setting_location
from authmilter.keys import effective_user
from authmilter.resolver import ZoneFileError, build_resolver
from authmilter.supervisor import StartupError, socket_address

# Ports below this need CAP_NET_BIND_SERVICE, which the unit's empty CapabilityBoundingSet withholds.
FIRST_UNPRIVILEGED_PORT = 1024


def problems(config: Config) -> list[str]:
    """Every problem ``run`` would meet with this config, as the current user; empty when none."""
    found = _dns_problems(config)
    found += _socket_problems(config)
    found += _history_problems(config)
    found += _status_file_problems(config)
    return found


def _at(config: Config, section: str, key: str, problem: str) -> str:
    return f"{setting_location(config.path, section, key)}: [{section}] {key}: {problem}"


def _dns_problems(config: Config) -> list[str]:
    try:
        build_resolver(config.dns)
    except ZoneFileError as e:
        return [_at(config, "dns", "zone_files", str(e))]
    return []


def _socket_problems(config: Config) -> list[str]:
    settings = config.milter
    try:
        _, address = socket_address(settings.socket)
    except StartupError as e:
        return [_at(config, "milter", "socket", str(e))]
    if not isinstance(address, str):
        if address[1] < FIRST_UNPRIVILEGED_PORT and os.geteuid() != 0:
            problem = (
                f"port {address[1]} needs root; {effective_user()} cannot bind it: "
                f"choose a port from {FIRST_UNPRIVILEGED_PORT} up"
            )
            return [_at(config, "milter", "socket", problem)]
        return []
    found = []
    directory = Path(address).parent
    user = effective_user()
    if not directory.is_dir():
        problem = (
            f"the directory {directory} does not exist: create it (install -d -o {user} -m 0750 "
            f"{directory}), or use /run/authmilter, which the systemd unit creates (RuntimeDirectory=)"
        )
        found.append(_at(config, "milter", "socket", problem))
    elif not os.access(directory, os.W_OK | os.X_OK):
        problem = f"{user} cannot create the socket in {directory}: chown {user} {directory}"
        found.append(_at(config, "milter", "socket", problem))
    if settings.socket_group:
        found += _group_problems(config, settings.socket_group)
    return found


def _group_problems(config: Config, name: str) -> list[str]:
    try:
        group = grp.getgrnam(name)
    except KeyError:
        return [_at(config, "milter", "socket_group", f"no group named '{name}'")]
    if os.geteuid() == 0 or group.gr_gid in (os.getegid(), *os.getgroups()):
        return []
    user = effective_user()
    problem = (
        f"{user} is not in group {name}, so it cannot give the socket to it: "
        f"usermod -a -G {name} {user}, or SupplementaryGroups={name} in the unit's drop-in "
        "(a drop-in is not seen here)"
    )
    return [_at(config, "milter", "socket_group", problem)]


def _history_problems(config: Config) -> list[str]:
    if not config.history.path:
        return []
    path = Path(config.history.path)
    user = effective_user()
    if not path.parent.is_dir():
        problem = (
            f"the directory {path.parent} does not exist: create it (install -d -o {user} -m 0750 "
            f"{path.parent}), or use /var/lib/authmilter, which the systemd unit creates (StateDirectory=)"
        )
        return [_at(config, "history", "path", problem)]
    if path.exists():
        if not os.access(path, os.W_OK):
            return [_at(config, "history", "path", f"{user} cannot write {path}: chown {user} {path}")]
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        problem = f"{user} cannot create {path.name} in {path.parent}: chown {user} {path.parent}"
        return [_at(config, "history", "path", problem)]
    return []


def _status_file_problems(config: Config) -> list[str]:
    """The file `authmilter reload` reads: replaced by rename, so its directory must be writable."""
    if not config.milter.status_file:
        return []
    directory = Path(config.milter.status_file).parent
    if os.access(directory, os.W_OK | os.X_OK):
        return []
    user = effective_user()
    problem = (
        f"{user} cannot write in {directory}: create it, owned by {user} (install -d -o {user} {directory})"
    )
    return [_at(config, "milter", "status_file", problem)]

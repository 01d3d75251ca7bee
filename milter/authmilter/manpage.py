"""authmilter(8), generated: ``python -m authmilter.manpage > docs/authmilter.8`` (``make man``).

Built from the two places the facts live, so the page cannot drift from them: the command line
from cli's argparse parser (every command, its description and options), the settings from the
packaged default config (conf/authmilter.toml: every key, its default and its comment).
tests/test_manpage.py checks that docs/authmilter.8 is what this module makes now.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from authmilter import __version__
from authmilter.cli import DEFAULT_CONFIG, _parser
from authmilter.config import packaged_config_path

_SECTION = re.compile(r"^\[([a-z_]+)\]$")
# A key, or a key shown in a comment only because it has no default ("# psl_file = ...").
_KEY = re.compile(r"^(#\s*)?([a-z_]+) = (.*)$")


@dataclass(frozen=True)
class Setting:
    """One key of the default config: its section, name, value as written, and its comment."""

    section: str
    key: str
    value: str
    comment: str
    unset: bool


def roff_text(text: str) -> str:
    """Plain text as roff: backslashes escaped, no line taken for a request, hyphens literal."""
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    # groff reads its input as Latin-1 (-Tutf8 is the output): other characters as \[uXXXX].
    escaped = "".join(c if c.isascii() else f"\\[u{ord(c):04X}]" for c in escaped)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in escaped.splitlines())


def read_settings(text: str) -> tuple[str, list[Setting]]:
    """The config file's opening comment, and every key with the comment above it.

    Args:
        text: the default config (TOML with ``#`` comments above each key).

    Returns:
        The opening comment, and the settings in file order.
    """
    opening: list[str] = []
    settings: list[Setting] = []
    section = ""
    comment: list[str] = []
    assigned = _assigned_keys(text)
    for line in text.splitlines():
        stripped = line.strip()
        header = _SECTION.match(stripped)
        key = _KEY.match(stripped)
        if key and key.group(1) and (section, key.group(2)) in assigned:
            key = None  # an example inside a key's comment, not a key without a default
        if header:
            section, comment = header.group(1), []
        elif key and section:
            unset = bool(key.group(1))
            settings.append(Setting(section, key.group(2), key.group(3), " ".join(comment), unset))
            comment = []
        elif stripped.startswith("#"):
            (comment if section else opening).append(stripped.lstrip("#").strip())
    return " ".join(opening), settings


def _assigned_keys(text: str) -> set[tuple[str, str]]:
    section = ""
    assigned = set()
    for line in text.splitlines():
        header, key = _SECTION.match(line.strip()), _KEY.match(line.strip())
        if header:
            section = header.group(1)
        elif key and not key.group(1):
            assigned.add((section, key.group(2)))
    return assigned


_Command = tuple[str, str, argparse.ArgumentParser]


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[_Command]:
    """(command line, one-line help, parser) of every command, nested ones (``keys test``) too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", helps.get(name, ""), sub
                yield from _commands(sub, f"{prefix} {name}")


def _options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        value = f"\\fI{roff_text(_metavar(action))}\\fR"
        if action.option_strings:
            names = ", ".join(f"\\fB{roff_text(option)}\\fR" for option in action.option_strings)
            yield f".TP\n{names}" + ("" if action.nargs == 0 else " " + value)
        else:
            yield f".TP\n{value}"
        yield roff_text(action.help or "")


def _metavar(action: argparse.Action) -> str:
    metavar = action.metavar
    return metavar if isinstance(metavar, str) else action.dest.upper()


def render() -> str:
    """The whole page, in roff (man macros).

    Returns:
        The page text, ending in a newline.
    """
    parser = _parser()
    opening, settings = read_settings(packaged_config_path().read_text(encoding="utf-8"))
    commands = list(_commands(parser, "authmilter"))
    lines = [
        f'.TH AUTHMILTER 8 "" "authmilter {__version__}" "System Manager\'s Manual"',
        ".SH NAME",
        f"authmilter \\- {roff_text(parser.description or '')}",
        ".SH SYNOPSIS",
        *(f".B {command}\n.RI [ options ]\n.br" for command, _, sub in commands if not _has_commands(sub)),
        ".B authmilter\n.RB [ \\-\\-version | \\-\\-print\\-default\\-config ]",
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for command, summary, sub in commands:
        lines += [f'.SS "{roff_text(command)}"', roff_text(sub.description or summary), *_options(sub)]
    lines += [
        ".SH CONFIGURATION",
        roff_text(opening),
        "Without \\fB\\-\\-config\\fR, \\fBrun\\fR and \\fBcheckconf\\fR read "
        f"\\fI{roff_text(str(DEFAULT_CONFIG))}\\fR, or, when it does not exist, the packaged default "
        "that \\fB\\-\\-print\\-default\\-config\\fR prints. The keys, with their defaults:",
    ]
    section = ""
    for setting in settings:
        if setting.section != section:
            section = setting.section
            lines.append(f'.SS "[{section}]"')
        default = "not set by default, e.g. " if setting.unset else ""
        lines += [
            f".TP\n\\fB{roff_text(setting.key)}\\fR = {default}{roff_text(setting.value)}",
            roff_text(setting.comment),
        ]
    lines += [
        ".SH FILES",
        f".TP\n.I {roff_text(str(DEFAULT_CONFIG))}",
        "the configuration read by \\fBrun\\fR and \\fBcheckconf\\fR",
        ".SH SEE ALSO",
        ".BR postconf (5),",
        ".BR opendkim.conf (5),",
        ".BR opendmarc.conf (5);",
        "docs/deploy.md and docs/history\\-schema.md in the source.",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def _has_commands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(action, argparse._SubParsersAction) for action in parser._actions)


if __name__ == "__main__":
    sys.stdout.write(render())

"""authmilter(8): generated from the parser and the default config (manpage.py), and kept current."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from authmilter.cli import _parser
from authmilter.config import SECTIONS, default_config
from authmilter.manpage import read_settings, render, roff_text

PAGE = Path(__file__).resolve().parents[1] / "docs" / "authmilter.8"


def test_the_page_in_docs_is_the_generated_one() -> None:
    assert PAGE.read_text() == render(), "docs/authmilter.8 is stale: run `make man`"


def test_every_command_and_option_is_on_the_page() -> None:
    page = render()
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, command in commands.items():
        assert f'.SS "authmilter {name}"' in page
        for action in command._actions:
            for option in action.option_strings:
                if option in ("-h", "--help"):
                    continue
                assert f"\\fB{roff_text(option)}\\fR" in page, f"{name} {option}"
    assert '.SS "authmilter keys test"' in page and "\\fB\\-\\-key\\-table\\fR" in page
    assert "\\fB\\-\\-print\\-default\\-config\\fR" in page


def test_every_config_key_is_on_the_page_under_its_section() -> None:
    page = render()
    config = default_config()
    for section in SECTIONS:
        start = page.index(f'.SS "[{section}]"')
        end = page.find(".SS", start + 1)
        for field in dataclasses.fields(getattr(config, section)):
            assert f"\\fB{roff_text(field.name)}\\fR = " in page[start:end], f"[{section}] {field.name}"


def test_keys_and_their_comments_are_read_from_the_config() -> None:
    opening, settings = read_settings(
        "# top\n[milter]\n# Where.\n# e.g. socket = 'unix:/x'\nsocket = 'inet:1@h'\n[dmarc]\n# A file.\n"
        "# psl_file = '/p.dat'\n"
    )
    assert opening == "top"
    assert [(s.section, s.key, s.value, s.comment, s.unset) for s in settings] == [
        ("milter", "socket", "'inet:1@h'", "Where. e.g. socket = 'unix:/x'", False),
        ("dmarc", "psl_file", "'/p.dat'", "A file.", True),
    ]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff-base is installed by `make deps`")
def test_the_page_renders_without_warnings() -> None:
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stderr == ""
    shown = subprocess.run(
        ["man", "-l", str(PAGE)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "200"},
    ).stdout
    assert "authmilter keys test" in shown and "remove_authserv_ids" in shown


def test_text_outside_ascii_is_escaped_for_groff() -> None:
    # groff reads Latin-1: a UTF-8 "…" from a config comment would be three invalid input characters.
    assert roff_text("3600 … 43200") == "3600 \\[u2026] 43200"

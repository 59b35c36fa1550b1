"""The shell's command syntax and its placeholder entry point."""

from __future__ import annotations

import pytest

import minisgl.shell
from minisgl.shell.repl import COMMANDS, NOT_READY, help_text, main, parse_command


def test_version() -> None:
    assert minisgl.shell.__version__ == "0.1.0"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/help", ("help", "")),
        ("/reset", ("reset", "")),
        ("/exit", ("exit", "")),
        ("  /EXIT  \n", ("exit", "")),
        ("/quit", ("exit", "")),
        ("/?", ("help", "")),
        ("/reset now please", ("reset", "now please")),
        ("/frobnicate 3", ("unknown", "/frobnicate")),
        ("/", ("unknown", "/")),
        ("What is the capital of France?", ("text", "What is the capital of France?")),
        ("  hello  ", ("text", "hello")),
        ("//etc/hosts is a file", ("text", "/etc/hosts is a file")),
        ("", ("empty", "")),
        (" \t ", ("empty", "")),
    ],
)
def test_parse_command(line: str, expected: tuple[str, str]) -> None:
    assert parse_command(line) == expected


def test_help_lists_every_command() -> None:
    text = help_text()
    for name, summary in COMMANDS.items():
        assert f"/{name}" in text
        assert summary in text
        assert parse_command(f"/{name}") == (name, "")


def test_main_says_not_ready(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert NOT_READY in capsys.readouterr().err

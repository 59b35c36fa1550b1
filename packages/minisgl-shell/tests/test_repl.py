"""The shell: command syntax, and the REPL loop over a fake backend (no engine)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest

import minisgl.shell
from minisgl.shell.client import ChatSettings, EngineLost, ShellError
from minisgl.shell.repl import COMMANDS, Repl, build_parser, help_text, parse_command


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


class FakeBackend:
    """Replies "echo: <last user message>" in pieces; records every conversation it was sent."""

    name = "fake"

    def __init__(self, fail: Exception | None = None, hang_on: str | None = None) -> None:
        self.seen: list[list[dict[str, str]]] = []
        self.fail = fail
        self.hang_on = hang_on

    async def start(self) -> None:
        pass

    async def stream_chat(self, messages: list[dict[str, str]], settings: ChatSettings) -> AsyncIterator[str]:
        self.seen.append(messages)
        if self.fail is not None:
            raise self.fail
        text = messages[-1]["content"]
        yield "echo: "
        if text == self.hang_on:
            await asyncio.sleep(3600)
        yield text

    async def close(self) -> None:
        pass


def run_lines(backend: Any, lines: list[str], system: str | None = None) -> tuple[int, str]:
    out = io.StringIO()
    pending = list(lines)

    async def read() -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    status = asyncio.run(Repl(backend, ChatSettings(), system, out).run(read))
    return status, out.getvalue()


def test_two_turns_keep_the_conversation_and_reset_forgets_it() -> None:
    backend = FakeBackend()
    status, out = run_lines(backend, ["first", "second", "/reset", "third", "/exit", "never read"])
    assert status == 0
    assert "echo: first\n" in out and "echo: second\n" in out and "(conversation reset)" in out
    assert backend.seen[1] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "echo: first"},
        {"role": "user", "content": "second"},
    ]
    assert backend.seen[2] == [{"role": "user", "content": "third"}]


def test_system_message_starts_every_conversation() -> None:
    backend = FakeBackend()
    run_lines(backend, ["hi"], system="be brief")
    assert backend.seen[0][0] == {"role": "system", "content": "be brief"}


def test_unknown_command_prints_help_and_goes_on() -> None:
    status, out = run_lines(FakeBackend(), ["/frobnicate now", "/help", "", "hello"])
    assert status == 0  # end of input leaves like /exit
    assert "unknown command /frobnicate" in out
    assert out.count(help_text()) == 2 and "echo: hello" in out


def test_a_failed_reply_is_reported_and_the_shell_goes_on() -> None:
    status, out = run_lines(FakeBackend(fail=ShellError("HTTP 400: too long")), ["hi", "/exit"])
    assert status == 0 and "error: HTTP 400: too long" in out


def test_a_lost_engine_ends_the_shell() -> None:
    status, out = run_lines(FakeBackend(fail=EngineLost("scheduler died")), ["hi", "never"])
    assert status == 1 and "error: scheduler died" in out


def test_an_interrupted_reply_is_forgotten() -> None:
    backend = FakeBackend(hang_on="long story")
    out = io.StringIO()
    repl = Repl(backend, ChatSettings(), None, out)

    async def scenario() -> None:
        turn = asyncio.ensure_future(repl.turn("long story"))
        while "echo: " not in out.getvalue():
            await asyncio.sleep(0.01)
        # What Ctrl-C does: the SIGINT handler cancels the task that streams the reply.
        streaming = [t for t in asyncio.all_tasks() if t is not turn and t is not asyncio.current_task()]
        for task in streaming:
            task.cancel()
        await turn
        await repl.turn("short")

    asyncio.run(scenario())
    assert "(interrupted)" in out.getvalue()
    assert backend.seen[-1] == [{"role": "user", "content": "short"}]
    assert repl.history == [
        {"role": "user", "content": "short"},
        {"role": "assistant", "content": "echo: short"},
    ]


def test_parser_has_chat_and_engine_flags() -> None:
    text = build_parser().format_help()
    for flag in (
        "--url",
        "--max-tokens",
        "--temperature",
        "--system",
        "--model",
        "--device",
        "--max-running-requests",
    ):
        assert flag in text
    options = build_parser().parse_args(["--url", "http://x:1", "--temperature", "0"])
    assert (options.url, options.temperature, options.log_file) == ("http://x:1", 0.0, None)


@pytest.mark.parametrize(
    ("argv", "flag"), [(["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p")]
)
def test_bad_sampling_options_name_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from minisgl.shell.repl import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--url", "http://127.0.0.1:9", *argv])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_the_url_shell_survives_a_server_restart_with_its_conversation() -> None:
    import json

    import httpx

    from minisgl.shell.client import RemoteBackend

    chats: list[list[dict[str, str]]] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        chats.append(json.loads(request.content)["messages"])
        if len(chats) == 2:
            raise httpx.ConnectError("connection refused")  # the server is restarting
        chunk = {"choices": [{"index": 0, "delta": {"content": f"reply {len(chats)}"}}]}
        return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n")

    async def scenario() -> tuple[int, str]:
        backend = RemoteBackend("http://server", transport=httpx.MockTransport(server))
        await backend.start()
        out = io.StringIO()
        pending = ["first", "second", "second again"]

        async def read() -> str:
            if not pending:
                raise EOFError
            return pending.pop(0)

        try:
            return await Repl(backend, ChatSettings(), None, out).run(read), out.getvalue()
        finally:
            await backend.close()

    status, out = asyncio.run(scenario())
    assert status == 0 and "lost the connection to http://server" in out and "reply 3" in out
    assert chats[2] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply 1"},
        {"role": "user", "content": "second again"},
    ]


def test_every_engine_option_is_a_shell_flag() -> None:
    import dataclasses

    from minisgl.core.engine_config import EngineConfig

    dests = {action.dest for action in build_parser()._actions}
    assert {declared.name for declared in dataclasses.fields(EngineConfig)} <= dests
    options = build_parser().parse_args(["--tp", "2", "--no-mixed-batches", "--kv-cache-dtype", "fp8_e4m3"])
    assert (options.tp_size, options.mix_decode_into_prefill, options.kv_cache_dtype) == (
        2,
        False,
        "fp8_e4m3",
    )


def test_redirected_stderr_takes_child_processes_output(tmp_path: Any) -> None:
    """After redirect_stderr, what this process and the processes it starts write to stderr (logging,
    warnings, native code) goes to the file; the returned stream still reaches the terminal's stderr."""
    import subprocess
    import sys

    log = tmp_path / "engine.log"
    script = f"""
import logging, subprocess, sys, warnings
from pathlib import Path
from minisgl.shell.log_file import redirect_stderr
terminal = redirect_stderr(Path({str(log)!r}))
logging.basicConfig()
logging.getLogger("minisgl.core").warning("a log line")
warnings.warn("a warning")
subprocess.run([sys.executable, "-c", "import os; os.write(2, b'a child wrote this')"], check=True)
print("for the user", file=terminal)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stderr == "for the user\n"
    text = log.read_text()
    assert "a log line" in text and "a warning" in text and "a child wrote this" in text

"""The shell in a pseudo-terminal, on a local engine (the server's launch code), with the real model."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
from conftest import Server, child_pids, leftover_children, start_server, stop_cleanly, wait_until

PROMPT = "you>"  # prompt_toolkit moves the cursor over the trailing space


def spawn_shell(*args: str) -> pexpect.spawn:
    command = shutil.which("minisgl-shell") or sys.executable
    argv = list(args) if command != sys.executable else ["-m", "minisgl.shell.repl", *args]
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
    return pexpect.spawn(command, argv, env=env, encoding="utf-8", timeout=300, dimensions=(40, 200))


def chat(shell: pexpect.spawn, text: str) -> str:
    """Send one message and return what the shell printed until its next prompt (the reply)."""
    shell.sendline(text)
    shell.expect_exact("\x1b[?2004l")  # prompt_toolkit is done with the line (bracketed paste off)
    shell.expect_exact(PROMPT)
    return str(shell.before)


def exit_shell(shell: pexpect.spawn) -> None:
    """/exit, and the shell must leave with status 0."""
    shell.sendline("/exit")
    shell.expect(pexpect.EOF, timeout=60)
    shell.close()
    assert shell.exitstatus == 0, (shell.exitstatus, shell.signalstatus)


def test_shell_local_engine_in_a_terminal() -> None:
    shell = spawn_shell(
        "--device", "cpu", "--temperature", "0", "--max-tokens", "400", "--cpu-kv-cache-gib", "0.25"
    )
    try:
        shell.expect("loading smollm2-135m")  # progress while the model loads
        shell.expect("minisgl-scheduler-0 ready")
        shell.expect("chatting with smollm2-135m")
        assert "WARNING" not in shell.before and "deprecated" not in shell.before, shell.before
        shell.expect_exact(PROMPT)
        children = child_pids(shell.pid)
        assert len(children) >= 2

        shell.sendline("What is the capital of France?")
        shell.expect("Paris")
        shell.expect_exact(PROMPT)
        shell.sendline("And of Germany?")  # only answerable with the first turn in the conversation
        shell.expect("Berlin|Germany")
        shell.expect_exact(PROMPT)

        shell.sendline("/reset")
        shell.expect_exact("(conversation reset)")
        shell.expect_exact(PROMPT)
        shell.sendline("/frobnicate")
        shell.expect_exact("unknown command /frobnicate")
        shell.expect_exact("/reset")  # the help follows
        shell.expect_exact(PROMPT)

        # Ctrl-C stops a reply in progress; the shell stays and answers the next message.
        shell.sendline("Write a long story about a dragon who learns to fly.")
        shell.expect_exact("\x1b[?2004l")  # prompt_toolkit is done with the line (bracketed paste off)
        shell.expect(r"[A-Za-z]{3,}")  # the first word of the reply: it is being generated now
        shell.sendintr()
        shell.expect_exact("(interrupted)")
        shell.expect_exact(PROMPT)
        shell.sendline("What is the capital of France?")
        shell.expect("Paris")
        shell.expect_exact(PROMPT)

        exit_shell(shell)
    finally:
        shell.close(force=True)
    assert not leftover_children(children)


def test_engine_logs_go_to_a_file_not_into_replies(tiny_chat_model: Path, tmp_path: Path) -> None:
    """At --log-level info the engine logs as it loads and, once a reply is done, its activity line: every
    line lands in the log file the shell names at start, none on the terminal (at the prompt or inside the
    next reply)."""
    log_file = tmp_path / "engine.log"
    shell = spawn_shell(
        "--model", str(tiny_chat_model), "--device", "cpu", "--load-format", "dummy", "--cpu-kv-cache-gib", "0.01",
        "--log-level", "info", "--temperature", "0", "--max-tokens", "32", "--log-file", str(log_file),
    )  # fmt: skip
    terminal = io.StringIO()
    shell.logfile_read = terminal
    try:
        shell.expect_exact(f"the engine's log is {log_file}")
        shell.expect("minisgl-scheduler-0 ready")  # the loading progress still shows
        shell.expect_exact(PROMPT)
        chat(shell, "Tell me a story.")
        # The scheduler logs its activity line within its 10 s interval after the reply.
        assert wait_until(lambda: "steps in" in log_file.read_text(), 60), log_file.read_text()[-2000:]
        chat(shell, "And another one.")
        exit_shell(shell)
    finally:
        shell.close(force=True)
    assert f"loaded {tiny_chat_model}" in log_file.read_text()
    for marker in (" INFO ", " WARNING ", "minisgl.core", "minisgl.server", "steps in"):
        assert marker not in terminal.getvalue(), terminal.getvalue()


def test_shell_against_a_server(server: Server) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "minisgl.shell.repl", "--url", server.url, "--temperature", "0", "--max-tokens", "24"],
        input="What is the capital of France?\n/bogus\n/exit\n",
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "unknown command /bogus" in result.stdout


def test_the_url_shell_keeps_its_conversation_across_a_server_restart(
    tmp_path: Path, tiny_chat_model: Path
) -> None:
    """The server goes away between two messages: the shell says so and stays; once a new server is up on
    the same port, the next message carries the whole conversation (its prompt holds the first turn)."""
    options = ("--model", str(tiny_chat_model), "--load-format", "dummy", "--cpu-kv-cache-gib", "0.01", "--log-requests")  # fmt: skip
    server = start_server(tmp_path, *options)
    server.wait_ready()
    shell = spawn_shell("--url", server.url, "--temperature", "0", "--max-tokens", "8")
    try:
        shell.expect_exact(PROMPT)
        chat(shell, "first")
        stop_cleanly(server, signal.SIGTERM)
        first_prompt = prompt_tokens(server.log.read_text())
        assert "lost the connection" in chat(shell, "second")
        server = start_server(tmp_path, *options, port=server.port)
        server.wait_ready()
        chat(shell, "third")
        exit_shell(shell)
    finally:
        shell.close(force=True)
        stop_cleanly(server, signal.SIGTERM)
    assert first_prompt == [first_prompt[0]]
    (third_prompt,) = prompt_tokens(server.log.read_text())
    assert third_prompt > first_prompt[0] + 4  # "third" alone would be as long as "first"


def prompt_tokens(server_log: str) -> list[int]:
    """The prompt length of each finished request in a --log-requests server log."""
    return [int(found) for found in re.findall(r"finished \(\w+\): prompt (\d+)", server_log)]

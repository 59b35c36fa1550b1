"""The `minisgl-shell` REPL: chat with a model, the reply streamed as it is generated.

    minisgl-shell                          a local engine on the embedded model (same flags as `minisgl serve`)
    minisgl-shell --model DIR --device cpu
    minisgl-shell --url http://127.0.0.1:1919     a running server
    python -m minisgl --model M --shell           the same, as mini-sglang users type it

A line is either a slash command (`/help`, `/reset`, `/exit`) or a chat message; `//text` sends `/text` as
a message. The conversation is kept until /reset. Ctrl-C stops a reply being generated (the shell stays);
Ctrl-C at the prompt clears the line; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from minisgl.shell.client import (
    ChatBackend,
    ChatSettings,
    EngineLost,
    LocalBackend,
    RemoteBackend,
    ShellError,
)
from minisgl.shell.log_file import default_log_path, progress_on, redirect_stderr

COMMANDS: dict[str, str] = {
    "help": "show this help",
    "reset": "forget the conversation so far and start a new one",
    "exit": "leave the shell (Ctrl-D does the same)",
}
ALIASES: dict[str, str] = {"quit": "exit", "q": "exit", "h": "help", "?": "help"}


def help_text() -> str:
    """The text that `/help` prints."""
    width = max(len(name) for name in COMMANDS) + 1
    lines = ["Type a message and press Enter to chat. Commands:"]
    lines += [f"  /{name:<{width}} {summary}" for name, summary in COMMANDS.items()]
    lines.append("Start a message with // to send a literal leading slash.")
    return "\n".join(lines)


def parse_command(line: str) -> tuple[str, str]:
    """Classify one input line as (kind, argument).

    kind is a command name ("help", "reset", "exit") with the rest of the line as argument, "text" with
    the message to send, "empty" for a blank line, or "unknown" with the unrecognised command word.
    """
    stripped = line.strip()
    if not stripped:
        return "empty", ""
    if stripped.startswith("//"):
        return "text", stripped[1:]
    if not stripped.startswith("/"):
        return "text", stripped
    word, _, argument = stripped[1:].partition(" ")
    name = ALIASES.get(word.lower(), word.lower())
    if name in COMMANDS:
        return name, argument.strip()
    return "unknown", "/" + word


class Repl:
    def __init__(self, backend: ChatBackend, settings: ChatSettings, system: str | None, out: TextIO) -> None:
        self.backend = backend
        self.settings = settings
        self.system = system
        self.out = out
        self.history: list[dict[str, str]] = []

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def run(self, read_line: Callable[[], Any]) -> int:
        """Read lines until /exit or end of input; returns the exit status."""
        self.say(f"minisgl shell: chatting with {self.backend.name}. /help lists the commands.")
        while True:
            try:
                line = await read_line()
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt: a fresh line
            except EOFError:
                self.say()
                return 0
            status = await self._do(*parse_command(line))
            if status is not None:
                return status

    async def _do(self, kind: str, argument: str) -> int | None:
        """Carry out one input line; an exit status ends the shell."""
        if kind == "exit":
            return 0
        if kind == "text":
            return await self._turn_or_exit(argument)
        if kind == "reset":
            self.history.clear()
            self.say("(conversation reset)")
        elif kind == "unknown":
            self.say(f"unknown command {argument}")
        if kind in ("help", "unknown"):
            self.say(help_text())
        return None  # "empty": nothing to do

    async def _turn_or_exit(self, text: str) -> int | None:
        """One exchange; 1 (exit) when the engine is gone."""
        try:
            await self.turn(text)
        except EngineLost as exc:
            self.say(f"error: {exc}")
            return 1
        return None

    async def turn(self, text: str) -> None:
        """One exchange: stream the reply; Ctrl-C stops it and forgets this turn."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [*self.history, {"role": "user", "content": text}]
        reply: list[str] = []
        task = asyncio.ensure_future(self._stream(messages, reply))
        try:
            with _sigint_cancels(task):
                await task
        except asyncio.CancelledError:
            self.say("\n(interrupted)")
            return
        except EngineLost:
            raise
        except ShellError as exc:
            self.say(f"\nerror: {exc}")
            return
        self.say()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]

    async def _stream(self, messages: list[dict[str, str]], reply: list[str]) -> None:
        async for piece in self.backend.stream_chat(messages, self.settings):
            reply.append(piece)
            self.out.write(piece)
            self.out.flush()


@contextlib.contextmanager
def _sigint_cancels(task: asyncio.Future[Any]) -> Iterator[None]:
    """Ctrl-C cancels the task while the block runs (where this thread can handle signals)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, task.cancel)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _line_reader(interactive: bool) -> Callable[[], Any]:
    """prompt_toolkit on a terminal (history, editing); plain lines from a pipe."""
    if interactive:
        from prompt_toolkit import PromptSession

        session: PromptSession[str] = PromptSession()

        def prompt() -> Any:
            return session.prompt_async("you> ")

        return prompt

    async def read() -> str:
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if not line:
            raise EOFError
        return line

    return read


def build_parser() -> argparse.ArgumentParser:
    from minisgl.server.args import add_engine_arguments, int_at_least

    parser = argparse.ArgumentParser(
        prog="minisgl-shell",
        description="Chat with a model in the terminal: a local engine, or a running server with --url.",
    )
    chat = parser.add_argument_group("chat")
    chat.add_argument("--url", default=None, help="use a running server (e.g. http://127.0.0.1:1919)")
    chat.add_argument("--api-key", default=None, help="the server's API key, with --url")
    chat.add_argument("--max-tokens", type=int_at_least(1), default=512, help="longest reply (default 512)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    chat.add_argument("--system", default=None, help="a system message starting every conversation")
    chat.add_argument(
        "--log-file",
        default=None,
        help="where the local engine's log goes while the shell owns the terminal "
        "(default: minisgl-shell-PID.log in the temporary directory; named at start)",
    )
    add_engine_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from minisgl.server.args import setup_logging

    parser = build_parser()
    options = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(options.log_level)
    settings = ChatSettings(options.max_tokens, options.temperature, options.top_p)
    try:
        settings.check()
    except ValueError as exc:
        parser.error(str(exc))
    if options.url is not None:
        return _chat(RemoteBackend(options.url, options.api_key), settings, options.system, sys.stderr)
    return _local_chat(parser, options, settings)


def _local_chat(parser: argparse.ArgumentParser, options: argparse.Namespace, settings: ChatSettings) -> int:
    """Chat with an engine started here; its log goes to a file while the shell owns the terminal."""
    from minisgl.server.args import server_args_from
    from minisgl.server.launch import LaunchError, launch_engine

    server_args = server_args_from(parser, options)
    if server_args.node_rank > 0:
        parser.error(
            "argument --node-rank: the shell runs on node 0; start the other nodes with `minisgl serve`"
        )
    log_path, terminal = _log_to_file(parser, options.log_file)
    try:
        with progress_on(terminal):
            engine = launch_engine(server_args)
    except LaunchError as exc:
        print(f"minisgl-shell: error: {exc} (details in {log_path})", file=terminal)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        status = _chat(LocalBackend(engine, server_args.model_name), settings, options.system, terminal)
    finally:
        engine.shutdown()
        sys.stderr = terminal  # the REPL is over: the traceback of an unexpected error reaches the user
    if status == 1:
        print(f"minisgl-shell: the engine's log is {log_path}", file=terminal)
    return status


def _log_to_file(parser: argparse.ArgumentParser, log_file: str | None) -> tuple[Path, TextIO]:
    """Send stderr (the engine's log) to the log file; returns it and the terminal's stderr."""
    log_path = Path(log_file) if log_file else default_log_path()
    try:
        terminal = redirect_stderr(log_path)
    except OSError as exc:
        parser.error(f"argument --log-file: cannot write {log_path}: {exc.strerror}")
    print(f"minisgl-shell: the engine's log is {log_path}", file=terminal)
    return log_path, terminal


def _chat(backend: ChatBackend, settings: ChatSettings, system: str | None, errors: TextIO) -> int:
    try:
        return asyncio.run(_run(backend, settings, system, errors))
    except KeyboardInterrupt:
        return 130


async def _run(backend: ChatBackend, settings: ChatSettings, system: str | None, errors: TextIO) -> int:
    try:
        await backend.start()
    except EngineLost as exc:
        print(f"minisgl-shell: error: {exc}", file=errors)
        return 1
    try:
        repl = Repl(backend, settings, system, sys.stdout)
        return await repl.run(_line_reader(sys.stdin.isatty() and sys.stdout.isatty()))
    finally:
        await backend.close()


if __name__ == "__main__":
    raise SystemExit(main())

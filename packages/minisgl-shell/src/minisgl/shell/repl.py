"""The `minisgl-shell` REPL.

Only the command syntax exists so far; the streaming chat loop arrives with issue 5. A line is either a
slash command (`/help`, `/reset`, `/exit`) or a chat message; `//text` sends `/text` as a message.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "help": "show this help",
    "reset": "forget the conversation so far and start a new one",
    "exit": "leave the shell (Ctrl-D does the same)",
}
ALIASES: dict[str, str] = {"quit": "exit", "q": "exit", "h": "help", "?": "help"}
NOT_READY = "The minisgl shell is not implemented yet: it arrives with issue 5."


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


def main(argv: Sequence[str] | None = None) -> int:
    print(NOT_READY, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""What the chat output parsers hand back, and the helper they share: finding a tag in streamed text,
holding back a tail that may still become it."""

from __future__ import annotations

from dataclasses import dataclass, field

from minisgl.server.detokenize import stop_prefix_len


@dataclass
class ToolCallDelta:
    """A piece of one tool call (OpenAI's `delta.tool_calls[i]`): id and name come once, first; the
    arguments (a JSON text) arrive in pieces that join up to the whole."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    """What a piece of model output adds to each part of the message."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ParsedDelta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


def split_at_tag(buffer: str, tag: str) -> tuple[str, str | None, str]:
    """(text before tag, rest after it) when the tag is in buffer: returns (before, after, "").
    Otherwise (safe text, None, held-back tail that may be the tag's start)."""
    at = buffer.find(tag)
    if at >= 0:
        return buffer[:at], buffer[at + len(tag) :], ""
    keep = stop_prefix_len(buffer, [tag])
    return buffer[: len(buffer) - keep], None, buffer[len(buffer) - keep :]

"""Parsers of chat output, chosen by `--reasoning-parser` and `--tool-call-parser`: the model's text in,
the message's parts (content, reasoning_content, tool_calls) out, piece by piece for streams.

A new format is one small file with a class that has `feed(text) -> ParsedDelta` and `finish()`, listed
here; a tool parser also has `call_grammar(schemas, parallel)`, the grammar that forces its calls.
"""

from __future__ import annotations

from typing import Protocol

from minisgl.server.api.parsers.base import ParsedDelta, ToolCallDelta
from minisgl.server.api.parsers.hermes import HermesToolParser
from minisgl.server.api.parsers.reasoning import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ThinkParser

__all__ = ["REASONING_PARSERS", "TOOL_PARSERS", "ChatOutputParser", "ParsedDelta", "ToolCallDelta"]

TOOL_PARSERS: dict[str, type[HermesToolParser]] = {"hermes": HermesToolParser}
REASONING_PARSERS: dict[str, type[ThinkParser]] = {
    "qwen3": Qwen3ReasoningParser,
    "deepseek-r1": DeepSeekR1ReasoningParser,
}


class _Parser(Protocol):
    def feed(self, text: str) -> ParsedDelta: ...
    def finish(self) -> ParsedDelta: ...


class ChatOutputParser:
    """The think block is split off first; tool calls are then looked for in the content."""

    def __init__(self, reasoning: str | None, tools: str | None) -> None:
        self.reasoning: _Parser | None = REASONING_PARSERS[reasoning]() if reasoning else None
        self.tools: _Parser | None = TOOL_PARSERS[tools]() if tools else None

    def feed(self, text: str) -> ParsedDelta:
        delta = self.reasoning.feed(text) if self.reasoning is not None else ParsedDelta(content=text)
        return self._tool_calls(delta, final=False)

    def finish(self) -> ParsedDelta:
        delta = self.reasoning.finish() if self.reasoning is not None else ParsedDelta()
        return self._tool_calls(delta, final=True)

    def _tool_calls(self, delta: ParsedDelta, final: bool) -> ParsedDelta:
        if self.tools is None:
            return delta
        found = self.tools.feed(delta.content)
        if final:
            found.extend(self.tools.finish())
        return ParsedDelta(found.content, delta.reasoning, found.tool_calls)

"""Reasoning models' think blocks: the text inside `<think>...</think>` goes to `reasoning_content`, the rest
to `content`.

- qwen3: the model opens the block itself; output that does not start with `<think>` is all content
  (e.g. with `chat_template_kwargs: {"enable_thinking": false}`, whose template closes the block in the
  prompt).
- deepseek-r1: the chat template opens the block in the prompt, so the output starts inside it (a
  leading `<think>` is dropped); output without `</think>` is all reasoning.
"""

from __future__ import annotations

from typing import Any

from minisgl.server.api.parsers.base import ParsedDelta, split_at_tag

THINK_START, THINK_END = "<think>", "</think>"


class ThinkParser:
    # Whether the output starts inside the block (its <think> is in the prompt).
    starts_thinking = False

    def __init__(self) -> None:
        self.state = "thinking" if self.starts_thinking else "start"
        self.buffer = ""
        self.at_start = True
        self.after_block = False  # the newlines that follow </think> are dropped

    @classmethod
    def grammar_after(cls, template_kwargs: dict[str, Any] | None) -> str | None:
        """The token after which a grammar applies: the end of the think block, unless the template
        was told not to think (the block is then closed in the prompt)."""
        if (template_kwargs or {}).get("enable_thinking") is False:
            return None
        return THINK_END

    def feed(self, text: str) -> ParsedDelta:
        self.buffer += text
        delta = ParsedDelta()
        if self.at_start and self._may_still_open():
            return delta
        if self.state == "thinking" and not self._take_reasoning(delta):
            return delta
        self._take_content(delta)
        return delta

    def _may_still_open(self) -> bool:
        """At the start: True while the buffer may still become <think>; else decides the state."""
        stripped = self.buffer.lstrip()
        if THINK_START.startswith(stripped) and len(stripped) < len(THINK_START):
            return True
        self.at_start = False
        if stripped.startswith(THINK_START):
            self.buffer = stripped[len(THINK_START) :]
            self.state = "thinking"
        elif self.state == "start":
            self.state = "content"
        return False

    def _take_reasoning(self, delta: ParsedDelta) -> bool:
        """Move the buffer's reasoning into delta; True when the think block ended."""
        before, after, held = split_at_tag(self.buffer, THINK_END)
        delta.reasoning += before
        if after is None:
            self.buffer = held
            return False
        self.buffer, self.state, self.after_block = after, "content", True
        return True

    def _take_content(self, delta: ParsedDelta) -> None:
        if self.after_block:  # the newlines that follow </think> are not content
            self.buffer = self.buffer.lstrip("\n")
            self.after_block = not self.buffer
        delta.content += self.buffer
        self.buffer = ""

    def finish(self) -> ParsedDelta:
        rest, self.buffer = self.buffer, ""
        if self.state == "thinking":
            return ParsedDelta(reasoning=rest)
        return ParsedDelta(content=rest)


class Qwen3ReasoningParser(ThinkParser):
    starts_thinking = False


class DeepSeekR1ReasoningParser(ThinkParser):
    starts_thinking = True

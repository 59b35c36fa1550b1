"""The Hermes tool-call format (Qwen2.5, Qwen3, Hermes models):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Streamed, a call's id and name go out as soon as `"arguments":` is reached, then its arguments text as
it arrives, less the closing braces at its end (one of them may close the call object itself).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from minisgl.server.api.parsers.base import ParsedDelta, ToolCallDelta, split_at_tag

START, END = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')


class HermesToolParser:
    def __init__(self) -> None:
        self.buffer = ""
        self.in_call = False
        self.num_calls = 0
        # The call being streamed: where its arguments start in buffer and how much of them went out.
        self.args_start: int | None = None
        self.args_sent = 0

    @staticmethod
    def call_grammar(schemas: list[dict[str, Any]], parallel: bool) -> str:
        """An EBNF grammar allowing only calls (one, or several if parallel) of the given tools, whose
        call objects follow `schemas` (one JSON schema per allowed tool)."""
        import xgrammar as xgr

        from minisgl.core.sampling.structured import json_schema_source

        source = json_schema_source(json.dumps({"anyOf": schemas}))
        call = xgr.Grammar.from_json_schema(source, any_whitespace=False)
        block = f'"{START}\\n" call "\\n{END}"'
        more = f'("\\n" {block})*' if parallel else ""
        return f"root ::= {block} {more}\n" + re.sub(r"\broot\b", "call", str(call))

    def feed(self, text: str) -> ParsedDelta:
        self.buffer += text
        delta = ParsedDelta()
        while True:
            if not self.in_call:
                before, after, held = split_at_tag(self.buffer, START)
                delta.content += before
                if after is None:
                    self.buffer = held
                    return delta
                self.buffer, self.in_call = after, True
                self.args_start, self.args_sent = None, 0
                continue
            body, after, _ = split_at_tag(self.buffer, END)
            if after is None:
                delta.tool_calls += self._stream_call(body)  # less a tail that may be </tool_call>
                return delta
            delta.extend(self._complete_call(body, END))
            self.buffer, self.in_call = after, False

    def finish(self) -> ParsedDelta:
        """The output ended: an unclosed call counts if its JSON is complete, else it is text."""
        rest, self.buffer = self.buffer, ""
        if not self.in_call:
            return ParsedDelta(content=rest)
        self.in_call = False
        return self._complete_call(rest, "")

    def _stream_call(self, body: str) -> list[ToolCallDelta]:
        deltas = []
        if self.args_start is None:
            head = _HEAD.match(body)
            if head is None:
                return []
            self.args_start = head.end()
            deltas.append(self._open_call(json.loads(f'"{head.group(1)}"')))
        # Closing braces at the end may include the call's own: they wait for what follows them.
        safe_end = len(body.rstrip(" \t\r\n}"))
        if safe_end > self.args_start + self.args_sent:
            piece = body[self.args_start + self.args_sent : safe_end]
            self.args_sent += len(piece)
            deltas.append(ToolCallDelta(self.num_calls - 1, arguments=piece))
        return deltas

    def _open_call(self, name: str) -> ToolCallDelta:
        self.num_calls += 1
        return ToolCallDelta(self.num_calls - 1, id=f"call_{uuid.uuid4().hex[:24]}", name=name)

    def _complete_call(self, body: str, end_tag: str) -> ParsedDelta:
        call = _call_object(body)
        if call is None:
            if self.args_start is not None:  # its name went out already: end it with what there is
                return ParsedDelta(tool_calls=[ToolCallDelta(self.num_calls - 1, arguments="")])
            return ParsedDelta(content=f"{START}{body}{end_tag}")
        deltas = []
        if self.args_start is None:
            deltas.append(self._open_call(call["name"]))
            arguments = json.dumps(call["arguments"], ensure_ascii=False)
        else:
            arguments = body[self.args_start : body.rstrip().rfind("}")]
        deltas.append(ToolCallDelta(self.num_calls - 1, arguments=arguments[self.args_sent :]))
        self.args_start, self.args_sent = None, 0
        return ParsedDelta(tool_calls=deltas)


def _call_object(body: str) -> dict[str, Any] | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    call.setdefault("arguments", {})
    return call

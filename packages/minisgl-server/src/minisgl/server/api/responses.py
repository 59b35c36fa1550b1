"""OpenAI response objects: chat.completion / chat.completion.chunk and text_completion, built from the
engine's RequestOutputs one choice at a time."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from minisgl.server.api.parsers import ChatOutputParser, ParsedDelta, ToolCallDelta
from minisgl.server.api.protocol import GenerationSpec
from minisgl.server.messages import RequestOutput


@dataclass
class Choice:
    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[list[Any]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    text_offset: int = 0  # completions logprobs: characters before the next token
    first_token_at: float | None = None
    # Chats with tools or a reasoning parser: the text split into message parts, in total and by the
    # last output.
    parser: ChatOutputParser | None = None
    parsed: ParsedDelta = field(default_factory=ParsedDelta)
    last_delta: ParsedDelta = field(default_factory=ParsedDelta)

    def feed(self, text: str, final: bool) -> None:
        assert self.parser is not None
        self.last_delta = self.parser.feed(text)
        if final:
            self.last_delta.extend(self.parser.finish())
        self.parsed.extend(self.last_delta)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The whole calls, from their pieces."""
        calls: dict[int, dict[str, Any]] = {}
        for piece in self.parsed.tool_calls:
            call = calls.setdefault(
                piece.index,
                {"id": piece.id, "type": "function", "function": {"name": piece.name, "arguments": ""}},
            )
            call["function"]["arguments"] += piece.arguments
        return list(calls.values())

    @property
    def reported_finish_reason(self) -> str | None:
        """ "tool_calls" when the model stopped after calling tools, as OpenAI reports it."""
        if self.finish_reason == "stop" and self.parsed.tool_calls:
            return "tool_calls"
        return self.finish_reason

    def finish(self, last: RequestOutput) -> None:
        """The choice's finish reason and token counts, which its last output carries."""
        self.finish_reason = last.finish_reason
        self.prompt_tokens = last.num_prompt_tokens
        self.cached_tokens = last.num_cached_tokens
        self.output_tokens = last.num_output_tokens


class ResponseBuilder:
    def __init__(self, spec: GenerationSpec, uids: list[int]) -> None:
        self.spec = spec
        self.chat = spec.chat
        self.id = ("chatcmpl-" if spec.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = {uid: Choice(index) for index, uid in enumerate(uids)}
        extras = spec.extras
        if spec.chat and (extras.tool_parser or extras.reasoning_parser):
            self._parse_outputs(extras.reasoning_parser, extras.tool_parser)

    def _parse_outputs(self, reasoning_parser: str | None, tool_parser: str | None) -> None:
        """Each choice's text goes through its own parser (reasoning block, tool calls)."""
        for choice in self.choices.values():
            choice.parser = ChatOutputParser(reasoning_parser, tool_parser)

    # ---- accumulating -----------------------------------------------------------------------------

    def add(self, output: RequestOutput, now: float) -> Choice:
        choice = self.choices[output.uid]
        if output.num_new_tokens and choice.first_token_at is None:
            choice.first_token_at = now
        choice.text.append(output.text)
        if choice.parser is not None:
            choice.feed(output.text, final=output.finish_reason is not None)
        if output.logprobs:
            choice.logprobs.extend(output.logprobs)
        if output.finish_reason is not None:
            choice.finish(output)
        return choice

    def usage(self) -> dict[str, Any]:
        choices = list(self.choices.values())
        # The n samples of a prompt share it: count each prompt once (its first sample).
        firsts = choices[:: self.spec.n]
        prompt = sum(c.prompt_tokens for c in firsts)
        completion = sum(c.output_tokens for c in choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)},
        }

    # ---- streaming --------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.spec.model,
            "choices": choices,
        }
        if self.spec.include_usage:
            body["usage"] = usage
        return sse(body)

    def opening_chunks(self) -> list[str]:
        """Chat streams open every choice with its role, as OpenAI's do."""
        if not self.chat:
            return []
        return [
            self._chunk(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for c in self.choices.values()
        ]

    def output_chunks(self, output: RequestOutput, choice: Choice) -> list[str]:
        """The stream chunks of one output: its news (text, parsed delta, logprobs), then its finish."""
        chunks = []
        logprobs = self._logprobs(choice, output.logprobs) if output.logprobs else None
        delta = self._delta(output, choice)
        if delta or logprobs is not None:
            news = {**self._piece(choice, delta, output.text), "logprobs": logprobs, "finish_reason": None}
            chunks.append(self._chunk([news]))
        if output.finish_reason is not None:
            end = {
                **self._piece(choice, {}, ""),
                "logprobs": None,
                "finish_reason": choice.reported_finish_reason,
            }
            chunks.append(self._chunk([end]))
        return chunks

    def _delta(self, output: RequestOutput, choice: Choice) -> dict[str, Any]:
        if choice.parser is not None:
            return _delta(choice.last_delta)
        return {"content": output.text} if output.text else {}

    def _piece(self, choice: Choice, delta: dict[str, Any], text: str) -> dict[str, Any]:
        """A chunk's choice: a chat delta, or a completion's text."""
        if self.chat:
            return {"index": choice.index, "delta": delta}
        return {"index": choice.index, "text": text}

    def abort_chunks(self) -> list[str]:
        """Finish chunks for the choices still open when the engine went away."""
        chunks = []
        for uid, choice in self.choices.items():
            if choice.finish_reason is None:
                # Through add(), as any finish: it flushes what a parser holds and resets the last delta.
                output = RequestOutput(uid, "", 0, None, "abort")
                chunks += self.output_chunks(output, self.add(output, time.time()))
        return chunks

    def closing_chunks(self) -> list[str]:
        chunks = [self._chunk([], self.usage())] if self.spec.include_usage else []
        return [*chunks, "data: [DONE]\n\n"]

    # ---- one response -----------------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        choices = []
        for choice in self.choices.values():
            text = "".join(choice.text)
            logprobs = (
                self._logprobs(Choice(choice.index), choice.logprobs)
                if self.spec.top_logprobs is not None
                else None
            )
            if self.chat:
                choices.append(
                    {
                        "index": choice.index,
                        "message": _message(choice, text),
                        "logprobs": logprobs,
                        "finish_reason": choice.reported_finish_reason,
                    }
                )
            else:
                choices.append(
                    {
                        "index": choice.index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": choice.finish_reason,
                    }
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.spec.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def _logprobs(self, choice: Choice, entries: list[list[Any]] | None) -> dict[str, Any] | None:
        if self.spec.top_logprobs is None:
            return None
        if self.chat:
            return _chat_logprobs(entries or [])
        return _completion_logprobs(choice, entries or [])


def _chat_logprobs(entries: list[list[Any]]) -> dict[str, Any]:
    """The chat API's logprobs: one object per token, with its bytes and its top alternatives."""

    def token_entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**token_entry(token, logprob), "top_logprobs": [token_entry(t, lp) for t, lp in top]}
        for token, logprob, top in entries
    ]
    return {"content": content}


def _completion_logprobs(choice: Choice, entries: list[list[Any]]) -> dict[str, Any]:
    """The completions API's logprobs: parallel arrays, with each token's offset in the choice's text."""
    offsets = []
    for token, _, _ in entries:
        offsets.append(choice.text_offset)
        choice.text_offset += len(token)
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        # None at an echoed prompt's first token, which has no logprob.
        "top_logprobs": [None if e[2] is None else dict(e[2]) for e in entries],
        "text_offset": offsets,
    }


def sse(body: dict[str, Any]) -> str:
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _message(choice: Choice, text: str) -> dict[str, Any]:
    if choice.parser is None:
        return {"role": "assistant", "content": text}
    content = choice.parsed.content
    message: dict[str, Any] = {"role": "assistant", "content": content if content.strip() else None}
    if choice.parsed.reasoning:
        message["reasoning_content"] = choice.parsed.reasoning
    if choice.parsed.tool_calls:
        message["tool_calls"] = choice.tool_calls()
    return message


def _delta(parsed: ParsedDelta) -> dict[str, Any]:
    """A stream chunk's delta: only the parts this piece of output added."""
    delta: dict[str, Any] = {}
    if parsed.content:
        delta["content"] = parsed.content
    if parsed.reasoning:
        delta["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        delta["tool_calls"] = [_tool_call_delta(piece) for piece in parsed.tool_calls]
    return delta


def _tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": piece.arguments}
    entry: dict[str, Any] = {"index": piece.index, "function": function}
    if piece.id is not None:
        entry.update(id=piece.id, type="function")
        function["name"] = piece.name
    return entry

"""OpenAI response objects: chat.completion / chat.completion.chunk and text_completion, built from the
engine's RequestOutputs one choice at a time."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from minisgl.core.messages import RequestOutput
from minisgl.server.api.protocol import GenerationSpec


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


class ResponseBuilder:
    def __init__(self, spec: GenerationSpec, uids: list[int]) -> None:
        self.spec = spec
        self.chat = spec.chat
        self.id = ("chatcmpl-" if spec.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = {uid: Choice(index) for index, uid in enumerate(uids)}

    # ---- accumulating -----------------------------------------------------------------------------

    def add(self, output: RequestOutput, now: float) -> Choice:
        choice = self.choices[output.uid]
        if output.num_new_tokens and choice.first_token_at is None:
            choice.first_token_at = now
        choice.text.append(output.text)
        if output.logprobs:
            choice.logprobs.extend(output.logprobs)
        if output.finish_reason is not None:
            choice.finish_reason = output.finish_reason
            choice.prompt_tokens = output.num_prompt_tokens
            choice.cached_tokens = output.num_cached_tokens
            choice.output_tokens = output.num_output_tokens
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
        chunks = []
        logprobs = self._logprobs(choice, output.logprobs) if output.logprobs else None
        if output.text or logprobs is not None:
            if self.chat:
                entry: dict[str, Any] = {"index": choice.index, "delta": {"content": output.text}}
            else:
                entry = {"index": choice.index, "text": output.text}
            entry.update(logprobs=logprobs, finish_reason=None)
            chunks.append(self._chunk([entry]))
        if output.finish_reason is not None:
            entry = {"index": choice.index, "delta": {}} if self.chat else {"index": choice.index, "text": ""}
            entry.update(logprobs=None, finish_reason=output.finish_reason)
            chunks.append(self._chunk([entry]))
        return chunks

    def abort_chunks(self) -> list[str]:
        """Finish chunks for the choices still open when the engine went away."""
        chunks = []
        for uid, choice in self.choices.items():
            if choice.finish_reason is None:
                chunks += self.output_chunks(RequestOutput(uid, "", 0, None, "abort"), choice)
                choice.finish_reason = "abort"
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
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": choice.finish_reason,
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
        entries = entries or []
        if self.chat:
            return {
                "content": [
                    {
                        "token": token,
                        "logprob": logprob,
                        "bytes": list(token.encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top
                        ],
                    }
                    for token, logprob, top in entries
                ]
            }
        offsets = []
        for token, _, _ in entries:
            offsets.append(choice.text_offset)
            choice.text_offset += len(token)
        return {
            "tokens": [e[0] for e in entries],
            "token_logprobs": [e[1] for e in entries],
            # None at an echoed prompt's first token, which has no logprob.
            "top_logprobs": [None if e[2] is None else {t: lp for t, lp in e[2]} for e in entries],
            "text_offset": offsets,
        }


def sse(body: dict[str, Any]) -> str:
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n"

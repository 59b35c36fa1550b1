"""Stop strings, offline: the LLM class owns them (a server's detokenizer owns them while serving; the
runtime never decodes text). A request ends when its decoded output contains one of its stop strings;
only the tail of each output is decoded, all requests in one batched call per step, so the check costs
the same at token 10 and at token 10,000."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-free at run time: a server's detokenizer imports first_stop
    from minisgl.core.request import Request

# Tokens decoded beyond the longest stop string: a token decodes to at least one character except
# for partial UTF-8 bytes and special tokens, which this margin absorbs.
_MARGIN_TOKENS = 8


def first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Where the first of the stop strings occurs in text (from `start`), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def reached_stop_strings(tokenizer: Any, requests: list[Request]) -> list[Request]:
    """The requests whose output (the tokens known on the host) now holds one of their stop strings."""
    watched = [(req, req.params.stop) for req in requests if req.params.stop]
    if not watched:
        return []
    tails = [_tail(req, stops) for req, stops in watched]
    texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
    found = [first_stop(text, stops) for (_, stops), text in zip(watched, texts, strict=True)]
    return [req for (req, _), at in zip(watched, found, strict=True) if at is not None]


def _tail(req: Request, stops: list[str]) -> list[int]:
    """The last output tokens, enough to hold the longest stop string."""
    return req.resolved_output_ids()[-(max(map(len, stops)) + _MARGIN_TOKENS) :]

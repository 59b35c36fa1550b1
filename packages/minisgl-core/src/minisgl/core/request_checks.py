"""What a request must satisfy beyond its own SamplingParams, checked once when it is added: its prompt
and token ids against the model, and its length against the context (the one context-length policy).

Context-length policy, as vLLM and SGLang apply it:
- a prompt that leaves no room for one generated token is refused (param "prompt");
- without max_tokens a request may generate up to the end of the context;
- an explicit max_tokens beyond the context is refused (param "max_tokens") where the caller asks for it
  (the OpenAI server, as vLLM's does); otherwise (the offline API) generation stops at the end of the
  context with finish_reason "length".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from minisgl.core.request_error import InvalidRequestError
from minisgl.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class CheckedRequest:
    """A prompt and params that Runtime.check_request accepted, and how many tokens it may generate."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int


def output_budget(prompt_len: int, max_tokens: int | None, context_length: int, refuse_overflow: bool) -> int:
    """How many tokens a request may generate in a context of context_length tokens (the policy above)."""
    if prompt_len < 1:
        raise InvalidRequestError("prompt", "prompt is empty: at least one token is needed")
    room = context_length - prompt_len
    if room < 1:
        raise InvalidRequestError(
            "prompt",
            f"the prompt has {prompt_len} tokens, but the context length is {context_length} "
            "(prompt + at least one generated token must fit)",
        )
    if max_tokens is None:
        return room
    if max_tokens > room and refuse_overflow:
        raise InvalidRequestError(
            "max_tokens",
            f"max_tokens is too large: the prompt has {prompt_len} tokens and max_tokens is {max_tokens}, "
            f"but the context length is {context_length}",
        )
    return min(max_tokens, room)


def check_token_ids(prompt_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
    """Every token id the request names (prompt, stop_token_ids, logit_bias) is in the vocabulary."""
    for token in prompt_ids:  # a loop, not next(..., None): a None in the list is itself a bad id
        if not _in_vocabulary(token, vocab_size):
            raise InvalidRequestError(
                "prompt", f"token id {token!r} is outside the vocabulary [0, {vocab_size})"
            )
    _check_named_ids("stop_token_ids", params.stop_token_ids or (), vocab_size)
    _check_named_ids("logit_bias", params.logit_bias or {}, vocab_size)


def _check_named_ids(name: str, ids: Iterable[int], vocab_size: int) -> None:
    """SamplingParams checked that these are token ids; here, that the model has them."""
    outside = next((token for token in ids if token >= vocab_size), None)
    if outside is not None:
        raise InvalidRequestError(
            name, f"{name} holds token id {outside}, outside the vocabulary [0, {vocab_size})"
        )


def _in_vocabulary(token: object, vocab_size: int) -> bool:
    return isinstance(token, int) and not isinstance(token, bool) and 0 <= token < vocab_size

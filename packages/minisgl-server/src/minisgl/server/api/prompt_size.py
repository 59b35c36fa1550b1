"""A prompt far too long for the context is refused from its length in characters, before it is tokenized.

No token of a vocabulary stands for more characters than its own spelling has, so a text of C characters
needs at least C / L tokens, L being the vocabulary's longest token. Tokenizing a 10 MB prompt takes
seconds in the tokenizer worker that every other request waits on; this check takes microseconds. The
engine still counts the tokens of everything it lets through.
"""

from __future__ import annotations

from typing import Any

from minisgl.server.api.protocol import ApiError, GenerationSpec, Prompt


def longest_token_chars(tokenizer: Any) -> int | None:
    """The length of the vocabulary's longest token, or None without a tokenizer."""
    if tokenizer is None:
        return None
    return max(map(len, tokenizer.get_vocab()), default=1) or 1


def check_prompt_size(spec: GenerationSpec, context_length: int | None, longest_token: int | None) -> None:
    if context_length is None or longest_token is None:
        return
    for prompt in spec.prompts:
        chars = _characters(prompt)
        fewest = chars // longest_token
        if fewest >= context_length:
            raise ApiError(
                400,
                f"the prompt has at least {fewest:,} tokens ({chars:,} characters), but the context "
                f"length is {context_length:,} tokens",
                "messages" if spec.chat else "prompt",
            )


def _characters(prompt: Prompt) -> int:
    if prompt.messages is not None:
        return sum(len(m["content"]) for m in prompt.messages)
    return len(prompt.text or "")

"""The state of one request as it moves through the scheduler, and the result handed back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from minisgl.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from minisgl.core.kv.radix_cache import RadixNode
    from minisgl.core.sampling.structured import GrammarState

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Request:
    # The caller's id for the request (the server's uid; the offline LLM numbers its own).
    uid: int
    prompt_ids: list[int]
    params: SamplingParams
    # Tokens it may generate at most: Runtime.check_request fixes it from max_tokens and the context
    # length (minisgl.core.request_checks); -1 takes params.max_tokens as it is.
    max_new_tokens: int = -1
    output_ids: list[int] = field(default_factory=list)
    # Tokens whose K and V are in the KV pool (cached prefix + computed by this request).
    num_computed: int = 0
    # Tokens of the prompt that were found in the prefix cache at admission.
    num_cached: int = 0
    # Row of this request in the token and page tables; -1 while it has none.
    table_row: int = -1
    # KV pages of positions 0, page_size, 2 * page_size, ...: the first num_tree_pages belong to the prefix
    # cache (on the path to cache_node, which this request keeps locked), the rest to this request.
    pages: list[int] = field(default_factory=list)
    num_tree_pages: int = 0
    cache_node: RadixNode | None = None
    # Tokens appended to output_ids at launch whose values are still on the device (overlap scheduling):
    # the last num_pending entries of output_ids are placeholders.
    num_pending: int = 0
    # Admission order; retraction takes the newest requests first.
    admitted_at: int = -1
    num_retractions: int = 0
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    # Structured output: where the request is in its grammar (None for a free request).
    grammar: GrammarState | None = None
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[dict[int, float] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            assert self.params.max_tokens is not None, "a request without max_tokens needs max_new_tokens"
            self.max_new_tokens = self.params.max_tokens

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        """More than the last token lacks KV: a prefill chunk (not a decode step) comes next."""
        return self.num_computed < self.seq_len - 1

    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def resolved_output_ids(self) -> list[int]:
        """Generated tokens whose values are known on the host."""
        return self.output_ids[: len(self.output_ids) - self.num_pending]

    @property
    def awaits_last_token(self) -> bool:
        """Its final token is already in flight: nothing more to schedule for it."""
        return len(self.output_ids) >= self.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationResult:
    """One prompt's output from `LLM.generate` / `LLM.chat`."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    # The `logprobs` most likely tokens at each prompt position (None at the first), with prompt_logprobs.
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    # With SamplingParams(n > 1): all n samples (this result is the first of them).
    samples: list[GenerationResult] | None = None

"""The state of one request as it moves through the scheduler, and the result handed back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from minisgl.core.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Request:
    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    # Tokens whose K and V are in the KV pool (cached prefix + computed by this request).
    num_computed: int = 0
    # Tokens of the prompt that were found in the prefix cache at admission.
    num_cached: int = 0
    # Row of this request in the token and page tables; -1 while it has none.
    table_row: int = -1
    # KV pages this request owns, in position order.
    pages: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]


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

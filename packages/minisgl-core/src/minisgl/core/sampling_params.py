"""SamplingParams: how one request's tokens are chosen and when it stops (names follow SGLang and vLLM)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_TOP_LOGPROBS = 20
# The fields that give a request a grammar (structured output); at most one per request.
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf")
# OpenAI's range for a logit_bias value: -100 bans a token, 100 all but forces it.
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    max_tokens: int = 16
    # 0.0 means greedy decoding.
    temperature: float = 1.0
    top_p: float = 1.0
    # -1 disables top-k.
    top_k: int = -1
    # Drop tokens less likely than min_p times the most likely one (0 disables).
    min_p: float = 0.0
    # A per-request seed: the same seed gives the same tokens whatever else is in the batch.
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    # Stop when the output text contains one of these; the string is not part of the returned text.
    stop: list[str] | None = None
    ignore_eos: bool = False
    # OpenAI's penalties on tokens already generated: logit -= presence * [count > 0] + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # The CTRL / Hugging Face penalty on tokens of the prompt and the output (1.0 disables).
    repetition_penalty: float = 1.0
    # Samples per prompt (offline API); they share the prompt's KV through the prefix cache.
    n: int = 1
    # None: no logprobs. k >= 0: the chosen token's logprob plus the k most likely alternatives.
    logprobs: int | None = None
    # Logprob of every prompt token given the tokens before it (the first is None), plus the `logprobs`
    # most likely alternatives at each position. Such a request does not read the prefix cache: every
    # prompt position is computed, so cached tokens get their logprobs too.
    prompt_logprobs: bool = False
    # Structured output (at most one): the output must match a JSON schema (a JSON string or a dict), a
    # regular expression, or an EBNF grammar (see minisgl.core.sampling.structured).
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    # With a grammar: it applies only after this token (a reasoning model's "</think>") is generated.
    grammar_after: str | None = None
    # EOS and the stop token ids cannot be sampled before this many tokens are generated.
    min_tokens: int = 0
    # Token id -> value added to its logit before sampling (penalties and temperature come after).
    logit_bias: dict[int, float] | None = None
    stop_token_id_set: frozenset[int] = field(init=False, repr=False, default=frozenset())

    def __post_init__(self) -> None:
        self.validate()
        self.stop_token_id_set = frozenset(self.stop_token_ids or ())

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for text in self.stop or ():
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop strings must be non-empty strings, got {text!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        self._validate_grammar()
        for token_id in self.stop_token_ids or ():
            if not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {token_id!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_tokens = {self.max_tokens}], got {self.min_tokens!r}"
            )
        for token_id, bias in (self.logit_bias or {}).items():
            if not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {token_id!r}")
            if (
                isinstance(bias, bool)
                or not isinstance(bias, (int, float))
                or not abs(bias) <= MAX_LOGIT_BIAS
            ):
                raise ValueError(
                    f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                    f"got {bias!r} for token {token_id}"
                )

    def _validate_grammar(self) -> None:
        if isinstance(self.json_schema, dict):
            self.json_schema = json.dumps(self.json_schema)
        given = [name for name in GRAMMAR_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"json_schema, regex and ebnf exclude each other, got {' and '.join(given)}")
        for name in (*given, "grammar_after"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")

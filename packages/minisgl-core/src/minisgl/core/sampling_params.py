"""SamplingParams: how one request's tokens are chosen and when it stops (names follow SGLang and vLLM).

The accepted range of every parameter is declared here, once: the offline API and the server (which
builds SamplingParams from a request body) check against the same table."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from minisgl.core.request_error import InvalidRequestError

MAX_TOP_LOGPROBS = 20
# The fields that give a request a grammar (structured output); at most one per request.
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf")
# OpenAI's range for a logit_bias value: -100 bans a token, 100 all but forces it.
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class Range:
    """The accepted values of a float parameter: [low, high], or (low, high] when low_open."""

    low: float
    high: float
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high  # NaN is neither

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# OpenAI's ranges (temperature, top_p, the penalties) and SGLang's / vLLM's for their own fields.
FLOAT_RANGES = {
    "temperature": Range(0.0, 2.0),
    "top_p": Range(0.0, 1.0, low_open=True),
    "min_p": Range(0.0, 1.0),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "repetition_penalty": Range(0.0, 2.0, low_open=True),
}


@dataclass
class SamplingParams:
    # None: up to the end of the context.
    max_tokens: int | None = 16
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

    @classmethod
    def trusted(cls, **fields: Any) -> SamplingParams:
        """Params that were validated where they were built, rebuilt without checking them again: for the
        server's internal wire, whose sender is another process of ours that built them with the
        checks. Every init field must be given (as the wire sends them)."""
        if set(fields) != set(_INIT_FIELDS):
            raise TypeError(
                f"trusted SamplingParams take exactly the fields {_INIT_FIELDS}, got {sorted(fields)}"
            )
        params = cls.__new__(cls)
        params.__dict__.update(fields)  # written directly: __setattr__ would mark the params unchecked
        params._mark_valid()
        return params

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name != "_valid":  # changed after validate(): ensure_valid() checks it again
            super().__setattr__("_valid", False)

    def ensure_valid(self) -> None:
        """validate(), unless nothing changed since it last ran: a request's entry point calls this, so
        params are checked once when built and again only if a field was set since."""
        if not getattr(self, "_valid", False):
            self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> None:
        """Normalize (a lone stop string, a dict schema) and check every field; an InvalidRequestError
        names the first bad one. Runs when the params are built: everything downstream trusts them."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.json_schema, dict):
            self.json_schema = json.dumps(self.json_schema)
        for check in _FIELD_CHECKS:
            check(self)
        self._mark_valid()

    def _mark_valid(self) -> None:
        """What a check leaves behind, for validate() and trusted() alike: the set of stop ids the sampler
        reads, and the mark that no field changed since."""
        state = self.__dict__  # written directly: __setattr__ would clear the mark
        state["stop_token_id_set"] = frozenset(self.stop_token_ids or ())
        state["_valid"] = True


# ---- the checks of single fields (and of min_tokens against max_tokens) ---------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(name: str, rule: str, value: Any, where: str = "") -> InvalidRequestError:
    return InvalidRequestError(name, f"{name} {rule}, got {value!r}{where}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_token_id(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_non_empty_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _check_floats(p: SamplingParams) -> None:
    for name, accepted in FLOAT_RANGES.items():
        value = getattr(p, name)
        if not (_is_number(value) and value in accepted):
            raise _fail(name, f"must be a number in {accepted}", value)


def _check_max_tokens(p: SamplingParams) -> None:
    if p.max_tokens is not None and not (_is_int(p.max_tokens) and p.max_tokens >= 1):
        raise _fail("max_tokens", "must be an integer >= 1 or None (up to the context length)", p.max_tokens)


def _check_min_tokens(p: SamplingParams) -> None:
    most = p.max_tokens if p.max_tokens is not None else math.inf
    if not (_is_int(p.min_tokens) and 0 <= p.min_tokens <= most):
        raise _fail("min_tokens", f"must be an integer in [0, max_tokens = {p.max_tokens}]", p.min_tokens)


# The other integer fields: (name, whether a value is accepted, the rule an error states).
_INTEGER_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("top_k", lambda v: _is_int(v) and (v >= 1 or v == -1), "must be -1 (disabled) or an integer >= 1"),
    ("n", lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    ("seed", lambda v: v is None or _is_int(v), "must be an integer or None"),
    (
        "logprobs",
        lambda v: v is None or (_is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS),
        f"must be an integer in [0, {MAX_TOP_LOGPROBS}] or None",
    ),
)


def _check_integers(p: SamplingParams) -> None:
    for name, accepted, rule in _INTEGER_RULES:
        value = getattr(p, name)
        if not accepted(value):
            raise _fail(name, rule, value)


def _check_stop_strings(p: SamplingParams) -> None:
    for text in p.stop or ():
        if not _is_non_empty_string(text):
            raise _fail("stop", "must be a list of non-empty strings", text)


def _check_stop_token_ids(p: SamplingParams) -> None:
    for token_id in p.stop_token_ids or ():
        if not _is_token_id(token_id):
            raise _fail("stop_token_ids", "must be a list of non-negative integers", token_id)


def _check_logit_bias(p: SamplingParams) -> None:
    for token_id, bias in (p.logit_bias or {}).items():
        if not _is_token_id(token_id):
            raise _fail("logit_bias", "keys must be non-negative token ids", token_id)
        if not (_is_number(bias) and abs(bias) <= MAX_LOGIT_BIAS):  # NaN is out of range too
            rule = f"values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
            raise _fail("logit_bias", rule, bias, f" for token {token_id}")


def _check_grammar(p: SamplingParams) -> None:
    """At most one grammar field, and it (and grammar_after) a non-empty string."""
    given = _grammar_given(p)
    bad = next(
        (name for name in (*given, "grammar_after") if _is_bad_optional_string(getattr(p, name))), None
    )
    if bad is not None:
        raise InvalidRequestError(bad, f"{bad} must be a non-empty string, got {getattr(p, bad)!r}")


def _grammar_given(p: SamplingParams) -> list[str]:
    given = [name for name in GRAMMAR_FIELDS if getattr(p, name) is not None]
    if len(given) > 1:
        raise InvalidRequestError(
            given[1], f"json_schema, regex and ebnf exclude each other, got {' and '.join(given)}"
        )
    return given


def _is_bad_optional_string(value: Any) -> bool:
    return value is not None and not _is_non_empty_string(value)


_INIT_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.init)

# Every check, in the order a request's first bad field is reported.
_FIELD_CHECKS: tuple[Callable[[SamplingParams], None], ...] = (
    _check_max_tokens,
    _check_min_tokens,
    _check_integers,
    _check_floats,
    _check_stop_strings,
    _check_stop_token_ids,
    _check_logit_bias,
    _check_grammar,
)

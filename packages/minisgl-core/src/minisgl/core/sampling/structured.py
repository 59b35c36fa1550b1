"""Structured output: requests whose tokens must follow a grammar (a JSON schema, a regex or an EBNF
grammar), through xgrammar.

Each constrained request owns a `GrammarState` (an xgrammar matcher). Before sampling, `mask_logits`
fills the next-token bitmask of every constrained row on the host and applies it on the device that holds
the logits, to those rows only; free rows are untouched. After a step's tokens reach the host, each
matcher accepts its token. The matcher needs token N before it can build the mask for token N+1: with
overlap scheduling, step N+1 is launched while token N is still on the device, so the engine samples the
constrained rows of step N+1 late (ModelRunner.sample_late), right after step N completes and the matchers
have taken its tokens, while the device still runs step N+1's forward pass. Free rows are sampled at
launch as usual, so overlap stays on for everyone. The matcher lives on the Request, so a retracted
request resumes with its state intact.

EOS is allowed only where the grammar can end: the model's EOS ids are the matcher's stop tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from minisgl.core.request_error import InvalidRequestError
from minisgl.core.sampling_params import GRAMMAR_FIELDS, SamplingParams


def grammar_of(params: SamplingParams) -> tuple[str, str] | None:
    """(field, source) of the request's grammar, or None for a free request."""
    for name in GRAMMAR_FIELDS:
        source = getattr(params, name)
        if source is not None:
            return name, source
    return None


def check_grammar(params: SamplingParams) -> None:
    """Parse the request's grammar (no tokenizer needed); ValueError naming the field if it is invalid."""
    grammar = grammar_of(params)
    if grammar is not None:
        check_grammar_source(*grammar)


def check_grammar_source(name: str, source: str) -> None:
    """Parse one grammar, `name` being its SamplingParams field (json_schema, regex or ebnf)."""
    with _refused_as(name):
        _parse(name, source)


@contextmanager
def _refused_as(name: str) -> Iterator[None]:
    """xgrammar's refusal of the grammar in field `name`, as an InvalidRequestError naming that field."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InvalidRequestError(name, f"{name} is invalid: {_first_line(exc)}") from None


def json_schema_source(source: str) -> str:
    """The schema to give xgrammar for `source`: every length-bounded string (minLength/maxLength, no
    pattern or format) also gets the equivalent pattern. xgrammar 0.2.9 compiles a length-bounded string
    to a character class that admits raw control characters (tab, U+0001...), which JSON forbids, so a
    constrained reply could fail json.loads; its pattern path encodes strings as JSON requires (upstream
    issue mlc-ai/xgrammar#800). Text that is not JSON is returned as it is, for xgrammar to refuse."""
    try:
        schema = json.loads(source)
    except ValueError:
        return source
    return json.dumps(_with_string_patterns(schema))


def _with_string_patterns(node: Any) -> Any:
    if isinstance(node, list):
        return [_with_string_patterns(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _with_string_patterns(value) for key, value in node.items()}
    pattern = _length_pattern(node)
    if pattern is None:
        return node
    # The pattern says the same as the bounds; xgrammar warns when it is given both.
    return {**{k: v for k, v in node.items() if k not in ("minLength", "maxLength")}, "pattern": pattern}


def _length_pattern(node: dict[str, Any]) -> str | None:
    """The regex of a length-bounded string schema with no pattern or format of its own, else None."""
    if node.get("type") != "string" or "pattern" in node or "format" in node:
        return None
    low, high = node.get("minLength"), node.get("maxLength")
    if not _are_bounds(low, high):
        return None  # no bound, or not a valid one (xgrammar reports that)
    return f"^[\\s\\S]{{{low or 0},{'' if high is None else high}}}$"


def _are_bounds(low: Any, high: Any) -> bool:
    """At least one of minLength / maxLength is given, and each given one is an integer."""
    given = [bound for bound in (low, high) if bound is not None]
    return bool(given) and all(isinstance(bound, int) for bound in given)


def _parse(name: str, source: str) -> xgr.Grammar:
    if name == "json_schema":
        return xgr.Grammar.from_json_schema(json_schema_source(source), any_whitespace=False)
    if name == "regex":
        return xgr.Grammar.from_regex(source)
    return xgr.Grammar.from_ebnf(source)


def _first_line(exc: Exception) -> str:
    """xgrammar's messages start with a '[time] file:line: ' prefix; keep what a client can use."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


class GrammarState:
    """One request's place in its grammar. With `start_token` set (a reasoning model's end-of-thinking
    token) the grammar applies only after that token has been generated."""

    def __init__(self, matcher: xgr.GrammarMatcher, start_token: int | None = None) -> None:
        self.matcher = matcher
        self.start_token = start_token
        self.active = start_token is None

    def accept(self, token: int) -> bool:
        """Advance past a generated token; False if the grammar does not allow it (masking prevents that)."""
        if not self.active:
            self.active = token == self.start_token
            return True
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The grammar ended (its stop token was accepted): the request is complete."""
        return self.active and bool(self.matcher.is_terminated())


class GrammarCompiler:
    """Compiles grammars against one tokenizer; xgrammar's compiler caches compiled grammars by source."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None

    def _get(self) -> xgr.GrammarCompiler:
        if self._compiler is None:  # built on first use: a server without grammars never pays for it
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._compiler

    def state_for(self, params: SamplingParams) -> GrammarState | None:
        """A fresh matcher for the request's grammar (None for a free request); ValueError if invalid."""
        grammar = grammar_of(params)
        if grammar is None:
            return None
        if self.tokenizer is None:
            raise InvalidRequestError(grammar[0], f"{grammar[0]} needs a tokenizer, and this model has none")
        name, source = grammar
        compiler = self._get()
        with _refused_as(name):
            if name == "json_schema":
                compiled = compiler.compile_json_schema(json_schema_source(source), any_whitespace=False)
            elif name == "regex":
                compiled = compiler.compile_regex(source)
            else:
                compiled = compiler.compile_grammar(source)
        return GrammarState(xgr.GrammarMatcher(compiled), self._start_token(params))

    def _start_token(self, params: SamplingParams) -> int | None:
        if params.grammar_after is None:
            return None
        ids = self.tokenizer.encode(params.grammar_after, add_special_tokens=False)
        if len(ids) != 1:
            raise InvalidRequestError(
                "grammar_after",
                f"grammar_after must be a single token, {params.grammar_after!r} is {len(ids)}",
            )
        return int(ids[0])


@dataclass
class _Constrained:
    rows: list[int]
    states: list[GrammarState]


def _constrained(requests: Sequence[Any | None]) -> _Constrained:
    rows, states = [], []
    for i, req in enumerate(requests):
        state = req.grammar if req is not None else None
        if state is not None and state.active:
            rows.append(i)
            states.append(state)
    return _Constrained(rows, states)


# Row counts that give xgrammar's Triton mask kernel a distinct compiled variant: Triton specialises an
# integer argument that equals 1 or is a multiple of 16, so 1, 16 and any other count are three kernels.
_MASK_KERNEL_ROW_COUNTS = (1, 2, 16)
_warmed_mask_kernels: set[tuple[str, torch.dtype]] = set()


def warm_mask_kernel(logits: torch.Tensor) -> None:
    """Compile every variant of xgrammar's mask kernel for this device and logits dtype, once. Each
    variant is compiled on its first use; without this, the first batch with 16 constrained rows (or
    with 2) stalls its step on a compile in the middle of serving."""
    key = (str(logits.device), logits.dtype)
    if logits.device.type == "cpu" or key in _warmed_mask_kernels:
        return
    _warmed_mask_kernels.add(key)
    vocab = logits.shape[-1]
    for rows in _MASK_KERNEL_ROW_COUNTS:
        scratch = torch.zeros(rows, vocab, dtype=logits.dtype, device=logits.device)
        bitmask = xgr.allocate_token_bitmask(rows, vocab).to(logits.device)
        xgr.apply_token_bitmask_inplace(scratch, bitmask, indices=list(range(rows)))


def mask_logits(logits: torch.Tensor, requests: Sequence[Any | None]) -> None:
    """Forbid, in place, every token the grammar of a constrained row does not allow next (a None row is
    left as it is)."""
    constrained = _constrained(requests)
    if not constrained.rows:
        return
    warm_mask_kernel(logits)
    bitmask = xgr.allocate_token_bitmask(len(requests), logits.shape[-1])
    for row, state in zip(constrained.rows, constrained.states, strict=True):
        state.matcher.fill_next_token_bitmask(bitmask, row)
    if logits.device.type != "cpu":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=constrained.rows)

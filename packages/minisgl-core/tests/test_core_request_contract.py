"""The request contract: one context-length policy, one range per sampling field, errors that name their
field, params checked once per request, and the caller's id on the request."""

from __future__ import annotations

from typing import Any

import pytest
from tiny_models import MAX_POSITIONS

from minisgl.core import InvalidRequestError, SamplingParams
from minisgl.core.request_checks import check_token_ids, output_budget
from minisgl.core.sampling_params import FLOAT_RANGES

MODEL = "llama"


@pytest.fixture()
def llm(engines: Any) -> Any:
    return engines.get(MODEL, page_size=1, max_prefill_tokens=8192)


# (prompt tokens, max_tokens, context, refuse_overflow) -> budget, or the param an error names
POLICY: list[tuple[int, int | None, int, bool, int | str]] = [
    (10, None, 100, False, 90),  # no max_tokens: the rest of the context
    (10, None, 100, True, 90),
    (10, 5, 100, True, 5),
    (10, 90, 100, True, 90),  # exactly fills the context
    (10, 91, 100, True, "max_tokens"),  # the API refuses an overflow, as vLLM's does
    (10, 91, 100, False, 90),  # offline it is cut at the end of the context
    (99, None, 100, True, 1),  # one generated token still fits
    (100, None, 100, False, "prompt"),  # nothing fits after the prompt
    (0, 4, 100, False, "prompt"),  # empty prompt
]


@pytest.mark.parametrize(("prompt_len", "max_tokens", "context", "refuse", "want"), POLICY)
def test_the_context_length_policy(
    prompt_len: int, max_tokens: int | None, context: int, refuse: bool, want: int | str
) -> None:
    if isinstance(want, int):
        assert output_budget(prompt_len, max_tokens, context, refuse) == want
        return
    with pytest.raises(InvalidRequestError) as info:
        output_budget(prompt_len, max_tokens, context, refuse)
    assert info.value.param == want and str(info.value) == info.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=2.01), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(presence_penalty=-2.5), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(top_k=0), "top_k"),
        (dict(n=0), "n"),
        (dict(seed=1.5), "seed"),
        (dict(logprobs=21), "logprobs"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(stop=[None]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=[None]), "stop_token_ids"),
        (dict(logit_bias={1: 101.0}), "logit_bias"),
        (dict(logit_bias={1: float("nan")}), "logit_bias"),
        (dict(regex="a", ebnf="b"), "ebnf"),
        (dict(grammar_after=""), "grammar_after"),
    ],
)
def test_errors_carry_the_field_they_are_about(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**fields)
    assert info.value.param == param, info.value.message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("prompt", [[None], [1, None], [5, 512], [-1]])
def test_prompt_token_ids_outside_the_vocabulary_are_refused(prompt: list[Any]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_token_ids(prompt, SamplingParams(), vocab_size=512)
    assert info.value.param == "prompt" and "outside the vocabulary" in info.value.message


@pytest.mark.parametrize("name", sorted(FLOAT_RANGES))
def test_each_float_range_is_enforced_at_its_bounds(name: str) -> None:
    accepted = FLOAT_RANGES[name]
    inside = [accepted.high] + ([] if accepted.low_open else [accepted.low])
    for value in inside:
        assert getattr(SamplingParams(**{name: value}), name) == value
    outside = [accepted.high + 0.01, accepted.low - 0.01, float("nan")] + (
        [accepted.low] if accepted.low_open else []
    )
    for value in outside:
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**{name: value})
        assert info.value.param == name and str(accepted) in info.value.message


def test_max_tokens_none_generates_to_the_end_of_the_context(llm: Any) -> None:
    prompt = list(range(3, 3 + MAX_POSITIONS - 10))
    result = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 10


def test_a_request_is_checked_once(llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built params are trusted: generate (2 prompts x n=3) neither validates them again nor checks a
    request's fit more than once per prompt."""
    from minisgl.core.scheduler.scheduler import Scheduler

    params = SamplingParams(temperature=0.0, max_tokens=2, n=3, ignore_eos=True)
    calls = {"validate": 0, "check_fits": 0}
    validate, check_fits = SamplingParams.validate, Scheduler.check_fits

    def counted_validate(self: SamplingParams) -> None:
        calls["validate"] += 1
        validate(self)

    def counted_check_fits(self: Scheduler, *args: Any) -> None:
        calls["check_fits"] += 1
        check_fits(self, *args)

    monkeypatch.setattr(SamplingParams, "validate", counted_validate)
    monkeypatch.setattr(Scheduler, "check_fits", counted_check_fits)
    results = llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)
    assert [len(sample.token_ids) for r in results for sample in r.samples or ()] == [2] * 6
    assert calls == {"validate": 0, "check_fits": 2}


def test_a_field_set_after_building_is_checked_at_the_entry(llm: Any) -> None:
    params = SamplingParams(max_tokens=4)
    params.temperature = 7.0
    with pytest.raises(InvalidRequestError) as info:
        llm.runtime.check_request([5, 6, 7], params)
    assert info.value.param == "temperature"
    assert not llm.runtime.has_work()


def test_requests_carry_the_callers_uid(llm: Any) -> None:
    runtime = llm.runtime
    checked = runtime.check_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=2))
    req = runtime.add_checked(checked, uid=424242)
    assert req.uid == 424242 and req.max_new_tokens == 2
    assert runtime.abort(424242) is req and req.finish_reason == "abort"
    assert not runtime.has_work()

"""Request checks of both endpoints: what is accepted, and the status and `param` of what is not."""

from __future__ import annotations

import json
from typing import Any

import pytest

from minisgl.server.api.protocol import (
    ApiError,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)

MODEL = "smollm2-135m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi"}


def test_chat_defaults() -> None:
    spec = parse_chat(CHAT, MODEL)
    assert spec.chat and spec.n == 1 and not spec.stream and spec.params.max_tokens is None
    assert spec.prompts[0].messages == [{"role": "user", "content": "hi"}]
    assert spec.params.temperature == 1.0 and spec.params.logprobs is None and spec.top_logprobs is None


def test_chat_fields_map_to_sampling_params() -> None:
    body = {
        **CHAT,
        "max_completion_tokens": 9,
        "max_tokens": 100,  # the newer name wins
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 4,
        "min_p": 0.1,
        "seed": 3,
        "n": 2,
        "stop": "END",
        "stop_token_ids": [5],
        "ignore_eos": True,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.2,
        "logprobs": True,
        "top_logprobs": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "ignored",
    }
    spec = parse_chat(body, MODEL)
    p = spec.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (9, 0.0, 0.5, 4, 0.1, 3)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == (["END"], [5], True, 3)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (spec.n, spec.params.stop, spec.top_logprobs, spec.stream, spec.include_usage) == (
        2,
        ["END"],
        3,
        True,
        True,
    )


def test_chat_content_parts_and_developer_role() -> None:
    body = {
        **CHAT,
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    }
    assert parse_chat(body, MODEL).prompts[0].messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]


@pytest.mark.parametrize(
    ("prompt", "kinds"),
    [
        ("text", [("text", "text")]),
        (["a", "b"], [("text", "a"), ("text", "b")]),
        ([1, 2, 3], [("ids", [1, 2, 3])]),
        ([[1], [2, 3]], [("ids", [1]), ("ids", [2, 3])]),
    ],
)
def test_completion_prompt_forms(prompt: Any, kinds: list[tuple[str, Any]]) -> None:
    spec = parse_completion({**COMPLETION, "prompt": prompt}, MODEL)
    got = [("text", p.text) if p.text is not None else ("ids", p.token_ids) for p in spec.prompts]
    assert got == kinds
    assert spec.params.max_tokens == 16


def test_completion_logprobs_is_a_count() -> None:
    spec = parse_completion({**COMPLETION, "logprobs": 0}, MODEL)
    assert spec.top_logprobs == 0 and spec.params.logprobs == 0


def test_model_may_be_left_out() -> None:
    assert parse_completion({"prompt": "x"}, MODEL).model == MODEL


# (endpoint, body changes, status, param)
BAD: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("chat", {"model": "gpt-4"}, 404, "model"),
    ("chat", {"model": 7}, 400, "model"),
    ("chat", {"messages": None}, 400, "messages"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": "hi"}, 400, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content",
    ),
    ("chat", {"messages": ["hi"]}, 400, "messages[0]"),
    ("chat", {"max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"max_completion_tokens": "10"}, 400, "max_completion_tokens"),
    ("chat", {"temperature": "hot"}, 400, "temperature"),
    ("chat", {"temperature": -0.1}, 400, "temperature"),
    ("chat", {"temperature": 2.5}, 400, "temperature"),
    ("chat", {"top_p": 0}, 400, "top_p"),
    ("chat", {"top_p": 1.01}, 400, "top_p"),
    ("chat", {"top_k": -2}, 400, "top_k"),
    ("chat", {"top_k": 1.5}, 400, "top_k"),
    ("chat", {"min_p": 2}, 400, "min_p"),
    ("chat", {"n": 0}, 400, "n"),
    ("chat", {"n": 1000}, 400, "n"),
    ("chat", {"n": True}, 400, "n"),
    ("chat", {"seed": "x"}, 400, "seed"),
    ("chat", {"stop": 5}, 400, "stop"),
    ("chat", {"stop": [""]}, 400, "stop"),
    ("chat", {"stop": ["a"] * 17}, 400, "stop"),
    ("chat", {"stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("chat", {"stop_token_ids": "1"}, 400, "stop_token_ids"),
    ("chat", {"ignore_eos": "yes"}, 400, "ignore_eos"),
    ("chat", {"presence_penalty": 3}, 400, "presence_penalty"),
    ("chat", {"frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ("chat", {"repetition_penalty": 0}, 400, "repetition_penalty"),
    ("chat", {"logprobs": 1}, 400, "logprobs"),
    ("chat", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat", {"stream": "true"}, 400, "stream"),
    ("chat", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat", {"stream": True, "stream_options": []}, 400, "stream_options"),
    ("chat", {"tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("chat", {"tools": {"type": "function"}}, 400, "tools"),
    ("chat", {"response_format": {"type": "yaml"}}, 400, "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {}}}, 400, "response_format"),
    (
        "chat",
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
        400,
        "response_format",
    ),
    ("chat", {"regex": "a(b"}, 400, "regex"),
    ("completion", {"regex": "a(b"}, 400, "regex"),
    ("completion", {"ebnf": "root ::= undefined"}, 400, "ebnf"),
    ("chat", {"regex": 5}, 400, "regex"),
    ("chat", {"regex": "a", "ebnf": 'root ::= "a"'}, 400, "regex"),
    ("chat", {"tool_choice": "required"}, 400, "tool_choice"),
    (
        "chat",
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
        400,
        "tool_choice",
    ),
    ("chat", {"parallel_tool_calls": "no"}, 400, "parallel_tool_calls"),
    ("chat", {"chat_template_kwargs": []}, 400, "chat_template_kwargs"),
    ("chat", {"chat_template_kwargs": {"add_generation_prompt": False}}, 400, "chat_template_kwargs"),
    (
        "chat",
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}]},
        400,
        "messages[0].tool_calls[0]",
    ),
    ("completion", {"prompt": None}, 400, "prompt"),
    ("completion", {"prompt": []}, 400, "prompt"),
    ("completion", {"prompt": [[]]}, 400, "prompt"),
    ("completion", {"prompt": [1, "a"]}, 400, "prompt"),
    ("completion", {"prompt": [-1]}, 400, "prompt"),
    ("completion", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("completion", {"logprobs": True}, 400, "logprobs"),
    ("completion", {"logprobs": 50}, 400, "logprobs"),
    ("completion", {"echo": 1}, 400, "echo"),
    ("completion", {"suffix": "x"}, 400, "suffix"),
    ("completion", {"best_of": 2}, 400, "best_of"),
    ("completion", {"max_tokens": -1}, 400, "max_tokens"),
    ("completion", {"max_tokens": 0, "min_tokens": 1}, 400, "min_tokens"),
    ("completion", {"top_logprobs": 2}, 400, "top_logprobs"),  # a chat field
    ("completion", {"messages": []}, 400, "messages"),
    ("chat", {"echo": True}, 400, "echo"),  # a completions field
    ("chat", {"suffix": "x"}, 400, "suffix"),
    ("chat", {"max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"min_tokens": -1}, 400, "min_tokens"),
    ("chat", {"min_tokens": 5, "max_tokens": 4}, 400, "min_tokens"),
    ("chat", {"min_tokens": "1"}, 400, "min_tokens"),
    ("chat", {"logit_bias": [1]}, 400, "logit_bias"),
    ("chat", {"logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("chat", {"logit_bias": {"5": "1"}}, 400, "logit_bias"),
    ("chat", {"logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("chat", {"logit_bias": {"-5": 1}}, 400, "logit_bias"),
    ("chat", {"user": 5}, 400, "user"),
    ("chat", {"metadata": "x"}, 400, "metadata"),
    ("chat", {"store": True}, 400, "store"),
    ("chat", {"made_up_field": 1}, 400, "made_up_field"),
    ("completion", {"prompt": ["a"] * 600, "n": 2}, 400, "n"),
]


@pytest.mark.parametrize(("endpoint", "change", "status", "param"), BAD, ids=lambda v: str(v)[:40])
def test_bad_requests(endpoint: str, change: dict[str, Any], status: int, param: str | None) -> None:
    base, parse = (CHAT, parse_chat) if endpoint == "chat" else (COMPLETION, parse_completion)
    with pytest.raises(ApiError) as error_info:
        parse({**base, **change}, MODEL)
    error = error_info.value
    assert (error.status, error.param) == (status, param), error.message
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize("body", [[], "x", 3, None])
def test_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(ApiError, match="JSON object"):
        parse_chat(body, MODEL)


def test_structured_output_fields() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {
        **CHAT,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }
    assert json.loads(parse_chat(body, MODEL).params.json_schema or "") == schema
    assert parse_chat({**CHAT, "response_format": {"type": "json_object"}}, MODEL).params.json_schema
    assert parse_chat({**CHAT, "response_format": {"type": "text"}}, MODEL).params.json_schema is None
    assert parse_completion({**COMPLETION, "regex": "[0-9]+"}, MODEL).params.regex == "[0-9]+"


def test_tools_and_forced_calls() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    auto = parse_chat({**CHAT, "tools": [tool]}, MODEL, tool_parser="hermes")
    assert auto.extras.tool_parser == "hermes" and auto.params.ebnf is None
    assert (
        parse_chat({**CHAT, "tools": [tool], "tool_choice": "none"}, MODEL, "hermes").extras.tool_parser
        is None
    )
    forced = parse_chat({**CHAT, "tools": [tool], "tool_choice": "required"}, MODEL, tool_parser="hermes")
    assert forced.params.ebnf and "<tool_call>" in forced.params.ebnf
    with pytest.raises(ApiError) as error_info:
        parse_chat({**CHAT, "tools": [tool]}, MODEL, tool_parser=None)
    assert error_info.value.param == "tools"
    # A forced call's grammar is built from the tool's parameters: a schema xgrammar cannot use is a 400.
    broken = {"type": "function", "function": {"name": "g", "parameters": {"type": "nonsense"}}}
    with pytest.raises(ApiError) as error_info:
        parse_chat({**CHAT, "tools": [tool, broken], "tool_choice": "required"}, MODEL, tool_parser="hermes")
    assert (error_info.value.status, error_info.value.param) == (400, "tools[1].function.parameters")
    thinking = parse_chat({**CHAT, "regex": "a"}, MODEL, reasoning_parser="qwen3")
    assert thinking.params.grammar_after == "</think>"
    no_thinking = {**CHAT, "regex": "a", "chat_template_kwargs": {"enable_thinking": False}}
    assert parse_chat(no_thinking, MODEL, reasoning_parser="qwen3").params.grammar_after is None


def test_tool_history_messages() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]  # fmt: skip
    parsed = parse_chat({**CHAT, "messages": messages}, MODEL).prompts[0].messages
    assert parsed is not None
    assert parsed[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert parsed[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}


def test_echo_logprobs_and_score_only() -> None:
    spec = parse_completion({**COMPLETION, "echo": True, "logprobs": 1, "max_tokens": 0}, MODEL)
    assert spec.echo and spec.score_only and spec.params.prompt_logprobs and spec.params.logprobs == 1
    # The engine computes one token after the prompt; the tokenizer worker drops it.
    assert spec.params.max_tokens == 1
    plain = parse_completion({**COMPLETION, "echo": True}, MODEL)
    assert plain.echo and not plain.score_only and not plain.params.prompt_logprobs  # text only: cache on


def test_min_tokens_logit_bias_and_user() -> None:
    body = {
        **CHAT,
        "min_tokens": 3,
        "logit_bias": {"5": -100, "17": 2.5},
        "user": "u-1",
        "metadata": {"a": "b"},
    }
    params = parse_chat(body, MODEL).params
    assert params.min_tokens == 3 and params.logit_bias == {5: -100.0, 17: 2.5}
    # Without max_tokens a chat may answer up to the end of the context (the engine's budget).
    assert params.max_tokens is None


def test_unsupported_and_unknown_fields_name_themselves() -> None:
    for name in ("foo", "functions", "echo"):
        with pytest.raises(ApiError) as error_info:
            parse_chat({**CHAT, name: [{"x": 1}]}, MODEL)
        assert (error_info.value.param, error_info.value.code) == (name, "unsupported_parameter")


def test_tokenize_and_detokenize_bodies() -> None:
    query = parse_tokenize({"model": MODEL, "prompt": "hi", "add_special_tokens": False}, MODEL)
    assert (query.prompt, query.messages, query.add_special_tokens) == ("hi", None, False)
    chat = parse_tokenize({"messages": [{"role": "user", "content": "hi"}]}, MODEL)
    assert chat.messages == [{"role": "user", "content": "hi"}] and chat.add_special_tokens
    assert parse_detokenize({"tokens": [1, 2]}, MODEL).token_ids.tolist() == [1, 2]
    bad: list[tuple[Any, Any, str | None]] = [
        (parse_tokenize, {}, "prompt"),
        (parse_tokenize, {"prompt": "a", "messages": []}, "prompt"),
        (parse_tokenize, {"prompt": 5}, "prompt"),
        (parse_tokenize, {"messages": "x"}, "messages"),
        (parse_tokenize, {"prompt": "a", "add_special_tokens": 1}, "add_special_tokens"),
        (parse_tokenize, {"prompt": "a", "extra": 1}, "extra"),
        (parse_detokenize, {}, "tokens"),
        (parse_detokenize, {"tokens": [1, -2]}, "tokens"),
        (parse_detokenize, {"tokens": "1"}, "tokens"),
    ]
    for parse, body, param in bad:
        with pytest.raises(ApiError) as error_info:
            parse(body, MODEL)
        assert (error_info.value.status, error_info.value.param) == (400, param), body


def test_sampling_ranges_are_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API checks the sampling fields against core's one table, and builds the params once, with
    the model's defaults for the fields left out."""
    from minisgl.core.sampling_params import FLOAT_RANGES, SamplingParams

    for name, accepted in FLOAT_RANGES.items():
        assert getattr(parse_chat({**CHAT, name: accepted.high}, MODEL).params, name) == accepted.high
        with pytest.raises(ApiError) as info:
            parse_chat({**CHAT, name: accepted.high + 0.01}, MODEL)
        assert (info.value.status, info.value.param) == (400, name) and str(accepted) in info.value.message
    calls = []
    validate = SamplingParams.validate
    monkeypatch.setattr(SamplingParams, "validate", lambda self: calls.append(1) or validate(self))
    body = {**CHAT, "n": 3, "seed": 5, "top_p": 0.5, "response_format": {"type": "json_object"}}
    spec = parse_chat(body, MODEL, sampling_defaults={"temperature": 0.6, "top_p": 0.9})
    assert (spec.params.temperature, spec.params.top_p, spec.params.seed) == (0.6, 0.5, 5)
    assert len(calls) == 1

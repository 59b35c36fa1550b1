"""Structured output and tool calling through the official openai client against the real server (the
embedded SmolLM2 on the CPU): Pydantic parsing, JSON schemas validated with jsonschema under concurrency,
forced tool calls and a tool round trip, streamed and not, and the 400s of bad grammars."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from conftest import MODEL, Server
from pydantic import BaseModel, Field

QUESTION = [{"role": "user", "content": "Describe a person as JSON."}]


class Address(BaseModel):
    city: str = Field(max_length=10)


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=2)
    address: Address  # a nested model: the schema refers to it through $defs / $ref


PERSON = Person.model_json_schema()
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=12)
    country: str = Field(max_length=12)
    population: int = Field(ge=0)
    size: Literal["small", "big"]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about Paris as JSON."}],
        response_format=City,
        temperature=0.0,
        max_tokens=120,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)


def test_concurrent_schema_and_free_requests(client: openai.OpenAI) -> None:
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def ask(i: int) -> tuple[bool, Any]:
        constrained = i % 2 == 0
        extra = {"response_format": response_format} if constrained else {}
        reply = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0.8,
            seed=i,
            max_tokens=200 if constrained else 24,
            **extra,
        )
        return constrained, reply.choices[0]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    for constrained, choice in results:
        if constrained:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_regex_extra_field_on_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="My phone number is", max_tokens=20, extra_body={"regex": r" [0-9]{3}-[0-9]{4}"}
    )
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", reply.choices[0].text)


def _call_arguments(call: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])  # type: ignore[index]
    return arguments


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_round_trip(client: openai.OpenAI, choice: Any) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=80,
        temperature=0.7, seed=3,
    )  # fmt: skip
    reply = first.choices[0]
    assert reply.finish_reason == "tool_calls"
    calls = reply.message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].id
    _call_arguments(calls[0])
    history = [
        *ASK_WEATHER,
        reply.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'},
    ]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], max_tokens=20)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content


def test_tool_round_trip_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=80,
        stream=True, temperature=0.7, seed=4,
    )  # fmt: skip
    calls: dict[int, dict[str, str]] = {}
    pieces, finish = 0, None
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function.name if delta.function else None) or ""
            call["arguments"] += (delta.function.arguments if delta.function else None) or ""
            pieces += 1
    assert finish == "tool_calls" and pieces > 2  # the arguments came in pieces
    call = calls[0]
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(json.loads(call["arguments"]), WEATHER_TOOL["function"]["parameters"])  # type: ignore[index]
    history = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        ]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 21}'},
    ]  # fmt: skip
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=MODEL, messages=history, max_tokens=16, stream=True)
        if c.choices
    )
    assert text


def test_chat_template_kwargs_reach_the_template(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        max_tokens=4,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"regex": "a(b"}, "regex"),
        ({"ebnf": "root ::= nothing"}, "ebnf"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "regex"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
    ],
)  # fmt: skip
def test_bad_fields_are_400s_naming_them(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=4, extra_body=extra)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param  # type: ignore[index]

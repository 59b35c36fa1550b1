"""The evaluation API against a live server (SmolLM2-135M, float32, CPU): echo with prompt logprobs
checked against transformers, max_tokens 0, token-id prompts, min_tokens, logit_bias, stop_token_ids,
skip_special_tokens, /tokenize, /detokenize, /version, and an audit that every accepted field is either
honoured or refused."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from typing import Any

import httpx
import openai
import pytest
import torch
from conftest import MODEL, Server

from minisgl.server.api.protocol import CHAT_FIELDS, COMPLETION_FIELDS

LOGPROB_ATOL = 1e-4
EOS = 2  # SmolLM2's <|im_end|>
IM_START = 1  # a special token that is not a stop token
PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of"


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@cache
def hf_model() -> Any:
    """transformers' model from the directory the server itself loads (the GGUF converted once)."""
    from transformers import AutoModelForCausalLM

    from minisgl.core.loading.gguf_cache import converted
    from minisgl.core.loading.model_source import resolve_model

    directory = converted(resolve_model(MODEL)).directory
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(ids: list[int]) -> torch.Tensor:
    """Row p: log_softmax of the logits after tokens 0..p, i.e. the distribution of token p + 1."""
    return torch.log_softmax(hf_model()(torch.tensor([ids])).logits[0].float(), dim=-1)


def tokenize(server: Server, **body: Any) -> list[int]:
    reply = httpx.post(f"{server.url}/tokenize", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    tokens: list[int] = reply.json()["tokens"]
    return tokens


def check_prompt_logprobs(ids: list[int], logprobs: Any) -> None:
    want = hf_logprobs(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.token_logprobs) >= len(ids)
    for p in range(1, len(ids)):
        assert logprobs.token_logprobs[p] == pytest.approx(float(want[p - 1, ids[p]]), abs=LOGPROB_ATOL), p
        best = max(logprobs.top_logprobs[p].values())
        assert best == pytest.approx(float(want[p - 1].max()), abs=LOGPROB_ATOL), p


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_echo_prompt_logprobs_match_transformers_after_a_cache_hit(
    server: Server, client: openai.OpenAI, kind: str
) -> None:
    if kind == "plain":
        ids = tokenize(server, prompt=PROMPT)
    else:
        ids = tokenize(server, messages=[{"role": "user", "content": "Name the capital of France."}])
    # Twice without echo: the second finds the prompt in the prefix cache.
    for _ in range(2):
        warm = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0)
    assert warm.usage is not None and warm.usage.prompt_tokens_details is not None
    assert warm.usage.prompt_tokens_details.cached_tokens == len(ids) - 1
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    (choice,) = scored.choices
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == len(ids)
    check_prompt_logprobs(ids, choice.logprobs)
    assert choice.finish_reason == "length"
    # Prompt logprobs bypass the cache: every prompt token was computed again, none taken from the cache.
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    assert (
        scored.usage.prompt_tokens_details is not None
        and scored.usage.prompt_tokens_details.cached_tokens == 0
    )


def test_echo_with_generation_text_and_stream(server: Server, client: openai.OpenAI) -> None:
    ids = tokenize(server, prompt=PROMPT)
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    (choice,) = reply.choices
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert choice.text == PROMPT + plain.choices[0].text
    logprobs = choice.logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == len(ids) + 3
    assert all(len(top) == 2 for top in (logprobs.top_logprobs or [])[1:])
    check_prompt_logprobs(ids, logprobs)
    offsets = logprobs.text_offset or []
    assert offsets == sorted(offsets) and offsets[0] == 0
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == choice.text


def test_score_only_token_id_prompts(client: openai.OpenAI, server: Server) -> None:
    prompts = [tokenize(server, prompt=PROMPT), tokenize(server, prompt="Once upon a time")]
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    assert [c.index for c in reply.choices] == [0, 1]
    for ids, choice in zip(prompts, reply.choices, strict=True):
        assert choice.logprobs is not None and len(choice.logprobs.token_logprobs or []) == len(ids)
        assert choice.logprobs.top_logprobs is not None and choice.logprobs.top_logprobs[1] == {}
        assert choice.text == httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert reply.usage is not None and reply.usage.completion_tokens == 0
    assert reply.usage.prompt_tokens == sum(map(len, prompts))
    quiet = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert quiet.choices[0].text == "" and quiet.choices[0].finish_reason == "length"


def test_min_tokens_logit_bias_stop_token_ids(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Say hi."}]
    eager = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, logit_bias={str(EOS): 100}
    )
    assert eager.usage is not None and eager.usage.completion_tokens == 1
    held = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, logit_bias={str(EOS): 100}, temperature=0,
        extra_body={"min_tokens": 5},
    )  # fmt: skip
    assert held.usage is not None and held.usage.completion_tokens == 6
    assert held.choices[0].finish_reason == "stop"
    forced = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=5, temperature=0, logprobs=0, logit_bias={"330": 100}
    )
    assert forced.choices[0].logprobs is not None
    tokens = forced.choices[0].logprobs.tokens or []
    assert len(tokens) == 5 and len(set(tokens)) == 1
    stopped = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=5, logit_bias={"330": 100}, extra_body={"stop_token_ids": [330]}
    )
    assert stopped.usage is not None and stopped.usage.completion_tokens == 1
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == ""


def test_skip_special_tokens_and_user(client: openai.OpenAI) -> None:
    def text(skip: bool) -> str:
        reply = client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=2, temperature=0, logit_bias={str(IM_START): 100}, user="eval-1",
            extra_body={"skip_special_tokens": skip},
        )  # fmt: skip
        return reply.choices[0].text

    assert text(True) == "" and text(False) == "<|im_start|>" * 2


def test_tokenize_detokenize_version_models(server: Server) -> None:
    body = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 8192
    from transformers import AutoTokenizer

    from minisgl.core.loading.gguf_cache import converted
    from minisgl.core.loading.model_source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(converted(resolve_model(MODEL)).directory))
    assert body["tokens"] == tokenizer.encode("Hello world")
    messages = [{"role": "user", "content": "Hello"}]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer.encode(want, add_special_tokens=False)
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": "Hello world"}
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [1, "x"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    version = httpx.get(f"{server.url}/version").json()
    import importlib.metadata

    assert version["version"] == importlib.metadata.version("minisgl-server")
    (card,) = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert card["max_model_len"] == 8192


# ---- the audit: every field either changes the answer as it should, or is refused -------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Write about the sea."}], "max_tokens": 8}
COMPLETION = {"model": MODEL, "prompt": "The sea is", "max_tokens": 8}
Check = Callable[[Callable[..., httpx.Response]], None]


def _answer(reply: httpx.Response) -> dict[str, Any]:
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def _text(body: dict[str, Any]) -> str:
    choice = body["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def _greedy(post: Callable[..., httpx.Response], endpoint: str, **fields: Any) -> str:
    return _text(_answer(post(endpoint, temperature=0, **fields)))


def _refused(endpoint: str, field: str, value: Any) -> Check:
    def check(post: Callable[..., httpx.Response]) -> None:
        reply = post(endpoint, **{field: value})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == field

    return check


def _changes_greedy(endpoint: str, **fields: Any) -> Check:
    def check(post: Callable[..., httpx.Response]) -> None:
        assert _greedy(post, endpoint, max_tokens=16, **fields) != _greedy(post, endpoint, max_tokens=16)

    return check


def _like_greedy(**fields: Any) -> Check:
    """A filter that leaves only the top token: a hot, seeded sample equals greedy decoding."""

    def check(post: Callable[..., httpx.Response]) -> None:
        hot = _text(_answer(post("chat", temperature=2.0, seed=1, **fields)))
        assert hot == _greedy(post, "chat")

    return check


def _check_model(post: Callable[..., httpx.Response]) -> None:
    assert post("chat", model="other").status_code == 404


def _check_max_tokens(post: Callable[..., httpx.Response]) -> None:
    assert _answer(post("completion", max_tokens=3, ignore_eos=True))["usage"]["completion_tokens"] == 3


def _check_max_completion_tokens(post: Callable[..., httpx.Response]) -> None:
    body = _answer(post("chat", max_completion_tokens=2, ignore_eos=True))
    assert body["usage"]["completion_tokens"] == 2


def _check_temperature(post: Callable[..., httpx.Response]) -> None:
    samples = {_text(_answer(post("chat", temperature=2.0, seed=s))) for s in range(3)}
    assert len(samples) > 1


def _check_n(post: Callable[..., httpx.Response]) -> None:
    assert len(_answer(post("chat", n=2))["choices"]) == 2


def _check_seed(post: Callable[..., httpx.Response]) -> None:
    first, again = (_text(_answer(post("chat", temperature=1.5, seed=7))) for _ in range(2))
    assert first == again != _text(_answer(post("chat", temperature=1.5, seed=8)))


def _check_stop(post: Callable[..., httpx.Response]) -> None:
    full = _greedy(post, "completion")
    cut = _answer(post("completion", temperature=0, stop=[full[3:6]]))
    assert _text(cut) == full[: full.index(full[3:6])] and cut["choices"][0]["finish_reason"] == "stop"


def _check_stop_token_ids(post: Callable[..., httpx.Response]) -> None:
    body = _answer(post("completion", logit_bias={"330": 100}, stop_token_ids=[330]))
    assert body["usage"]["completion_tokens"] == 1 and body["choices"][0]["finish_reason"] == "stop"


def _check_ignore_eos(post: Callable[..., httpx.Response]) -> None:
    body = _answer(post("chat", max_tokens=3, logit_bias={str(EOS): 100}, ignore_eos=True))
    assert body["usage"]["completion_tokens"] == 3


def _check_logprobs(post: Callable[..., httpx.Response]) -> None:
    assert _answer(post("completion", logprobs=2))["choices"][0]["logprobs"]["top_logprobs"]
    chat = _answer(post("chat", logprobs=True))["choices"][0]["logprobs"]["content"]
    assert len(chat) == 8


def _check_top_logprobs(post: Callable[..., httpx.Response]) -> None:
    content = _answer(post("chat", logprobs=True, top_logprobs=3))["choices"][0]["logprobs"]["content"]
    assert all(len(entry["top_logprobs"]) == 3 for entry in content)


def _check_stream(post: Callable[..., httpx.Response]) -> None:
    reply = post("chat", stream=True)
    assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")


def _check_stream_options(post: Callable[..., httpx.Response]) -> None:
    reply = post("completion", stream=True, stream_options={"include_usage": True})
    events = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8


def _check_skip_special_tokens(post: Callable[..., httpx.Response]) -> None:
    bias = {str(IM_START): 100}
    assert (
        _greedy(post, "completion", max_tokens=1, logit_bias=bias, skip_special_tokens=False)
        == "<|im_start|>"
    )
    assert _greedy(post, "completion", max_tokens=1, logit_bias=bias) == ""


def _check_min_tokens(post: Callable[..., httpx.Response]) -> None:
    body = _answer(post("chat", max_tokens=8, logit_bias={str(EOS): 100}, min_tokens=4))
    assert body["usage"]["completion_tokens"] == 5


def _check_logit_bias(post: Callable[..., httpx.Response]) -> None:
    assert _greedy(post, "completion", max_tokens=1, logprobs=0, logit_bias={"330": 100}) != _greedy(
        post, "completion", max_tokens=1
    )


def _check_informational(field: str, value: Any) -> Check:
    """Fields that OpenAI too only records (no effect on the output): accepted, output unchanged."""

    def check(post: Callable[..., httpx.Response]) -> None:
        assert _greedy(post, "chat", **{field: value}) == _greedy(post, "chat")

    return check


def _check_echo(post: Callable[..., httpx.Response]) -> None:
    assert _greedy(post, "completion", echo=True).startswith(COMPLETION["prompt"])


def _check_required(post: Callable[..., httpx.Response]) -> None:
    for endpoint, field in (("chat", "messages"), ("completion", "prompt")):
        reply = post(endpoint, **{field: None})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field


ENUM_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}


def _check_response_format(post: Callable[..., httpx.Response]) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": ENUM_SCHEMA}}
    text = _greedy(post, "chat", response_format=schema, max_tokens=32)
    assert json.loads(text)["answer"] in ("yes", "no")


def _check_regex(post: Callable[..., httpx.Response]) -> None:
    assert re.fullmatch("[0-9]{3}", _greedy(post, "completion", regex="[0-9]{3}", max_tokens=8))


def _check_ebnf(post: Callable[..., httpx.Response]) -> None:
    assert _greedy(post, "completion", ebnf='root ::= "yes" | "no"', max_tokens=8) in ("yes", "no")


def _tool_calls(post: Callable[..., httpx.Response], **fields: Any) -> list[dict[str, Any]]:
    body = _answer(post("chat", temperature=0, max_tokens=64, tools=[TOOL], **fields))
    calls: list[dict[str, Any]] = body["choices"][0]["message"].get("tool_calls") or []
    return calls


def _check_tools(post: Callable[..., httpx.Response]) -> None:
    calls = _tool_calls(post, tool_choice="required")
    assert calls and calls[0]["function"]["name"] == "lookup"


def _check_tool_choice(post: Callable[..., httpx.Response]) -> None:
    named = {"type": "function", "function": {"name": "lookup"}}
    assert [c["function"]["name"] for c in _tool_calls(post, tool_choice=named)][:1] == ["lookup"]
    assert _tool_calls(post, tool_choice="none") == []


def _check_parallel_tool_calls(post: Callable[..., httpx.Response]) -> None:
    assert len(_tool_calls(post, tool_choice="required", parallel_tool_calls=False)) == 1


def _check_chat_template_kwargs(post: Callable[..., httpx.Response]) -> None:
    """SmolLM2's template reads no extra variables: accepted, output unchanged; not an object: refused."""
    assert _greedy(post, "chat", chat_template_kwargs={"enable_thinking": False}) == _greedy(post, "chat")
    assert post("chat", chat_template_kwargs=[1]).status_code == 400


FIELD_CHECKS: dict[str, Check] = {
    "model": _check_model,
    "messages": _check_required,
    "prompt": _check_required,
    "max_tokens": _check_max_tokens,
    "max_completion_tokens": _check_max_completion_tokens,
    "temperature": _check_temperature,
    "top_p": _like_greedy(top_p=1e-6),
    "top_k": _like_greedy(top_k=1),
    "min_p": _like_greedy(min_p=1.0),
    "n": _check_n,
    "seed": _check_seed,
    "stop": _check_stop,
    "stop_token_ids": _check_stop_token_ids,
    "ignore_eos": _check_ignore_eos,
    "presence_penalty": _changes_greedy("completion", presence_penalty=2.0),
    "frequency_penalty": _changes_greedy("completion", frequency_penalty=2.0),
    "repetition_penalty": _changes_greedy("completion", repetition_penalty=2.0),
    "logprobs": _check_logprobs,
    "top_logprobs": _check_top_logprobs,
    "stream": _check_stream,
    "stream_options": _check_stream_options,
    "skip_special_tokens": _check_skip_special_tokens,
    "min_tokens": _check_min_tokens,
    "logit_bias": _check_logit_bias,
    "user": _check_informational("user", "someone"),
    "metadata": _check_informational("metadata", {"run": "audit"}),
    "echo": _check_echo,
    "tools": _check_tools,
    "functions": _refused("chat", "functions", [{"name": "f"}]),
    "tool_choice": _check_tool_choice,
    "function_call": _refused("chat", "function_call", {"name": "f"}),
    "parallel_tool_calls": _check_parallel_tool_calls,
    "response_format": _check_response_format,
    "regex": _check_regex,
    "ebnf": _check_ebnf,
    "chat_template_kwargs": _check_chat_template_kwargs,
    "audio": _refused("chat", "audio", {"voice": "alloy", "format": "mp3"}),
    "modalities": _refused("chat", "modalities", ["text", "audio"]),
    "prediction": _refused("chat", "prediction", {"type": "content", "content": "x"}),
    "store": _refused("chat", "store", True),
    "service_tier": _refused("chat", "service_tier", "flex"),
    "reasoning_effort": _refused("chat", "reasoning_effort", "low"),
    "web_search_options": _refused("chat", "web_search_options", {}),
    "suffix": _refused("completion", "suffix", " end"),
    "best_of": _refused("completion", "best_of", 2),
}


@pytest.mark.parametrize("field", sorted(CHAT_FIELDS | COMPLETION_FIELDS))
def test_every_accepted_field_is_honoured_or_refused(server: Server, field: str) -> None:
    assert field in FIELD_CHECKS, f"'{field}' is accepted by the server but this audit has no check for it"

    def post(endpoint: str, **fields: Any) -> httpx.Response:
        base, path = (CHAT, "chat/completions") if endpoint == "chat" else (COMPLETION, "completions")
        return httpx.post(f"{server.url}/v1/{path}", json={**base, **fields}, timeout=300)

    FIELD_CHECKS[field](post)


def test_unknown_fields_are_refused(server: Server) -> None:
    reply = httpx.post(f"{server.url}/v1/completions", json={**COMPLETION, "temprature": 0}, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "temprature", "code": "unsupported_parameter",
    }  # fmt: skip

"""The official `openai` client against a live server with the real SmolLM2 on the CPU."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import MODEL, Server

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_models(client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert model.id == MODEL and model.object == "model"


def test_chat_capital_of_france(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    assert reply.object == "chat.completion"
    (choice,) = reply.choices
    assert "Paris" in (choice.message.content or "")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=24, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens >= 1


def test_completion_and_stream_agree(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    pieces = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in pieces if c.choices)
    assert streamed == whole.choices[0].text and "Paris" in streamed


def test_n_samples(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a color."}], max_tokens=8, temperature=1.0, n=2, seed=3,
    )  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content for c in reply.choices)
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert reply.usage is not None and 2 <= reply.usage.completion_tokens <= 16


def test_completions_list_of_prompts_and_token_ids(client: openai.OpenAI) -> None:
    ids = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, temperature=0)
    reply = client.completions.create(
        model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=3, temperature=0, n=2
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage is not None and reply.usage.prompt_tokens == 5
    assert ids.usage is not None and ids.usage.prompt_tokens >= 1


def test_stop_string_is_cut(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    free = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)  # type: ignore[arg-type]
    full = free.choices[0].message.content or ""
    assert "5" in full, full
    cut = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0, stop=["5"]
    )  # type: ignore[arg-type]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index("5")]
    streamed = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0, stop=["5", "nope"], stream=True,  # type: ignore[arg-type]
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index("5")]


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,  # type: ignore[arg-type]
    )  # fmt: skip
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy: the top one
    text = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = text.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 4
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])
    assert "".join(logprobs.tokens or []) == text.choices[0].text


def test_repeated_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": "Describe a quiet harbour town at dawn in two sentences, please."}
    ]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert first.usage is not None and second.usage is not None
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached is not None and cached >= second.usage.prompt_tokens // 2


def test_sampling_options_are_accepted(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=6, temperature=0.8, top_p=0.9, seed=1,  # type: ignore[arg-type]
        presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "stop_token_ids": [2]},
    )  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length")
    ignore = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert ignore.usage is not None and ignore.usage.completion_tokens == 12


def test_health_and_metrics(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    text = httpx.get(f"{server.url}/metrics").text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    for name in (
        "minisgl:num_requests_running",
        "minisgl:num_requests_waiting",
        "minisgl:kv_pages_used",
        "minisgl:kv_pages_free",
        "minisgl:kv_pages_cached",
        "minisgl:cache_hit_rate",
        "minisgl:prompt_tokens_total",
        "minisgl:generation_tokens_total",
        "minisgl:time_to_first_token_seconds_count",
        "minisgl:time_per_output_token_seconds_count",
        "minisgl:e2e_request_latency_seconds_count",
    ):
        assert name in values, name
    assert values["minisgl:generation_tokens_total"] > 0

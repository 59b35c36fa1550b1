"""The HTTP app over a scripted fake engine: response objects, SSE framing, errors, auth, disconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from bad_requests import BadRequest, load_corpus
from starlette.testclient import TestClient

from minisgl.server import messages as msg
from minisgl.server.api.app import ServerState, build_app
from minisgl.server.engine_client import EngineGone, Generation

MODEL = "tiny"
Script = Callable[[Generation, list[msg.GenerateRequest]], Awaitable[None]]


async def say_hello(generation: Generation, requests: list[msg.GenerateRequest]) -> None:
    """Every request answers "Hello world" in two tokens, then finishes by length."""
    for piece in ("Hello", " world"):
        await asyncio.sleep(0)
        for r in requests:
            logprobs = (
                [[piece, -0.5, [[piece, -0.5], ["x", -2.0]]]] if r.params.logprobs is not None else None
            )
            generation.queue.put_nowait(msg.RequestOutput(r.uid, piece, 1, logprobs))
    for r in requests:
        generation.queue.put_nowait(msg.RequestOutput(r.uid, "", 0, None, "length", 5, 2, 2))


class FakeClient:
    def __init__(self, script: Script = say_hello) -> None:
        self.script = script
        self.submitted: list[list[msg.GenerateRequest]] = []
        self.aborted: list[int] = []
        self.gone: str | None = None
        self.stats_reply: dict[str, Any] | Exception = {
            "num_running": 0,
            "num_waiting": 0,
            "pages_total": 10,
            "pages_free": 10,
        }
        self._uid = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_message_at: float | None = None

    def new_uid(self) -> int:
        self._uid += 1
        return self._uid

    def submit(self, requests: list[msg.GenerateRequest]) -> Generation:
        generation = Generation(self, [r.uid for r in requests])  # type: ignore[arg-type]
        self.submitted.append(requests)
        task = asyncio.get_running_loop().create_task(self.script(generation, requests))
        self._tasks.add(task)
        return generation

    def abort(self, uids: list[int], worker: int = 0) -> None:
        self.aborted.extend(uids)

    def _release(self, uids: list[int]) -> None:
        pass

    async def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        if isinstance(self.stats_reply, Exception):
            raise self.stats_reply
        return self.stats_reply


def make(script: Script = say_hello, api_key: str | None = None) -> tuple[TestClient, FakeClient]:
    fake = FakeClient(script)
    state = ServerState(fake, model_name=MODEL, model_path="/models/tiny", context_length=64, api_key=api_key)  # type: ignore[arg-type]
    return TestClient(build_app(state)), fake


def sse_events(text: str) -> list[Any]:
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), frames
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[len("data: ") :]) for f in frames[:-1]]


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_chat_completion() -> None:
    http, fake = make()
    response = http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    body = response.json()
    assert (
        body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    )
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    (request,) = fake.submitted[0]
    assert request.messages == [{"role": "user", "content": "hi"}] and request.params.max_tokens == 4


def test_chat_stream_with_usage() -> None:
    http, _ = make()
    body = {**CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    text = {0: "", 1: ""}
    finish = {}
    for event in events[2:-1]:
        (choice,) = event["choices"]
        text[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
        assert event["usage"] is None
    assert text == {0: "Hello world", 1: "Hello world"} and finish == {0: "length", 1: "length"}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_completions_many_prompts_n_and_seeds() -> None:
    http, fake = make()
    response = http.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "seed": 7, "logprobs": 1})
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == "Hello world"
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["Hello", " world"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"Hello": -0.5, "x": -2.0}, {" world": -0.5, "x": -2.0}],
        "text_offset": [0, 5],
    }
    assert body["usage"]["prompt_tokens"] == 10  # two prompts, each counted once
    requests = fake.submitted[0]
    assert [r.prompt for r in requests] == ["a", "a", "b", "b"]
    assert [r.params.seed for r in requests] == [7, 8, 7, 8]


def test_chat_logprobs_shape() -> None:
    http, _ = make()
    body = http.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 1}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "Hello",
        "logprob": -0.5,
        "bytes": list(b"Hello"),
        "top_logprobs": [
            {"token": "Hello", "logprob": -0.5, "bytes": list(b"Hello")},
            {"token": "x", "logprob": -2.0, "bytes": [120]},
        ],
    }


async def refuse(generation: Generation, requests: list[msg.GenerateRequest]) -> None:
    generation.queue.put_nowait(
        msg.RequestError([r.uid for r in requests], 503, "queue full", None, "queue_full")
    )


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusal_is_a_real_status_even_for_streams(stream: bool) -> None:
    http, _ = make(refuse)
    response = http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "queue full",
        "type": "server_error",
        "param": None,
        "code": "queue_full",
    }


async def die_midway(generation: Generation, requests: list[msg.GenerateRequest]) -> None:
    generation.queue.put_nowait(msg.RequestOutput(requests[0].uid, "Hel", 1))
    await asyncio.sleep(0)
    generation.queue.put_nowait(EngineGone("scheduler died"))


def test_engine_death_mid_stream_ends_the_stream() -> None:
    http, _ = make(die_midway)
    response = http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    frames = [f for f in response.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    assert any('"error"' in f and "scheduler died" in f for f in frames)
    last = json.loads(frames[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "abort"


@pytest.mark.parametrize(
    ("method", "path", "data", "status"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b"", 400),
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
            400,
        ),
        ("POST", "/v1/completions", b"[1, 2]", 400),
        ("POST", "/v1/completions", b"\xff\xfe", 400),
        ("GET", "/v1/chat/completions", None, 405),
        ("GET", "/v1/nothing", None, 404),
        ("GET", "/v1/models/other", None, 404),
    ],
)
def test_errors_are_openai_error_objects(method: str, path: str, data: bytes | None, status: int) -> None:
    http, fake = make()
    response = http.request(method, path, content=data)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert not fake.submitted


def test_models() -> None:
    http, _ = make()
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert body["data"][0] | {"created": 0} == {
        "id": MODEL, "object": "model", "created": 0, "owned_by": "minisgl", "root": "/models/tiny", "max_model_len": 64,
    }  # fmt: skip
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_api_key() -> None:
    http, _ = make(api_key="sesame")
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert (
        http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sesame"}).status_code
        == 200
    )
    assert http.get("/health").status_code == 200  # health and metrics stay open to probes


def test_health_follows_the_engine() -> None:
    http, fake = make()
    assert http.get("/health").json()["status"] == "ok"
    fake.stats_reply = TimeoutError()
    response = http.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "unhealthy"
    fake.last_message_at = time.monotonic() - 1  # outputs still flow: a long step, not a hang
    response = http.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "busy"
    fake.last_message_at = time.monotonic() - 60
    assert http.get("/health").status_code == 503


def test_metrics_after_a_request() -> None:
    http, _ = make()
    http.post("/v1/chat/completions", json=CHAT)
    text = http.get("/metrics").text
    for line in (
        'minisgl:num_requests_running{model_name="tiny"} 0',
        'minisgl:prompt_tokens_total{model_name="tiny"} 5',
        'minisgl:generation_tokens_total{model_name="tiny"} 2',
        'minisgl:cache_hit_rate{model_name="tiny"} 0.4',
        'minisgl:request_success_total{model_name="tiny",finished_reason="length"} 1',
        'minisgl:e2e_request_latency_seconds_count{model_name="tiny"} 1',
        'minisgl:time_to_first_token_seconds_count{model_name="tiny"} 1',
        'minisgl:time_per_output_token_seconds_count{model_name="tiny"} 1',
    ):
        assert line in text, line


# ---- disconnects, driven at the ASGI level ------------------------------------------------------------


async def never_finish(generation: Generation, requests: list[msg.GenerateRequest]) -> None:
    while True:
        for r in requests:
            generation.queue.put_nowait(msg.RequestOutput(r.uid, "x", 1))
        await asyncio.sleep(0.01)


async def silent(generation: Generation, requests: list[msg.GenerateRequest]) -> None:
    await asyncio.sleep(3600)


async def _call_then_disconnect(script: Script, body: dict[str, Any], after_chunks: int) -> FakeClient:
    fake = FakeClient(script)
    app = build_app(ServerState(fake, model_name=MODEL, model_path="x"))  # type: ignore[arg-type]
    disconnect = asyncio.Event()
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if sum(m["type"] == "http.response.body" for m in sent) >= after_chunks:
            disconnect.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.1"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
    }  # fmt: skip
    if after_chunks == 0:
        asyncio.get_running_loop().call_later(0.05, disconnect.set)
    await asyncio.wait_for(app(scope, receive, send), 5)
    return fake


def test_a_client_that_leaves_mid_stream_aborts_its_requests() -> None:
    fake = asyncio.run(_call_then_disconnect(never_finish, {**CHAT, "stream": True, "n": 2}, after_chunks=5))
    assert sorted(fake.aborted) == [1, 2]


def test_a_client_that_leaves_while_waiting_aborts_its_request() -> None:
    fake = asyncio.run(_call_then_disconnect(silent, CHAT, after_chunks=0))
    assert fake.aborted == [1]


def test_coalesce_joins_each_requests_outputs_in_order() -> None:
    from minisgl.server.engine_client import coalesce

    outputs = [
        msg.RequestOutput(1, "He", 1, [["He", -0.1, []]]),
        msg.RequestOutput(2, "A", 1),
        msg.RequestOutput(1, "llo", 2, [["l", -0.2, []], ["lo", -0.3, []]]),
        msg.RequestOutput(2, "", 0, None, "stop", 3, 1, 1),
        msg.RequestOutput(1, "!", 1, [["!", -0.4, []]], "length", 4, 0, 4),
    ]
    first, second = coalesce(outputs)
    assert first == msg.RequestOutput(
        1,
        "Hello!",
        4,
        [["He", -0.1, []], ["l", -0.2, []], ["lo", -0.3, []], ["!", -0.4, []]],
        "length",
        4,
        0,
        4,
    )
    assert second == msg.RequestOutput(2, "A", 1, None, "stop", 3, 1, 1)
    assert coalesce([outputs[1]]) == [outputs[1]]


async def burst(generation: Generation, requests: list[msg.GenerateRequest]) -> None:
    """Every request's first token, then 19 more and the finish all at once: a stream that fell behind."""
    for r in requests:
        generation.queue.put_nowait(msg.RequestOutput(r.uid, "t0", 1))
    await asyncio.sleep(0.05)
    for i in range(1, 20):
        for r in requests:
            generation.queue.put_nowait(msg.RequestOutput(r.uid, f" t{i}", 1))
    for r in requests:
        generation.queue.put_nowait(msg.RequestOutput(r.uid, "", 0, None, "length", 3, 0, 20))


@pytest.mark.parametrize("chat", [True, False])
def test_a_stream_that_falls_behind_catches_up_in_merged_chunks(chat: bool) -> None:
    http, _ = make(burst)
    if chat:
        body: dict[str, Any] = {**CHAT, "n": 2, "max_tokens": 20}
        path = "/v1/chat/completions"
    else:
        body = {"model": MODEL, "prompt": "x", "n": 2, "max_tokens": 20}
        path = "/v1/completions"
    body.update(stream=True, stream_options={"include_usage": True})
    events = sse_events(http.post(path, json=body).text)
    text = {0: "", 1: ""}
    finish = {}
    token_chunks = 0
    for event in events[:-1]:
        for choice in event["choices"]:
            piece = choice["delta"].get("content", "") if chat else choice["text"]
            text[choice["index"]] += piece
            token_chunks += bool(piece)
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    expected = "t0" + "".join(f" t{i}" for i in range(1, 20))
    assert text == {0: expected, 1: expected} and finish == {0: "length", 1: "length"}
    assert token_chunks < 2 * 20  # the 19 late tokens of each choice did not each get a chunk
    assert events[-1]["usage"]["completion_tokens"] == 40


# ---- bad input: the corpus, body limits ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [b for b in load_corpus(MODEL) if not b.engine], ids=str)
def test_bad_request_corpus(bad: BadRequest) -> None:
    http, fake = make()
    response = http.post(bad.path, content=bad.content, headers={"content-type": "application/json"})
    assert response.status_code == bad.status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if bad.param is not None:
        assert error["param"] == bad.param, error
    assert not fake.submitted


def test_a_body_over_the_limit_is_413_before_it_is_read() -> None:
    fake = FakeClient()
    app = build_app(ServerState(fake, model_name=MODEL, model_path="x", max_request_bytes=1000))  # type: ignore[arg-type]
    http = TestClient(app)
    assert http.post("/v1/chat/completions", json={**CHAT, "stop": "x" * 900}).status_code == 200
    big = json.dumps({**CHAT, "stop": "x" * 1000}).encode()
    response = http.post("/v1/chat/completions", content=big)
    assert response.status_code == 413 and "--max-request-bytes" in response.json()["error"]["message"]

    def chunked() -> Any:  # no Content-Length: the limit holds while reading
        yield big[:600]
        yield big[600:]

    assert http.post("/v1/completions", content=chunked()).status_code == 413
    assert len(fake.submitted) == 1


def test_a_prompt_far_beyond_the_context_is_refused_before_tokenizing() -> None:
    fake = FakeClient()
    state = ServerState(fake, model_name=MODEL, model_path="x", context_length=64, longest_token=4)  # type: ignore[arg-type]
    http = TestClient(build_app(state))
    response = http.post("/v1/completions", json={"prompt": ["ok", "x" * 256]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    chat = {
        **CHAT,
        "messages": [{"role": "user", "content": "x" * 200}, {"role": "user", "content": "y" * 56}],
    }
    response = http.post("/v1/chat/completions", json=chat)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert http.post("/v1/completions", json={"prompt": "x" * 255}).status_code == 200  # maybe 63 tokens
    assert len(fake.submitted) == 1


def test_generation_config_defaults_fill_only_what_the_request_leaves_out() -> None:
    fake = FakeClient()
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    state = ServerState(fake, model_name=MODEL, model_path="x", sampling_defaults=defaults)  # type: ignore[arg-type]
    http = TestClient(build_app(state))
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert (
        http.post("/v1/completions", json={"prompt": "x", "temperature": 0, "top_k": None}).status_code == 200
    )
    first, second = (group[0].params for group in fake.submitted)
    assert (first.temperature, first.top_p, first.top_k) == (0.6, 0.9, 20)
    assert (second.temperature, second.top_p, second.top_k) == (0.0, 0.9, 20)


def test_metrics_split_kv_use_count_errors_and_say_when_the_scheduler_is_silent() -> None:
    http, fake = make()
    fake.stats_reply = {
        "num_running": 1, "num_waiting": 0, "pages_total": 10, "pages_free": 1, "pages_used": 9, "pages_cached": 8,
    }  # fmt: skip
    assert http.post("/v1/chat/completions", json={**CHAT, "n": 0}).status_code == 400
    assert http.post("/v1/chat/completions", content=b"{").status_code == 400
    assert http.get("/v1/nothing").status_code == 404
    text = http.get("/metrics").text
    for line in (
        'minisgl:scheduler_up{model_name="tiny"} 1',
        'minisgl:kv_pages_free{model_name="tiny"} 1',
        'minisgl:kv_pages_cached{model_name="tiny"} 8',
        'minisgl:kv_pages_in_use{model_name="tiny"} 1',
        'minisgl:kv_cache_usage_ratio{model_name="tiny"} 0.1',
        'minisgl:request_rejected_total{model_name="tiny",status="400",reason="invalid_json"} 1',
        'minisgl:request_rejected_total{model_name="tiny",status="400",reason="invalid_request_error"} 1',
        'minisgl:request_rejected_total{model_name="tiny",status="404",reason="not_found_error"} 1',
    ):
        assert line in text, line
    fake.stats_reply = TimeoutError()
    text = http.get("/metrics").text
    assert 'minisgl:scheduler_up{model_name="tiny"} 0' in text and "kv_pages_free" not in text


def test_log_requests_names_the_response_and_the_status(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeClient()
    http = TestClient(build_app(ServerState(fake, model_name=MODEL, model_path="x", log_requests=True)))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="minisgl.server.api"):
        reply = http.post("/v1/chat/completions", json=CHAT).json()
        http.post("/v1/chat/completions", json={**CHAT, "n": 0})
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"{reply['id']} (request 1): 200, finished (length)") for line in lines), lines
    assert any(
        line.startswith("POST /v1/chat/completions: 400 invalid_request_error (param n)") for line in lines
    )

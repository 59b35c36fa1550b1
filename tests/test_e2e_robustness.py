"""A live server under bad input, departed clients and overload: it answers each with the right status,
frees what it must, and keeps serving."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MODEL, Server

sys.path.insert(0, str(Path(__file__).parents[1] / "packages" / "minisgl-server" / "tests"))
from bad_requests import load_corpus

CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_tokens": 4,
    "temperature": 0,
}
LONG = "word " * 9000  # more tokens than the 8192-token context

# (path, raw body or JSON body, status, error param)
BAD_INPUT: list[tuple[str, Any, int, str | None]] = [
    ("/v1/chat/completions", b"{broken json", 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/chat/completions", b"[1, 2, 3]", 400, None),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-17"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": 42}]},
        400,
        "messages[0].content",
    ),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "four"}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 7}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "top_k": -5}, 400, "top_k"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "stop": 3}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 9}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG}]}, 400, "prompt"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": LONG}], "stream": True},
        400,
        "prompt",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 8200}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": "yes"}, 400, "logprobs"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
]


def test_bad_input_then_a_good_request(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for path, body, status, param in BAD_INPUT:
            if isinstance(body, bytes):
                response = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                response = http.post(path, json=body)
            assert response.status_code == status, (path, str(body)[:80], response.text[:300])
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param, (str(body)[:80], error)
        good = http.post("/v1/chat/completions", json=CHAT)
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]
        assert http.get("/health").status_code == 200


def test_the_bad_request_corpus_gets_4xx_and_the_server_answers_after(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for bad in load_corpus(MODEL):
            response = http.post(bad.path, content=bad.content, headers={"content-type": "application/json"})
            assert response.status_code == bad.status, (str(bad), response.text[:300])
            error = response.json()["error"]
            if bad.param is not None:
                assert error["param"] == bad.param, (str(bad), error)
        assert http.get("/health").status_code == 200
        good = http.post("/v1/chat/completions", json=CHAT)
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]
    assert "Traceback" not in server.log.read_text()
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines()
    rejected = [line for line in metrics if line.startswith("minisgl:request_rejected_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in rejected) >= len(load_corpus(MODEL)), rejected


def test_huge_bodies_are_refused_without_stalling_others(server: Server) -> None:
    """A body over --max-request-bytes gets 413; one under it but far beyond the context gets 400 before it
    is tokenized; meanwhile /health and a small request are answered at once."""
    huge = b'{"prompt": "' + b"x" * (17 << 20) + b'"}'
    big = b'{"prompt": "' + b"word " * (2 << 20) + b'"}'  # 10 MB of text
    statuses: dict[str, int] = {}

    def send(name: str, content: bytes) -> None:
        response = httpx.post(f"{server.url}/v1/completions", content=content, timeout=120)
        statuses[name] = response.status_code

    senders = [threading.Thread(target=send, args=item) for item in (("huge", huge), ("big", big)) * 2]
    for sender in senders:
        sender.start()
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    small_done = time.monotonic() - started
    for sender in senders:
        sender.join()
    assert statuses == {"huge": 413, "big": 400}, statuses
    assert small_done < 5, small_done


def _kv(server: Server) -> dict[str, float]:
    """The metrics, once the scheduler's gauges are in them (a busy CPU can delay its answer)."""
    for _ in range(10):
        values = _metrics(server)
        if "num_requests_running" in values:
            values["in_use"] = values["kv_pages_used"] - values["kv_pages_cached"]  # held by requests
            return values
    raise AssertionError("/metrics never included the scheduler's gauges")


def _metrics(server: Server) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith("minisgl:") and "{" in line:
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0].removeprefix("minisgl:")
            if 'finished_reason="abort"' in name:
                key = "aborted"
            values[key] = float(value)
    return values


def _wait_idle(server: Server, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = _kv(server)
        if values["num_requests_running"] == 0 and values["num_requests_waiting"] == 0:
            return values
        assert time.monotonic() < deadline, values
        time.sleep(0.2)


def test_a_dropped_stream_frees_its_kv(server: Server) -> None:
    idle = _wait_idle(server)
    body = {**CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen == 8:  # still reading: the request is running and holds KV pages
                busy = _kv(server)
                assert busy["num_requests_running"] == 1 and busy["in_use"] > idle["in_use"], (idle, busy)
            if seen >= 10:
                break  # leaving the iteration closes the connection
    # Closing the connection mid-stream aborts the request: it leaves the batch and its pages come back.
    deadline = time.monotonic() + 30
    while True:
        after = _kv(server)
        if after["num_requests_running"] == 0 and after["in_use"] == idle["in_use"]:
            break
        assert time.monotonic() < deadline, (idle, after)
        time.sleep(0.2)
    assert after["aborted"] == idle["aborted"] + 1


async def _overload(server: Server, clients: int) -> list[tuple[int, Any]]:
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(240), limits=limits) as http:

        async def one() -> tuple[int, Any]:
            response = await http.post("/v1/completions", json=body)
            return response.status_code, response.json()

        return await asyncio.gather(*(one() for _ in range(clients)))


def test_overload_gets_answers_or_503(server: Server) -> None:
    _wait_idle(server)
    results = asyncio.run(asyncio.wait_for(_overload(server, 64), 300))
    statuses = sorted({status for status, _ in results})
    assert set(statuses) <= {200, 503}, statuses
    served = [body for status, body in results if status == 200]
    refused = [body for status, body in results if status == 503]
    assert len(served) >= 4 and refused, (len(served), len(refused))
    for body in served:
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8
    for body in refused:
        assert body["error"]["code"] == "queue_full"
    # It keeps serving.
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    ok = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=120)
    assert ok.status_code == 200
    assert _wait_idle(server)["in_use"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_stream_options_and_defaults_over_http(server: Server, stream: bool) -> None:
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": stream}  # model left out
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]")
        assert '"usage"' not in response.text  # usage in streams only when asked for

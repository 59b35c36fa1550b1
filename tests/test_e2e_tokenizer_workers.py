"""Two tokenizer/detokenizer processes (`--tokenizer-workers 2`) with the real SmolLM2: requests are dealt
to both, the scheduler sends each worker the tokens of its own requests, and the answers are exactly those
of the shared one-worker server, under a concurrent mix of streams, n samples, stop strings and aborts."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from conftest import (
    MODEL,
    Server,
    child_pids,
    process_name,
    start_server,
    stop_cleanly,
    wait_until,
)

QUESTIONS = ["What is the capital of France?", "Name a color.", "What is 2 + 2?", "Say hello."]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("two-workers"), "--tokenizer-workers", "2")
    try:
        running.wait_ready()
        yield running
    finally:
        stop_cleanly(running, signal.SIGTERM)


def chat(server: Server, question: str, **options: Any) -> Any:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL, messages=messages, **options)  # type: ignore[arg-type]


def test_both_workers_run(two_workers: Server) -> None:
    names = {process_name(pid) for pid in child_pids(two_workers.process.pid)}
    assert {"minisgl-tok0", "minisgl-tok1", "minisgl-sched0"} <= names, names


def test_answers_match_one_worker(two_workers: Server, server: Server) -> None:
    greedy = {"max_tokens": 24, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:
        two = list(pool.map(lambda q: chat(two_workers, q, **greedy), QUESTIONS))
    one = [chat(server, q, **greedy) for q in QUESTIONS]
    assert [r.choices[0].message.content for r in two] == [r.choices[0].message.content for r in one]
    assert "Paris" in (two[0].choices[0].message.content or "")


def test_a_concurrent_mix(two_workers: Server) -> None:
    """Streams, n=2, a stop string (found by the worker that detokenizes it) and an abandoned stream, all
    at once; afterwards nothing is left running."""

    def streamed(question: str) -> str:
        stream = chat(two_workers, question, max_tokens=16, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def abandoned(question: str) -> int:
        body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 200,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{two_workers.url}/v1/chat/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                break
        return r.status_code

    with ThreadPoolExecutor(6) as pool:
        texts = [pool.submit(streamed, q) for q in QUESTIONS]
        samples = pool.submit(
            chat, two_workers, "Tell me a color.", max_tokens=8, temperature=1.0, n=2, seed=3
        )
        stopped = pool.submit(chat, two_workers, QUESTIONS[0], max_tokens=24, temperature=0, stop=["Paris"])
        left = [pool.submit(abandoned, q) for q in QUESTIONS[:2]]
        assert "Paris" in texts[0].result()
        assert all(t.result() for t in texts)
        assert len(samples.result().choices) == 2
        reply = stopped.result().choices[0]
        assert reply.finish_reason == "stop" and "Paris" not in (reply.message.content or "")
        assert [f.result() for f in left] == [200, 200]

    def idle() -> bool:  # the abandoned streams' aborts reach the scheduler a moment after they hang up
        health = httpx.get(f"{two_workers.url}/health", timeout=30).json()
        return bool(health["running"] == 0 and health["waiting"] == 0)

    assert wait_until(idle, 30), httpx.get(f"{two_workers.url}/health", timeout=30).json()

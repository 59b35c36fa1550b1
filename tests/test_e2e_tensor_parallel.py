"""Tensor parallelism through the server: `minisgl serve --tp 2` on one machine, and the same two ranks
as two launches (--nnodes 2) meeting over TCP on localhost. Both must answer exactly what the offline
engine answers at tp=1 on the same weights.

The model is a tiny Llama with the real SmolLM2 tokenizer and random weights (--load-format dummy draws
the same weights at every TP size), so the ranks start in seconds on the CPU.
"""

from __future__ import annotations

import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import (
    Server,
    child_pids,
    free_port,
    leftover_children,
    process_name,
    start_server,
    wait_until,
)

PROMPT = "The capital of France is"
MAX_TOKENS = 12
OPTIONS = ("--load-format", "dummy", "--cpu-kv-cache-gib", "0.1", "--log-level", "info")


@pytest.fixture(scope="module")
def expected(tiny_chat_model: Path) -> str:
    """The offline engine's greedy completion at tp=1."""
    from minisgl.core import LLM, SamplingParams

    llm = LLM(str(tiny_chat_model), device="cpu", dtype="float32", load_format="dummy")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    (result,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert len(result.token_ids) == MAX_TOKENS
    return str(result.text)


def complete(server: Server) -> str:
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["usage"]["completion_tokens"] == MAX_TOKENS
    return str(data["choices"][0]["text"])


def stream(server: Server, index: int) -> tuple[int, str | None]:
    """A streamed completion: (data chunks seen, finish reason). Odd ones hang up after the first chunk
    (the server aborts them)."""
    body = {
        "prompt": f"{PROMPT} {index}",
        "max_tokens": 48,
        "temperature": 0.8,
        "seed": index,
        "stream": True,
    }
    chunks, finish = 0, None
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunks += 1
            finish = json.loads(line[len("data: ") :])["choices"][0].get("finish_reason") or finish
            if index % 2:
                break
    return chunks, finish


def test_tp2_server_answers_like_tp1(
    tmp_path: Path, tiny_chat_model: Path, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every step, the ranks compare the batch they ran and the tokens they sampled.
    monkeypatch.setenv("MINISGL_DEBUG_CHECKS", "1")
    server = start_server(tmp_path, "--model", str(tiny_chat_model), "--tp", "2", *OPTIONS)
    try:
        server.wait_ready()
        names = {process_name(pid) for pid in child_pids(server.process.pid)}
        assert {"minisgl-sched0", "minisgl-sched1", "minisgl-tok"} <= names, names
        assert complete(server) == expected
        assert complete(server) == expected  # the second time from the radix cache, on both ranks
        # Concurrent sampled streams, half of them aborted mid-generation: the aborts reach rank 1 too.
        with ThreadPoolExecutor(8) as pool:
            chunks = list(pool.map(lambda i: stream(server, i), range(8)))
        assert all(count >= 1 for count, _ in chunks), chunks
        assert all(finish == "length" for _, finish in chunks[::2]), chunks
        # Refused requests never reach the other rank: the next one is still answered alike.
        too_long = {"prompt": PROMPT, "max_tokens": 5000}
        refused = httpx.post(f"{server.url}/v1/completions", json=too_long, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens", refused.text
        assert complete(server) == expected
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        children = child_pids(server.process.pid)
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, server.log_tail()
    assert not leftover_children(children)
    log = server.log.read_text()
    assert "TP rank 1 stopped" in log and "Traceback" not in log, server.log_tail()


def test_two_nodes_form_one_server(tmp_path: Path, tiny_chat_model: Path, expected: str) -> None:
    """Node 1 starts first and waits for node 0; node 0 alone serves HTTP; stopping node 0 stops node 1."""
    address = f"127.0.0.1:{free_port()}"
    multi_node = ("--model", str(tiny_chat_model), "--tp", "2", "--nnodes", "2", "--dist-init-addr", address)
    (tmp_path / "node1").mkdir()
    node1 = start_server(tmp_path / "node1", *multi_node, "--node-rank", "1", *OPTIONS)
    node0 = start_server(tmp_path, *multi_node, "--node-rank", "0", *OPTIONS)
    try:
        node0.wait_ready()
        assert complete(node0) == expected
        names = {process_name(pid) for pid in child_pids(node1.process.pid)}
        assert "minisgl-sched1" in names and "minisgl-tok" not in names, names
        with pytest.raises(httpx.HTTPError):  # node 1 serves no HTTP
            httpx.get(f"{node1.url}/health", timeout=2)
    finally:
        code0 = node0.stop(signal.SIGTERM)
        try:
            code1 = node1.process.wait(30)
        except subprocess.TimeoutExpired:
            node1.stop(signal.SIGKILL)
            raise AssertionError(f"node 1 kept running after node 0 stopped:\n{node1.log_tail()}") from None
    assert code0 == 0, node0.log_tail()
    assert code1 == 0, node1.log_tail()
    assert wait_until(lambda: "node 1 stopped" in node1.log.read_text(), 5)

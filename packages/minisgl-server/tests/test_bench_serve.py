"""`minisgl bench serve`: workloads, the client's timing of a stream, and the report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from minisgl.server import bench_serve
from minisgl.server.bench_serve import RequestResult, percentiles, random_workload, summarize, trace_workload


def test_random_workload_is_seeded_and_in_range() -> None:
    a = random_workload(20, (5, 9), (3, 4), float("inf"), seed=1)
    b = random_workload(20, (5, 9), (3, 4), float("inf"), seed=1)
    assert [(w.prompt_ids, w.output_len) for w in a] == [(w.prompt_ids, w.output_len) for w in b]
    assert all(5 <= len(w.prompt_ids) <= 9 and 3 <= w.output_len <= 4 and w.send_at == 0 for w in a)
    paced = random_workload(50, (1, 2), (1, 2), 10.0, seed=1)
    times = [w.send_at for w in paced]
    assert times == sorted(times) and 2.0 < times[-1] < 10.0  # about 50 / 10 s


def test_trace_workload(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 10.0, "input_length": 3, "output_length": 2},
        {"timestamp": 12.0, "input_length": 1, "output_length": 0},
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = trace_workload(trace, time_scale=0.5, limit=None, seed=0)
    assert [(len(w.prompt_ids), w.output_len, w.send_at) for w in items] == [(3, 2, 0.0), (1, 1, 1.0)]


def test_percentiles() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    got = percentiles(values)
    assert (got["p50"], got["p90"], got["p99"], got["max"]) == pytest.approx((50, 90, 99, 100))
    assert percentiles([]) == {}


def fake_server(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "m"}]})
    body = json.loads(request.content)
    if len(body["prompt"]) == 1:
        return httpx.Response(503, json={"error": {"message": "queue full"}})
    chunks = [{"choices": [{"index": 0, "text": "a"}]} for _ in range(body["max_tokens"])]
    chunks.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def test_run_against_a_fake_server() -> None:
    items = [
        bench_serve.WorkItem([1, 2, 3], 4),
        bench_serve.WorkItem([9], 2),
        bench_serve.WorkItem([1, 2], 3),
    ]
    results, start, end = asyncio.run(
        bench_serve.run_workload("http://x", None, items, 2, 0.0, transport=httpx.MockTransport(fake_server))
    )
    assert [r.ok for r in results] == [True, False, True]
    assert results[0].output_tokens == 4 and results[0].ttft is not None and results[0].tpot is not None
    assert "503" in (results[1].error or "")
    report = summarize(results, start, end)
    assert (report.num_ok, report.num_failed, report.output_tokens, report.input_tokens) == (2, 1, 7, 5)
    text = bench_serve.format_report(report)
    for word in ("TTFT", "TPOT", "E2E", "p50", "p90", "p99", "output tok/s"):
        assert word in text


def test_summary_of_nothing() -> None:
    report = summarize([RequestResult(ok=False, input_len=3, error="x")], 0.0, 1.0)
    assert report.num_failed == 1 and report.output_throughput == 0.0


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--input-len", "5", "2"], "--input-len"),
        (["--num-prompts", "0"], "--num-prompts"),
        (["--request-rate", "0"], "--request-rate"),
    ],
)
def test_bad_arguments(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_serve.parse_args(argv)
    assert f"argument {flag}" in capsys.readouterr().err


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        bench_serve.main(["--url", "http://127.0.0.1:9", "--num-prompts", "1", "--input-len", "1", "1"]) == 1
    )

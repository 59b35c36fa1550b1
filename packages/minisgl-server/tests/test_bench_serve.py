"""`minisgl bench serve`: workloads, the client's timing of a stream, and the report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

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


async def fake_server(request: web.Request) -> web.StreamResponse:
    """/v1/completions streams max_tokens one-letter chunks, each in its own write; a one-token prompt is
    refused with 503, and a two-token prompt gets an error frame mid-stream."""
    body = await request.json()
    if len(body["prompt"]) == 1:
        return web.json_response({"error": {"message": "queue full"}}, status=503)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(body["max_tokens"]):
        if i == 1 and len(body["prompt"]) == 2:
            await response.write(b'data: {"error": {"message": "engine died"}}\n\n')
            return response
        await response.write(f"data: {json.dumps({'choices': [{'index': 0, 'text': 'a'}]})}\r\n\r\n".encode())
        await asyncio.sleep(0.002)
    usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
    await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": "m"}]})


async def run_against_fake_server(items: list[bench_serve.WorkItem], model: str | None) -> Any:
    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", fake_server)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        return await bench_serve.run_workload(f"http://127.0.0.1:{port}", model, items, 2, 0.0)
    finally:
        await runner.cleanup()


def test_run_against_a_fake_server() -> None:
    items = [
        bench_serve.WorkItem([1, 2, 3], 4),
        bench_serve.WorkItem([9], 2),
        bench_serve.WorkItem([1, 2, 3, 4], 3),
        bench_serve.WorkItem([1, 2], 3),
    ]
    results, start, end = asyncio.run(run_against_fake_server(items, None))
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[0].output_tokens == 4 and results[0].ttft is not None and results[0].tpot is not None
    assert results[0].tpot > 0.001  # the chunks were timed as they arrived, not all at once at the end
    assert "503" in (results[1].error or "") and results[3].error == "engine died"
    report = summarize(results, start, end)
    assert (report.num_ok, report.num_failed, report.output_tokens, report.input_tokens) == (2, 2, 7, 7)
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

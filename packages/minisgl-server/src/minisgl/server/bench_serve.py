"""`minisgl bench serve`: replay a workload against a running server and report latency and throughput.

Every request is a streamed /v1/completions call with a token-id prompt (exact input lengths, no
tokenizer needed here), `ignore_eos` and `max_tokens` set to the workload's output length, and usage
requested in the stream. Per request the client records the time of each streamed chunk:

    TTFT  first chunk with text - send          TPOT  (last chunk - first chunk) / (output tokens - 1)
    E2E   last chunk - send                     throughput  output tokens / (last finish - first send)

Workloads: random lengths (nano-vllm style: prompts then output lengths from one seeded stream), or a
trace file (JSON lines with input_length, output_length and an optional timestamp in seconds).

    minisgl bench serve --url http://127.0.0.1:1919 --num-prompts 64 --input-len 64 256 --output-len 32 128
    minisgl bench serve --trace qwen_trace.jsonl --time-scale 0.5 --max-concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import aiohttp


@dataclass
class WorkItem:
    prompt_ids: list[int]
    output_len: int
    send_at: float = 0.0  # seconds after the start


@dataclass
class RequestResult:
    ok: bool
    input_len: int
    output_tokens: int = 0
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    started: float = 0.0
    finished: float = 0.0
    error: str | None = None


@dataclass
class Report:
    num_requests: int
    num_ok: int
    num_failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    total_throughput: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    tpot_ms: dict[str, float] = field(default_factory=dict)
    e2e_ms: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# ---- workloads ----------------------------------------------------------------------------------------


def random_workload(
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    request_rate: float,
    seed: int,
    vocab_limit: int = 10000,
) -> list[WorkItem]:
    rng = random.Random(seed)
    prompts = [
        [rng.randint(0, vocab_limit - 1) for _ in range(rng.randint(*input_len))] for _ in range(num_prompts)
    ]
    outputs = [rng.randint(*output_len) for _ in range(num_prompts)]
    items = [WorkItem(p, o) for p, o in zip(prompts, outputs, strict=True)]
    if math.isfinite(request_rate):
        now = 0.0
        for item in items:  # Poisson arrivals at request_rate per second
            now += rng.expovariate(request_rate)
            item.send_at = now
    return items


def trace_workload(
    path: Path, time_scale: float, limit: int | None, seed: int, vocab_limit: int = 10000
) -> list[WorkItem]:
    rng = random.Random(seed)
    rows = _trace_rows(path, limit)
    start = min(float(r.get("timestamp", 0.0)) for r in rows)
    items = []
    for row in rows:
        prompt = [rng.randint(0, vocab_limit - 1) for _ in range(int(row["input_length"]))]
        send_at = (float(row.get("timestamp", 0.0)) - start) * time_scale
        items.append(WorkItem(prompt, max(1, int(row["output_length"])), send_at))
    return items


def _trace_rows(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """The trace's requests (one JSON object a line; blank lines skipped), the first `limit` of them."""
    rows = []
    with path.open() as lines:
        for line in lines:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"trace {path} holds no requests")
    return rows


# ---- the client ---------------------------------------------------------------------------------------


async def sse_data(stream: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The payload of each `data:` line of a server-sent event stream, as it arrives."""
    pending = b""
    async for piece in stream.iter_any():
        *lines, pending = (pending + piece).split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip().decode()


async def run_one(
    session: aiohttp.ClientSession, url: str, model: str, item: WorkItem, temperature: float
) -> RequestResult:
    body = {
        "model": model,
        "prompt": item.prompt_ids,
        "max_tokens": item.output_len,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(ok=False, input_len=len(item.prompt_ids))
    sent = result.started = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return result
            first, last = await _read_stream(response, result)
    except aiohttp.ClientError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if result.error is None:  # the stream did not end with an error
        _finish(result, sent, first, last)
    return result


async def _read_stream(
    response: aiohttp.ClientResponse, result: RequestResult
) -> tuple[float | None, float | None]:
    """Read a completion stream into result (output tokens, or the error it ends with); returns when the
    first and the last text arrived (None, None after an error)."""
    first = last = None
    async for data in sse_data(response.content):
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = str(chunk["error"].get("message"))
            return None, None
        if _take_chunk(chunk, result):
            last = time.perf_counter()
            first = first or last
    return first, last


def _take_chunk(chunk: dict[str, Any], result: RequestResult) -> bool:
    """Count the usage a chunk reports; True when it carries text."""
    if chunk.get("usage"):
        result.output_tokens = int(chunk["usage"]["completion_tokens"])
    return bool(chunk.get("choices") and chunk["choices"][0].get("text"))


def _finish(result: RequestResult, sent: float, first: float | None, last: float | None) -> None:
    """A stream that ended: ok with its latencies, or "no output" when no text arrived."""
    result.finished = time.perf_counter()
    if first is None or last is None:
        result.error = "no output"
        return
    result.ok = True
    result.ttft = first - sent
    result.e2e = last - sent
    if result.output_tokens > 1:
        result.tpot = (last - first) / (result.output_tokens - 1)


async def served_model(session: aiohttp.ClientSession, url: str) -> str:
    """The first model the server lists at /v1/models."""
    async with session.get(f"{url}/v1/models") as response:
        response.raise_for_status()
        models = await response.json()
    try:
        return str(models["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise aiohttp.ClientError(f"{url}/v1/models lists no model; pass --model") from None


async def run_workload(
    url: str,
    model: str | None,
    items: list[WorkItem],
    max_concurrency: int | None,
    temperature: float,
) -> tuple[list[RequestResult], float, float]:
    # aiohttp rather than httpx: its C HTTP parser reads a streamed token for about a quarter of the CPU
    # time, and at tens of thousands of tokens a second a slower client would be what the bench measures.
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = model or await served_model(session, url)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        start = time.perf_counter()

        async def scheduled(item: WorkItem) -> RequestResult:
            delay = item.send_at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                return await run_one(session, url, str(model), item, temperature)
            async with gate:
                return await run_one(session, url, str(model), item, temperature)

        results = await asyncio.gather(*(scheduled(item) for item in items))
        return list(results), start, time.perf_counter()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return {
        "mean": statistics.fmean(ordered) * 1000,
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": ordered[-1] * 1000,
    }


def summarize(results: list[RequestResult], start: float, end: float) -> Report:
    ok = [r for r in results if r.ok]
    duration = max((r.finished for r in ok), default=end) - start
    input_tokens, output_tokens = _token_totals(ok)
    return Report(
        num_requests=len(results),
        num_ok=len(ok),
        num_failed=len(results) - len(ok),
        duration_s=duration,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        request_throughput=_rate(len(ok), duration),
        output_throughput=_rate(output_tokens, duration),
        total_throughput=_rate(input_tokens + output_tokens, duration),
        ttft_ms=_latencies(ok, attrgetter("ttft")),
        tpot_ms=_latencies(ok, attrgetter("tpot")),
        e2e_ms=_latencies(ok, attrgetter("e2e")),
        errors=_first_errors(results),
    )


def _token_totals(ok: list[RequestResult]) -> tuple[int, int]:
    """Input and output tokens of the successful requests."""
    return sum(r.input_len for r in ok), sum(r.output_tokens for r in ok)


def _latencies(ok: list[RequestResult], latency: Callable[[RequestResult], float | None]) -> dict[str, float]:
    return percentiles([value for value in map(latency, ok) if value is not None])


def _first_errors(results: list[RequestResult]) -> list[str]:
    """Up to five distinct error messages, sorted."""
    return sorted({r.error for r in results if r.error})[:5]


def _rate(count: float, duration: float) -> float:
    return count / duration if duration > 0 else 0.0


def format_report(report: Report) -> str:
    lines = [
        f"requests: {report.num_ok} ok, {report.num_failed} failed, in {report.duration_s:.2f} s",
        f"tokens: {report.input_tokens} in, {report.output_tokens} out",
        f"throughput: {report.request_throughput:.2f} req/s, {report.output_throughput:.1f} output tok/s, "
        f"{report.total_throughput:.1f} total tok/s",
        f"{'(ms)':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
    ]
    for name, values in (("TTFT", report.ttft_ms), ("TPOT", report.tpot_ms), ("E2E", report.e2e_ms)):
        if values:
            lines.append(
                f"{name:<6}" + "".join(f"{values[k]:>10.1f}" for k in ("mean", "p50", "p90", "p99", "max"))
            )
    for error in report.errors:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="minisgl bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:1919", help="the server (default %(default)s)")
    parser.add_argument(
        "--model", default=None, help="model name to send (default: the server's, from /v1/models)"
    )
    parser.add_argument("--num-prompts", type=int, default=64, help="requests in the random workload")
    parser.add_argument(
        "--input-len",
        type=int,
        nargs=2,
        default=[64, 512],
        metavar=("MIN", "MAX"),
        help="prompt tokens, uniform",
    )
    parser.add_argument(
        "--output-len",
        type=int,
        nargs=2,
        default=[32, 256],
        metavar=("MIN", "MAX"),
        help="output tokens, uniform",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals per second (default: all at once)",
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--trace", type=Path, default=None, help="JSON-lines trace to replay instead")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply trace timestamps by this")
    parser.add_argument("--trace-limit", type=int, default=None, help="first N trace lines only")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            parser.error(f"argument --{name.replace('_', '-')}: need 1 <= MIN <= MAX, got {low} {high}")
    if args.num_prompts < 1:
        parser.error(f"argument --num-prompts: must be >= 1, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error(f"argument --max-concurrency: must be >= 1, got {args.max_concurrency}")
    if not args.request_rate > 0:
        parser.error(f"argument --request-rate: must be > 0, got {args.request_rate}")


def _workload(args: argparse.Namespace) -> list[WorkItem]:
    """The trace's requests with --trace, else random ones."""
    if args.trace is not None:
        return trace_workload(args.trace, args.time_scale, args.trace_limit, args.seed)
    return random_workload(
        args.num_prompts, tuple(args.input_len), tuple(args.output_len), args.request_rate, args.seed
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    items = _workload(args)
    url = args.url.rstrip("/")
    try:
        results, start, end = asyncio.run(
            run_workload(url, args.model, items, args.max_concurrency, args.temperature)
        )
    except aiohttp.ClientError as exc:
        print(f"minisgl bench serve: {url}: {exc}", file=sys.stderr)
        return 1
    report = summarize(results, start, end)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.num_failed == 0 else 1

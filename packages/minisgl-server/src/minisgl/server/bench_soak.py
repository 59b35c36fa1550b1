"""`minisgl bench soak`: many varied requests against a running server, then proof that it leaked nothing.

Each request draws, from one seeded stream: the endpoint (chat or completions), a prompt of random length
(often sharing a prefix with others, for the prefix cache), max_tokens, temperature, top_p, top_k, a seed,
stop strings, n, streaming, and what the client does: read the whole answer, abort a stream after a few
chunks, or disconnect from a non-streamed request while it runs. After the last request the server must
go idle with every KV page free or in the prefix cache (`minisgl:kv_pages_in_use` 0), answer /health,
and, with --server-pid, its resident memory (the process and its children) must stop growing: the last
sample may exceed the one at half-way by at most --rss-growth-limit.

Run the server with MINISGL_DEBUG_CHECKS=1 to also have the scheduler check the KV cache's integrity
(every page owned exactly once) after every step and abort; a violation stops it, which shows here as
errors.

    MINISGL_DEBUG_CHECKS=1 minisgl serve --device cpu --max-running-requests 16 &
    minisgl bench soak --url http://127.0.0.1:1919 --num-requests 10000 --server-pid $!

The exit status is 0 only with no errors (answers other than the intended aborts), no leaked pages and
no memory growth beyond the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from minisgl.server.bench_serve import served_model, sse_data

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "it",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "be",
    "are",
    "or",
    "an",
    "not",
    "have",
    "which",
    "one",
    "river",
    "stone",
    "light",
    "house",
    "window",
    "music",
    "paper",
    "garden",
    "winter",
    "city",
    "ocean",
    "bridge",
    "forest",
    "letter",
    "morning",
]
SHARED_PREFIX = " ".join(WORDS[i % len(WORDS)] for i in range(0, 400, 7))
IDLE_TIMEOUT_S = 120.0


@dataclass
class SoakCase:
    chat: bool
    prompt: str
    stream: bool
    n: int
    action: str  # "finish", "abort" (a stream, after `chunks` chunks) or "disconnect" (after `delay` s)
    chunks: int = 0
    delay: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)


def make_cases(count: int, seed: int, max_prompt_words: int, max_tokens: int) -> list[SoakCase]:
    rng = random.Random(seed)
    return [_random_case(rng, max_prompt_words, max_tokens) for _ in range(count)]


def _random_case(rng: random.Random, max_prompt_words: int, max_tokens: int) -> SoakCase:
    # The order of the draws fixes the cases of a seed: keep it.
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_prompt_words)))
    prompt = f"{SHARED_PREFIX} {words}" if rng.random() < 0.3 else words
    stream = rng.random() < 0.5
    roll = rng.random()
    action = "finish" if roll < 0.8 else ("abort" if stream else "disconnect")
    params = _random_params(rng, max_tokens)
    return SoakCase(
        chat=rng.random() < 0.5,
        prompt=prompt,
        stream=stream,
        n=rng.choice((1, 1, 1, 2, 3)),
        action=action,
        chunks=rng.randint(0, 4),
        delay=rng.uniform(0.0, 0.5),
        params=params,
    )


def _random_params(rng: random.Random, max_tokens: int) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_tokens": rng.randint(1, max_tokens),
        "temperature": rng.choice((0.0, 0.0, 0.7, 1.0, 1.3)),
        "top_p": rng.choice((1.0, 0.9, 0.5)),
        "top_k": rng.choice((-1, -1, 1, 20)),
    }
    if rng.random() < 0.5:
        params["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.3:
        params["stop"] = rng.sample(WORDS, rng.randint(1, 3))
    if rng.random() < 0.1:
        params["ignore_eos"] = True
    return params


def request_body(case: SoakCase, model: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "n": case.n, "stream": case.stream, **case.params}
    if case.stream:
        body["stream_options"] = {"include_usage": True}
    if case.chat:
        body["messages"] = [{"role": "user", "content": case.prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = case.prompt
    return "/v1/completions", body


async def run_case(session: aiohttp.ClientSession, url: str, model: str, case: SoakCase) -> str:
    """ "ok", "aborted" (the intended early exit) or "error: ..." (anything else)."""
    path, body = request_body(case, model)
    try:
        if case.action == "disconnect":
            try:
                return await asyncio.wait_for(_complete(session, url + path, body, case), case.delay)
            except asyncio.TimeoutError:
                return "aborted"  # the client went away while its request ran
        return await _complete(session, url + path, body, case)
    except (aiohttp.ClientError, ValueError) as exc:
        return f"error: {type(exc).__name__}: {exc}"


async def _complete(session: aiohttp.ClientSession, url: str, body: dict[str, Any], case: SoakCase) -> str:
    async with session.post(url, json=body) as response:
        if response.status != 200:
            return f"error: HTTP {response.status}: {(await response.read())[:200]!r}"
        if not case.stream:
            return _check_choices((await response.json())["choices"], case.n)
        return await _read_stream(response, case)


async def _read_stream(response: aiohttp.ClientResponse, case: SoakCase) -> str:
    """A streamed answer's outcome; an "abort" case goes away after case.chunks chunks."""
    finishes: list[Any] = []
    seen = 0
    async for data in sse_data(response.content):
        if data == "[DONE]":
            return _check_choices(finishes, case.n) if finishes else "error: no finish_reason"
        chunk = json.loads(data)
        if "error" in chunk:
            return f"error: stream error event: {chunk['error'].get('message')}"
        seen += 1
        if case.action == "abort" and seen > case.chunks:
            response.close()  # the client goes away mid-stream
            return "aborted"
        finishes += _finished_choices(chunk)
    return "error: the stream ended without [DONE]"


def _finished_choices(chunk: dict[str, Any]) -> list[Any]:
    return [c for c in chunk.get("choices", []) if c.get("finish_reason")]


def _check_choices(choices: list[Any], n: int) -> str:
    reasons = sorted(str(c.get("finish_reason")) for c in choices)
    if len(reasons) != n or not set(reasons) <= {"stop", "length"}:
        return f"error: finish reasons {reasons} for n={n}"
    return "ok"


# ---- the server's state --------------------------------------------------------------------------------


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The unlabelled-by-reason gauges and counters of /metrics, by name without the prefix."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("minisgl:") and "{" in line:
            name, value = line.rsplit(" ", 1)
            values.setdefault(name.split("{")[0].removeprefix("minisgl:"), float(value))
    return values


async def wait_idle(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        values = await scrape(session, url)
        if (
            values.get("scheduler_up")
            and not values["num_requests_running"]
            and not values["num_requests_waiting"]
        ):
            return values
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not go idle within {IDLE_TIMEOUT_S:g} s: {values}")
        await asyncio.sleep(0.5)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of pid and its descendants (Linux /proc), in MiB."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue  # it exited meanwhile
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        pending += _child_pids(current)
    return total / 1024


def _child_pids(pid: int) -> list[int]:
    """The child processes of every thread of pid (those that exited meanwhile are skipped)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class SoakReport:
    requests: int
    seconds: float
    outcomes: dict[str, int]
    errors: list[str]
    leaked_pages: int
    kv_pages_total: int
    kv_pages_cached: int
    health: int
    rss_mb: list[float]
    rss_growth: float | None  # last sample / half-way sample - 1

    def passed(self, rss_growth_limit: float) -> bool:
        memory_ok = self.rss_growth is None or self.rss_growth <= rss_growth_limit
        return not self.errors and self.leaked_pages == 0 and self.health == 200 and memory_ok


async def soak(args: argparse.Namespace) -> SoakReport:
    cases = make_cases(args.num_requests, args.seed, args.max_prompt_words, args.max_tokens)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0)
    outcomes: Counter[str] = Counter()
    errors: list[str] = []
    rss: list[float] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = args.model or await served_model(session, args.url)
        gate = asyncio.Semaphore(args.concurrency)
        done = 0
        sample_every = max(1, len(cases) // 10)
        if args.server_pid:
            rss.append(tree_rss_mb(args.server_pid))
        start = time.perf_counter()

        async def one(case: SoakCase) -> None:
            nonlocal done
            async with gate:
                outcome = await run_case(session, args.url, model, case)
            outcomes[outcome.split(":")[0]] += 1
            if outcome.startswith("error") and len(errors) < 20:
                errors.append(outcome)
            done += 1
            if args.server_pid and done % sample_every == 0:
                rss.append(tree_rss_mb(args.server_pid))
            if done % max(1, len(cases) // 20) == 0:
                print(f"soak: {done}/{len(cases)} {dict(outcomes)}", file=sys.stderr, flush=True)

        await asyncio.gather(*(one(case) for case in cases))
        seconds = time.perf_counter() - start
        idle = await wait_idle(session, args.url)
        async with session.get(f"{args.url}/health") as response:
            health = response.status
        if args.server_pid:
            rss.append(tree_rss_mb(args.server_pid))
    growth = rss[-1] / rss[len(rss) // 2] - 1 if len(rss) >= 3 else None
    return SoakReport(
        requests=len(cases),
        seconds=seconds,
        outcomes=dict(outcomes),
        errors=errors,
        leaked_pages=int(idle["kv_pages_in_use"]),
        kv_pages_total=int(idle["kv_pages_total"]),
        kv_pages_cached=int(idle["kv_pages_cached"]),
        health=health,
        rss_mb=[round(r, 1) for r in rss],
        rss_growth=growth,
    )


def format_report(report: SoakReport, rss_growth_limit: float) -> str:
    lines = [
        f"requests        {report.requests:,} in {report.seconds:.1f} s ({report.requests / report.seconds:.1f}/s)",
        f"outcomes        {report.outcomes}",
        f"errors          {len(report.errors)} shown: {report.errors[:3]}",
        f"leaked KV pages {report.leaked_pages} (of {report.kv_pages_total:,}; {report.kv_pages_cached:,} cached)",
        f"/health         {report.health}",
    ]
    if report.rss_mb:
        growth = "n/a" if report.rss_growth is None else f"{100 * report.rss_growth:+.1f}%"
        lines.append(
            f"server RSS MiB  {report.rss_mb} (second half {growth}, limit {100 * rss_growth_limit:g}%)"
        )
    lines.append("PASS" if report.passed(rss_growth_limit) else "FAIL")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="minisgl bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:1919", help="the server (default %(default)s)")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's)")
    parser.add_argument(
        "--num-requests", type=int, default=1000, help="requests to send (default %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="requests in flight (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default %(default)s)")
    parser.add_argument(
        "--max-prompt-words", type=int, default=200, help="longest random prompt (default %(default)s)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="largest max_tokens drawn (default %(default)s)"
    )
    parser.add_argument("--server-pid", type=int, default=None, help="sample this process tree's RSS (Linux)")
    parser.add_argument(
        "--rss-growth-limit", type=float, default=0.10,
        help="largest RSS growth over the second half, as a fraction (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--json-out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.num_requests < 1 or args.concurrency < 1:
        parser.error("--num-requests and --concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.url = args.url.rstrip("/")
    report = asyncio.run(soak(args))
    print(format_report(report, args.rss_growth_limit))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.passed(args.rss_growth_limit) else 1

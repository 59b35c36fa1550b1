"""Prometheus metrics, in the text exposition format, with no client library.

Latencies are measured in the API server (from the moment a request is accepted to its outputs arriving),
counters are updated as requests finish, and gauges (running / waiting requests, KV pages) are read from
the scheduler when /metrics is scraped.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PREFIX = "minisgl:"
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        name = PREFIX + self.name
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum{{{labels}}} {self.total}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.labels = f'model_name="{_escape(model_name)}"'
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0
        self.finished: Counter[str] = Counter()
        self.rejected: Counter[tuple[int, str]] = Counter()  # (HTTP status, reason)
        self.ttft = Histogram("time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.tpot = Histogram(
            "time_per_output_token_seconds", "Mean time between output tokens of a request."
        )
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from request arrival to its last token.")

    def request_finished(
        self, reason: str, prompt: int, cached: int, output: int, ttft: float | None, e2e: float
    ) -> None:
        with self.lock:
            self.finished[reason] += 1
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.generation_tokens += output
            if ttft is not None:
                self.ttft.observe(ttft)
                if output > 1:
                    self.tpot.observe((e2e - ttft) / (output - 1))
            self.e2e.observe(e2e)

    def requests_aborted(self, count: int) -> None:
        """Requests whose client went away before they finished."""
        with self.lock:
            self.finished["abort"] += count

    def request_rejected(self, status: int, reason: str) -> None:
        """A request answered with an error status (4xx or 5xx); reason is the error's code or type."""
        with self.lock:
            self.rejected[status, reason] += 1

    def render(self, stats: dict[str, Any] | None) -> str:
        out = _Exposition(self.labels)
        with self.lock:
            # 0 when the scheduler did not answer in time: its gauges below are missing, not zero.
            out.metric(
                "scheduler_up", "gauge", "1 if the scheduler answered this scrape in time, else 0.",
                int(stats is not None),
            )  # fmt: skip
            if stats is not None:
                _scheduler_metrics(out, stats)
            self._request_metrics(out)
        return "\n".join(out.lines) + "\n"

    def _request_metrics(self, out: _Exposition) -> None:
        metric = out.metric
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens)
        metric(
            "generation_tokens_total",
            "counter",
            "Generated tokens of finished requests.",
            self.generation_tokens,
        )
        metric(
            "cached_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            self.cached_tokens,
        )
        hit_rate = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        metric("cache_hit_rate", "gauge", "Cached share of prompt tokens of finished requests.", hit_rate)
        for reason in ("stop", "length", "abort"):
            metric(
                "request_success_total", "counter", "Finished requests by finish reason.",
                self.finished[reason], f',finished_reason="{reason}"',
            )  # fmt: skip
        for status, reason in sorted(self.rejected):
            metric(
                "request_rejected_total", "counter", "Requests answered with an error, by status and reason.",
                self.rejected[status, reason], f',status="{status}",reason="{_escape(reason)}"',
            )  # fmt: skip
        for histogram in (self.ttft, self.tpot, self.e2e):
            out.lines.extend(histogram.render(out.labels))


class _Exposition:
    """Prometheus text lines: a metric's HELP and TYPE before its first sample, then its samples."""

    def __init__(self, labels: str) -> None:
        self.labels = labels
        self.lines: list[str] = []
        self._described: set[str] = set()

    def metric(self, name: str, kind: str, help: str, value: float, extra: str = "") -> None:
        full = PREFIX + name
        if full not in self._described:
            self._described.add(full)
            self.lines.extend([f"# HELP {full} {help}", f"# TYPE {full} {kind}"])
        self.lines.append(f"{full}{{{self.labels}{extra}}} {value}")


def _scheduler_metrics(out: _Exposition, stats: dict[str, Any]) -> None:
    """The scheduler's gauges: its queues and the KV pool's pages."""
    metric = out.metric
    metric(
        "num_requests_running",
        "gauge",
        "Requests in the running batch.",
        stats.get("num_running", 0),
    )
    metric("num_requests_waiting", "gauge", "Requests waiting to run.", stats.get("num_waiting", 0))
    total = stats.get("pages_total", 0)
    free = stats.get("pages_free", 0)
    used = stats.get("pages_used", total - free)
    cached = stats.get("pages_cached", 0)
    metric("kv_pages_total", "gauge", "KV cache pages in the pool.", total)
    metric(
        "kv_pages_used",
        "gauge",
        "KV cache pages not free (held by requests or by the prefix cache).",
        used,
    )
    metric("kv_pages_free", "gauge", "KV cache pages on the free list.", free)
    metric(
        "kv_pages_cached",
        "gauge",
        "KV cache pages held by the prefix cache (reusable: evicted when requests need room).",
        cached,
    )
    metric(
        "kv_pages_in_use",
        "gauge",
        "KV cache pages held only by running requests (used minus cached).",
        used - cached,
    )
    metric(
        "kv_cache_usage_ratio",
        "gauge",
        "Fraction of KV pages held by running requests (the prefix cache's are not counted).",
        (used - cached) / total if total else 0.0,
    )
    metric(
        "num_retractions_total",
        "counter",
        "Requests retracted when KV ran out.",
        stats.get("num_retractions", 0),
    )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

"""The scheduler's activity line: what it computed since the last one, logged every few seconds while it
has work (and once more when it runs out), so that a server's log shows its load and speed:

    12:00:10 INFO minisgl-sched0 minisgl.server.scheduler: 1,497 steps in 10.0 s: 256 running, 0 waiting,
    KV 41.3% used (1,024 pages cached), prompt 13,107 tok/s, generation 25,903 tok/s, 128 finished
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class ActivityLog:
    interval: float  # seconds between lines; 0 turns them off
    clock: Callable[[], float] = time.monotonic
    since: float = 0.0  # start of the current period, set by its first step
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    resting: bool = True  # no work since the last line: the next period starts with the next step

    def record(self, prompt_tokens: int, generated_tokens: int, finished: int) -> None:
        """One completed step."""
        if self.resting:
            self.since, self.resting = self.clock(), False
        self.steps += 1
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens
        self.finished += finished

    def due(self) -> bool:
        return self.interval > 0 and self.steps > 0 and self.clock() - self.since >= self.interval

    def rest(self) -> None:
        """There is no work: the next period starts when work does (idle time is not counted)."""
        self.resting = True

    def take_line(self, stats: Callable[[], Mapping[str, Any]]) -> str | None:
        """The line for the steps recorded so far (None if there were none or lines are off); starts a new
        period. `stats` gives the runtime's counters (called only when there is a line)."""
        if self.interval <= 0 or self.steps == 0:
            return None
        now = self.clock()
        seconds = max(now - self.since, 1e-9)
        counters = stats()
        total, used = int(counters["pages_total"]), int(counters["pages_used"])
        steps = f"{self.steps:,} step{'s' if self.steps != 1 else ''} in {seconds:.1f} s"
        requests = f"{counters['num_running']} running, {counters['num_waiting']} waiting"
        kv = f"KV {100 * used / max(total, 1):.1f}% used ({int(counters['pages_cached']):,} pages cached)"
        rates = (
            f"prompt {self.prompt_tokens / seconds:,.0f} tok/s, "
            f"generation {self.generated_tokens / seconds:,.0f} tok/s"
        )
        line = f"{steps}: {requests}, {kv}, {rates}, {self.finished} finished"
        self.since, self.steps, self.prompt_tokens, self.generated_tokens, self.finished = now, 0, 0, 0, 0
        return line

"""The scheduler's activity line: what it computed since the last one, logged at most once per interval
while there is work (a quiet server logs nothing), so that a server's log shows its load and speed:

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
    last_line: float | None = None  # when the last line was taken (or the first step came)
    busy: float = 0.0  # seconds of work in the finished busy spells since the last line
    spell_start: float | None = None  # start of the current busy spell; None while resting
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0

    def record(self, prompt_tokens: int, generated_tokens: int, finished: int) -> None:
        """One completed step."""
        if self.spell_start is None:
            self.spell_start = self.clock()
        if self.last_line is None:
            self.last_line = self.spell_start
        self.steps += 1
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens
        self.finished += finished

    def due(self) -> bool:
        """A line is due: there were steps, and an interval has passed since the last line. Light
        traffic (a request now and then) so gets one line per interval, not one per request."""
        if self.interval <= 0 or self.steps == 0 or self.last_line is None:
            return False
        return self.clock() - self.last_line >= self.interval

    def rest(self) -> None:
        """There is no work: the busy spell ends (idle time is not counted in the rates)."""
        if self.spell_start is not None:
            self.busy += self.clock() - self.spell_start
            self.spell_start = None

    def _busy_seconds(self, now: float) -> float:
        """Busy time of this period, the current spell included."""
        return self.busy + (now - self.spell_start if self.spell_start is not None else 0.0)

    def take_line(self, stats: Callable[[], Mapping[str, Any]]) -> str | None:
        """The line for the steps recorded so far (None if there were none or lines are off); starts a new
        period. `stats` gives the runtime's counters (called only when there is a line)."""
        if self.interval <= 0 or self.steps == 0:
            return None
        now = self.clock()
        seconds = max(self._busy_seconds(now), 1e-9)
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
        self.last_line, self.busy, self.steps, self.prompt_tokens, self.generated_tokens, self.finished = (
            now,
            0.0,
            0,
            0,
            0,
            0,
        )
        if self.spell_start is not None:
            self.spell_start = now
        return line

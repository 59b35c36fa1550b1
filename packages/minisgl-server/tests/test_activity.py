"""The scheduler's activity line: rates over the period's own time, idle time left out, off at 0."""

from __future__ import annotations

from typing import Any

from minisgl.server.activity import ActivityLog

STATS = {"num_running": 3, "num_waiting": 1, "pages_total": 200, "pages_used": 50, "pages_cached": 1234}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stats() -> dict[str, Any]:
    return STATS


def test_a_line_every_interval_with_rates() -> None:
    clock = Clock()
    log = ActivityLog(10.0, clock)
    log.record(prompt_tokens=0, generated_tokens=0, finished=0)  # the period starts at the first step
    for _ in range(4):
        clock.now += 2.0
        assert not log.due()
        log.record(prompt_tokens=100, generated_tokens=3, finished=1)
    clock.now += 2.0
    assert log.due()
    line = log.take_line(stats)
    assert line == (
        "5 steps in 10.0 s: 3 running, 1 waiting, KV 25.0% used (1,234 pages cached), "
        "prompt 40 tok/s, generation 1 tok/s, 4 finished"
    )
    assert not log.due() and log.take_line(stats) is None  # a new, empty period


def test_idle_time_is_not_counted() -> None:
    clock = Clock()
    log = ActivityLog(10.0, clock)
    log.rest()
    clock.now += 500.0  # a long quiet spell
    log.record(0, 8, 0)
    clock.now += 2.0
    log.record(0, 8, 0)
    log.rest()
    clock.now += 100.0  # idle again
    line = log.take_line(stats)
    assert line is not None and "2 steps in 2.0 s" in line and "generation 8 tok/s" in line


def test_light_traffic_gets_one_line_per_interval_not_one_per_request() -> None:
    clock = Clock()
    log = ActivityLog(10.0, clock)
    lines = []
    for _ in range(25):  # a one-step request every second, idle in between
        log.record(prompt_tokens=10, generated_tokens=1, finished=1)
        clock.now += 0.5
        log.rest()
        clock.now += 0.5
        if log.due():
            lines.append(log.take_line(stats))
    assert len(lines) == 2, lines
    assert lines[0] is not None and lines[0].startswith("10 steps in 5.0 s") and "10 finished" in lines[0]


def test_interval_zero_logs_nothing() -> None:
    clock = Clock()
    log = ActivityLog(0.0, clock)
    log.record(10, 10, 1)
    clock.now += 100.0
    assert not log.due() and log.take_line(stats) is None

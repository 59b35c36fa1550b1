"""Per-step timing for benchmarks: what each completed step ran and how long it took."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from minisgl.core.scheduler.batch import Batch


@dataclass
class StepRecord:
    """One completed step: what it ran and how long it took."""

    is_decode: bool
    num_chunks: int
    num_tokens: int
    kv_tokens: int  # cached plus new tokens the step's attention read
    wall_seconds: float
    host_wait_seconds: float  # of the wall time, the host waiting for the device
    device_seconds: float | None  # set when the engine times steps on the device


@dataclass
class StepTiming:
    """Wall time of steps by kind of the batch they complete. With overlap scheduling a step launches one
    batch and completes the previous one, so the split between kinds is approximate (on the CPU, where a
    launch computes the whole forward pass, it is off by one batch). With device timing on, the device
    time of each step too: wall time minus device time is when the device waited for the host."""

    steps: list[StepRecord] = field(default_factory=list)

    def record(self, batch: Batch, wall: float, host_wait: float, device: float | None) -> None:
        kv_tokens = sum(chunk.end for chunk in batch.chunks)
        self.steps.append(
            StepRecord(
                batch.is_decode, len(batch.chunks), batch.num_tokens, kv_tokens, wall, host_wait, device
            )
        )

    def summary(self) -> str:
        return "; ".join(
            _summary_of(name, [s for s in self.steps if s.is_decode == decode], decode)
            for name, decode in (("prefill", False), ("decode", True))
        )

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.steps]


def _summary_of(name: str, steps: list[StepRecord], decode: bool) -> str:
    """One kind of step's line of StepTiming.summary."""
    wall = sum(s.wall_seconds for s in steps)
    tokens = sum(s.num_tokens for s in steps)
    line = f"{name}: {len(steps)} steps, {tokens} tokens, {wall:.2f} s"
    if decode:
        line += (
            f", mean batch {tokens / max(1, len(steps)):.1f} ({1000 * wall / max(1, len(steps)):.2f} ms/step)"
        )
    line += f", host waited {sum(s.host_wait_seconds for s in steps):.2f} s"
    return line + _device_busy(steps)


def _device_busy(steps: list[StepRecord]) -> str:
    """ "; device busy N s" over the steps timed on the device, or "" when none was."""
    timed = [s.device_seconds for s in steps if s.device_seconds is not None]
    return f"; device busy {sum(timed):.2f} s" if timed else ""

"""Keeping tensor-parallel ranks in lockstep.

Only rank 0 (the leader) takes requests. Every change it makes to its scheduler (a request added, a
request aborted) is also recorded here, and at the start of each step the leader broadcasts what it
recorded since the last step. The followers apply the same changes in the same order and then run the same
step, so every rank schedules the same batches, issues the same collectives, and samples the same tokens
(the same logits, the same seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

from minisgl.core.parallel.distributed import broadcast_from_leader, get_tp
from minisgl.core.request_checks import CheckedRequest


@dataclass(frozen=True)
class AddRequest:
    uid: int
    checked: CheckedRequest


@dataclass(frozen=True)
class AbortRequest:
    uid: int


@dataclass(frozen=True)
class Stop:
    """The leader is shutting down: followers leave their loop."""


ControlMessage = AddRequest | AbortRequest | Stop


class Lockstep:
    def __init__(self) -> None:
        self.size = get_tp().size
        self._outbox: list[ControlMessage] = []

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def record(self, message: ControlMessage) -> None:
        """Leader: queue a change for the followers (they apply it before the next step)."""
        if self.enabled:
            self._outbox.append(message)

    def exchange(self) -> list[ControlMessage]:
        """Collective: the leader's recorded messages, on every rank (the leader's outbox is emptied)."""
        messages: list[ControlMessage] = broadcast_from_leader(self._outbox)
        self._outbox = []
        return messages

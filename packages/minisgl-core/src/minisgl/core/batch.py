"""What one engine step runs: a run of positions of each scheduled request."""

from __future__ import annotations

from dataclasses import dataclass

from minisgl.core.request import Request


@dataclass
class Chunk:
    """Positions [start, end) of `req` are computed this step."""

    req: Request
    start: int
    end: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the request's last known token, so a new token is sampled after it."""
        return self.end == self.req.seq_len


@dataclass
class Batch:
    chunks: list[Chunk]
    is_decode: bool

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)

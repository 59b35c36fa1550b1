"""What one engine step runs: a run of positions of each scheduled request."""

from __future__ import annotations

from dataclasses import dataclass, field

from minisgl.core.request import Request


@dataclass
class Chunk:
    """Positions [start, end) of `req` are computed this step."""

    req: Request
    start: int
    end: int
    # False for a one-token decode step (also when it rides along in a prefill batch).
    is_prefill: bool = True

    # Whether a token is sampled after this chunk, i.e. it reaches the request's last token. Fixed when the
    # chunk is made: launching the batch appends a placeholder for that token to the request.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.end == self.req.seq_len


@dataclass
class Batch:
    chunks: list[Chunk]
    is_decode: bool

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)

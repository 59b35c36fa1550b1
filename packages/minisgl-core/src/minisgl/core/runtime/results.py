"""What a completed step hands back: the batch in flight, the step's result, and the outputs (logprobs,
prompt logprobs) written into each request."""

from __future__ import annotations

from dataclasses import dataclass

from minisgl.core.model_runner.model_runner import PendingStep, StepOutput
from minisgl.core.parallel.distributed import disagreeing_rank, get_tp
from minisgl.core.request import Request
from minisgl.core.scheduler.batch import Batch


@dataclass
class Launched:
    batch: Batch
    pending: PendingStep


@dataclass
class StepResult:
    """What one call of Runtime.step applied: the completed batch (None if it only launched one), the
    tokens it gave each still-live request, and the requests that finished."""

    batch: Batch | None
    new_tokens: list[tuple[Request, int]]
    finished: list[Request]

    @property
    def num_new_tokens(self) -> int:
        return len(self.new_tokens)


def record_logprobs(batch: Batch, live: list[bool], output: StepOutput) -> None:
    """Append each live chunk's prompt logprobs and sampled token's logprob to its request."""
    for i, (chunk, alive, logprob, top) in enumerate(
        zip(batch.chunks, live, output.logprobs, output.top_logprobs, strict=True)
    ):
        if not alive:
            continue
        record_prompt_logprobs(
            chunk.req, chunk.start, output.prompt_logprobs[i], output.prompt_top_logprobs[i]
        )
        if logprob is not None:
            chunk.req.output_logprobs.append(logprob)
            chunk.req.output_top_logprobs.append(top or {})


def live_tokens(batch: Batch, live: list[bool], tokens: list[int | None]) -> list[tuple[Request, int]]:
    """The token each chunk sampled for a request that was still live when the step completed."""
    return [
        (chunk.req, token)
        for chunk, alive, token in zip(batch.chunks, live, tokens, strict=True)
        if alive and token is not None
    ]


def record_prompt_logprobs(
    req: Request, start: int, values: list[float], tops: list[dict[int, float]]
) -> None:
    """Append the logprobs (and top alternatives) of prompt tokens start+1 ... that the request does not
    have yet (a retracted request recomputes positions it already reported)."""
    if not req.params.prompt_logprobs:
        return
    if not req.prompt_logprobs:
        req.prompt_logprobs.append(None)
        req.prompt_top_logprobs.append(None)
    already = max(0, len(req.prompt_logprobs) - (start + 1))
    req.prompt_logprobs.extend(values[already:])
    req.prompt_top_logprobs.extend(tops[already:])


def check_ranks_agree(batch: Batch, tokens: list[int | None]) -> None:
    """MINISGL_DEBUG_CHECKS at tp>1: every rank must have scheduled the same batch and sampled the same
    tokens; a difference means the ranks have drifted apart."""
    mine = ([(c.req.uid, c.start, c.end) for c in batch.chunks], tokens)
    differs = disagreeing_rank(mine)
    if differs is not None:
        rank, theirs = differs
        raise RuntimeError(f"TP ranks disagree: rank {get_tp().rank} ran {mine}, rank {rank} ran {theirs}")

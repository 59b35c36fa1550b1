"""Choosing the next token of every request in a batch: greedy, or temperature with top-k / top-p,
each request drawing from its own generator so that a seeded request gets the same tokens whatever
else shares its batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisgl.core.request import Request


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (batch,) int64, on the device
    # Host lists, only filled for requests that asked for logprobs.
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]


def sample(logits: torch.Tensor, requests: list[Request]) -> SampleOutput:
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, req in enumerate(requests) if not req.params.is_greedy]
    if random_rows:
        tokens[random_rows] = _sample_rows(logits[random_rows], [requests[i] for i in random_rows])
    logprobs, top_logprobs = _logprobs(logits, tokens, requests)
    return SampleOutput(tokens, logprobs, top_logprobs)


def _sample_rows(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([r.params.temperature for r in requests], device=device).unsqueeze(1)
    top_p = torch.tensor([r.params.top_p for r in requests], device=device).unsqueeze(1)
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in requests], device=device)

    sorted_logits, sorted_ids = (logits / temperature).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
    outside_top_p = (probs.cumsum(dim=-1) - probs) > top_p
    probs = probs.masked_fill(outside_top_p, 0.0)

    # Exponential race: argmax(p / E) with E ~ Exp(1) picks index i with probability p_i / sum(p).
    noise = torch.empty_like(probs)
    for row, req in enumerate(requests):
        noise[row].exponential_(generator=req.generator)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    return sorted_ids.gather(1, choice).squeeze(1)


def _logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, requests: list[Request]
) -> tuple[list[float | None], list[dict[int, float] | None]]:
    wanted = [i for i, req in enumerate(requests) if req.params.logprobs is not None]
    chosen: list[float | None] = [None] * len(requests)
    tops: list[dict[int, float] | None] = [None] * len(requests)
    if not wanted:
        return chosen, tops
    logprobs = logits[wanted].log_softmax(dim=-1)
    picked = logprobs.gather(1, tokens[wanted].unsqueeze(1)).squeeze(1).tolist()
    max_k = max(requests[i].params.logprobs or 0 for i in wanted)
    top_values, top_ids = logprobs.topk(max_k, dim=-1) if max_k else (None, None)
    for j, i in enumerate(wanted):
        chosen[i] = picked[j]
        k = requests[i].params.logprobs or 0
        if k and top_values is not None and top_ids is not None:
            tops[i] = dict(zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist(), strict=True))
        else:
            tops[i] = {}
    return chosen, tops

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


def sample(logits: torch.Tensor, requests: list[Request], generator: torch.Generator) -> SampleOutput:
    """Logprobs are those of the model's distribution, before penalties and temperature."""
    raw = logits.float()
    logits = _apply_penalties(raw, requests)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, req in enumerate(requests) if not req.params.is_greedy]
    if random_rows:
        tokens[random_rows] = _sample_rows(logits[random_rows], [requests[i] for i in random_rows], generator)
    logprobs, top_logprobs = _logprobs(raw, tokens, requests)
    return SampleOutput(tokens, logprobs, top_logprobs)


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    rows = [i for i, req in enumerate(requests) if req.params.has_penalties]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        params, req = requests[i].params, requests[i]
        if req.output_ids and (params.presence_penalty or params.frequency_penalty):
            counts = torch.bincount(torch.tensor(req.output_ids, device=logits.device), minlength=vocab)[
                :vocab
            ]
            logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.prompt_ids) | set(req.output_ids)), device=logits.device)
            values = logits[i, seen]
            penalty = params.repetition_penalty
            logits[i, seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def _sample_rows(logits: torch.Tensor, requests: list[Request], generator: torch.Generator) -> torch.Tensor:
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([r.params.temperature for r in requests], device=device).unsqueeze(1)
    top_p = torch.tensor([r.params.top_p for r in requests], device=device).unsqueeze(1)
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in requests], device=device)
    min_p = torch.tensor([r.params.min_p for r in requests], device=device).unsqueeze(1)

    sorted_logits, sorted_ids = (logits / temperature).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
    outside_top_p = (probs.cumsum(dim=-1) - probs) > top_p
    below_min_p = probs < min_p * probs[:, :1]
    probs = probs.masked_fill(outside_top_p | below_min_p, 0.0)

    # Exponential race: argmax(p / E) with E ~ Exp(1) picks index i with probability p_i / sum(p).
    # Requests with a seed draw from their own generator (the same tokens whatever shares the batch);
    # the others share one draw from the engine's generator.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, req in enumerate(requests):
        if req.generator is not None:
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

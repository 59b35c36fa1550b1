"""Choosing the next token of every request in a batch: greedy, or temperature with top-k / top-p,
each request drawing from its own generator so that a seeded request gets the same tokens whatever
else shares its batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisgl.core.model_runner.transfer import to_device
from minisgl.core.request import Request
from minisgl.core.sampling.logit_adjust import adjust_logits
from minisgl.kernels import gumbel_sample


@dataclass
class SampleOutput:
    """Device tensors; nothing here forces a synchronisation."""

    tokens: torch.Tensor  # (batch,) int64
    # Rows (into the batch) of the requests that asked for logprobs, their chosen-token logprob and
    # their top alternatives (k = the largest k asked for; each request keeps its own k).
    logprob_rows: list[int]
    chosen_logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_values: torch.Tensor | None


def sample(
    logits: torch.Tensor,
    requests: list[Request],
    generator: torch.Generator,
    eos_token_ids: frozenset[int] = frozenset(),
    num_generated: list[int] | None = None,
) -> SampleOutput:
    """Logprobs are those of the model's distribution, before logit_bias, penalties and temperature.
    num_generated: per row, the tokens generated before this one (min_tokens); by default the request's
    output_ids, which is right when sampling at launch (a late sample passes what it was then)."""
    if num_generated is None:
        num_generated = [len(r.output_ids) for r in requests]
    # logit_bias and min_tokens change their own rows' logits before either sampler runs, so a batch with
    # such a request stays on the fused path.
    adjusted = adjust_logits(logits, requests, eos_token_ids, num_generated)
    tokens = _sample_plain_batch(adjusted, requests, generator)
    if tokens is None:
        tokens = _sample_general(adjusted, requests, generator)
    return _with_logprobs(logits, tokens, requests)


def _sample_general(
    logits: torch.Tensor, requests: list[Request], generator: torch.Generator
) -> torch.Tensor:
    """Any batch: penalties, top-k / top-p / min-p and per-request seeds, row by row where they differ."""
    logits = _apply_penalties(logits.float(), requests)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, req in enumerate(requests) if not req.params.is_greedy]
    if random_rows:
        index = to_device(random_rows, torch.int64, logits.device)
        tokens[index] = _sample_rows(logits[index], [requests[i] for i in random_rows], generator)
    return tokens


def _sample_plain_batch(
    logits: torch.Tensor, requests: list[Request], generator: torch.Generator
) -> torch.Tensor | None:
    """The common batch (no penalties, no top-k/top-p/min-p, no per-request seed) in one pass over the
    logits: argmax for greedy rows, a Gumbel-max draw at each row's temperature for the others. None when
    the batch is not that simple or the logits are on the CPU (the general path handles it)."""
    if any(_needs_general_path(r) for r in requests):
        return None
    if all(r.params.is_greedy for r in requests):
        return logits.argmax(dim=-1)
    if not _one_pass_sampler_runs(logits):
        return None
    # minisgl-kernels' one-pass kernel: the temperature is applied as the logits are read (a row of 0
    # takes the argmax), so no float32 copy of the batch is divided first.
    inv_temperature = to_device(
        [0.0 if r.params.is_greedy else 1.0 / r.params.temperature for r in requests],
        torch.float32,
        logits.device,
    )
    return gumbel_sample(logits, inv_temperature, generator)


def _one_pass_sampler_runs(logits: torch.Tensor) -> bool:
    """The one-pass kernel runs on CUDA; on the CPU its torch reference would be slower than the general
    path's exponential race, so the CPU keeps that."""
    return logits.is_cuda


def _needs_general_path(req: Request) -> bool:
    params = req.params
    return params.has_penalties or (not params.is_greedy and (_filters(req) or req.generator is not None))


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    rows = [i for i, req in enumerate(requests) if req.params.has_penalties]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        _penalize_row(logits, i, requests[i])
    return logits


def _penalize_row(logits: torch.Tensor, row: int, req: Request) -> None:
    """OpenAI's presence and frequency penalties on the generated tokens, then the repetition penalty on
    the prompt's and the output's tokens, in place."""
    params = req.params
    outputs = req.resolved_output_ids()
    if outputs and (params.presence_penalty or params.frequency_penalty):
        vocab = logits.shape[-1]
        counts = torch.bincount(torch.tensor(outputs, device=logits.device), minlength=vocab)[:vocab]
        logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_ids) | set(outputs)), device=logits.device)
        values = logits[row, seen]
        penalty = params.repetition_penalty
        logits[row, seen] = torch.where(values > 0, values / penalty, values * penalty)


def _sample_rows(logits: torch.Tensor, requests: list[Request], generator: torch.Generator) -> torch.Tensor:
    device = logits.device
    temperature = to_device([r.params.temperature for r in requests], torch.float32, device).unsqueeze(1)
    scaled = logits / temperature
    # Exponential race: argmax_i(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i; in log space
    # that is argmax(logit_i / T - log E_i), which needs no softmax. Requests with a seed draw their noise
    # from their own generator (the same tokens whatever shares the batch); the others share one draw.
    noise = _exponential_(torch.empty_like(scaled), generator)
    for row, req in enumerate(requests):
        if req.generator is not None:
            _exponential_(noise[row], req.generator)
    if not any(_filters(r) for r in requests):
        return (scaled - noise.log()).argmax(dim=-1)
    return _sample_filtered(scaled, noise, requests)


def _exponential_(noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill noise with Exp(1) draws, in place. On the CPU torch's exponential_ is slow (31 ms for 32 rows of
    a 49,152-token vocabulary, on two cores), so draw u ~ U[0, 1) and take -log(1 - u), the same
    distribution, in 9.5 ms. u = 0 gives a draw of 0, whose log is -inf: a masked (-inf) logit would then
    become NaN and win the argmax, so draws are kept above the smallest positive float."""
    if noise.device.type != "cpu":
        return noise.exponential_(generator=generator)
    return (
        noise.uniform_(generator=generator).neg_().log1p_().neg_().clamp_min_(torch.finfo(noise.dtype).tiny)
    )


def _filters(req: Request) -> bool:
    return req.params.top_k > 0 or req.params.top_p < 1.0 or req.params.min_p > 0.0


def _sample_filtered(scaled: torch.Tensor, noise: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Top-k, top-p and min-p in one sort of the vocabulary."""
    device = scaled.device
    vocab = scaled.shape[-1]
    top_p = to_device([r.params.top_p for r in requests], torch.float32, device).unsqueeze(1)
    top_k = to_device(
        [r.params.top_k if r.params.top_k > 0 else vocab for r in requests], torch.int64, device
    )
    min_p = to_device([r.params.min_p for r in requests], torch.float32, device).unsqueeze(1)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
    outside_top_p = (probs.cumsum(dim=-1) - probs) > top_p
    below_min_p = probs < min_p * probs[:, :1]
    probs = probs.masked_fill(outside_top_p | below_min_p, 0.0)
    sorted_noise = noise.gather(1, sorted_ids)
    choice = (probs / sorted_noise).argmax(dim=-1, keepdim=True)
    return sorted_ids.gather(1, choice).squeeze(1)


def _with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, requests: list[Request]) -> SampleOutput:
    rows = [i for i, req in enumerate(requests) if req.params.logprobs is not None]
    if not rows:
        return SampleOutput(tokens, [], None, None, None)
    index = to_device(rows, torch.int64, logits.device)
    logprobs = logits[index].float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1)
    max_k = max(requests[i].params.logprobs or 0 for i in rows)
    if max_k == 0:
        return SampleOutput(tokens, rows, chosen, None, None)
    top_values, top_ids = logprobs.topk(max_k, dim=-1)
    return SampleOutput(tokens, rows, chosen, top_ids, top_values)

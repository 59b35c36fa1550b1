"""Per-request changes to the logits before a token is chosen: OpenAI's `logit_bias`, and `min_tokens`
(EOS and the stop token ids masked until enough tokens are generated). Logprobs are reported from the
model's own logits, before these changes, as for the penalties."""

from __future__ import annotations

import torch

from minisgl.core.model_runner.transfer import to_device
from minisgl.core.request import Request


def adjust_logits(
    logits: torch.Tensor, requests: list[Request], eos_token_ids: frozenset[int], num_generated: list[int]
) -> torch.Tensor:
    """logits with every request's bias and min_tokens mask applied: logits itself when no request has
    any, else a float32 copy (a small bias added in bf16 would be rounded away) changed in those rows only.
    num_generated: per row, the request's tokens generated before the one being chosen."""
    masks = [_masked_ids(req, eos_token_ids, n) for req, n in zip(requests, num_generated, strict=True)]
    rows = [i for i, req in enumerate(requests) if req.params.logit_bias or masks[i]]
    if not rows:
        return logits
    logits = logits.to(torch.float32, copy=True)
    for i in rows:
        _adjust_row(logits, i, requests[i].params.logit_bias, masks[i])
    return logits


def _adjust_row(logits: torch.Tensor, row: int, bias: dict[int, float] | None, masked: list[int]) -> None:
    if bias:
        ids = to_device(list(bias), torch.int64, logits.device)
        logits[row, ids] += to_device(list(bias.values()), logits.dtype, logits.device)
    if masked:
        logits[row, to_device(masked, torch.int64, logits.device)] = float("-inf")


def _masked_ids(req: Request, eos_token_ids: frozenset[int], num_generated: int) -> list[int]:
    """The tokens req may not sample now: its stop tokens (and EOS unless ignore_eos), while fewer than
    min_tokens are generated."""
    params = req.params
    if num_generated >= params.min_tokens:
        return []
    stop = set(params.stop_token_id_set)
    if not params.ignore_eos:
        stop |= eos_token_ids
    return sorted(stop)

"""Row gather: the embedding lookup of one vocab shard (ids outside the shard give zero rows)."""

from __future__ import annotations

import torch

from minisgl.kernels import reference
from minisgl.kernels._dispatch import AUTO_LANES, cuda_ops, device_index, use_cuda_kernels


def gather_rows(
    table: torch.Tensor,
    ids: torch.Tensor,
    vocab_start: int = 0,
    vocab_end: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row `ids[j] - vocab_start` of `table` for each id; zeros for ids outside [vocab_start, vocab_end).

    table: (rows, hidden), the vocab range [vocab_start, vocab_end) of this TP rank (vocab_end defaults
    to vocab_start + rows); its rows must be dense, dim 0 may be strided. ids: any shape of integers.
    Returns ids.shape + (hidden,). `out`, when given, is a contiguous tensor of that shape and dtype that
    receives the rows (and is returned) instead of a new one.

    CUDA tensors run one kernel on the current stream; other devices run `reference.gather_rows`.
    """
    if not use_cuda_kernels(table):
        return _reference_gather(table, ids, vocab_start, vocab_end, out)
    end = vocab_start + table.shape[0] if vocab_end is None else vocab_end
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.long()
    if out is None:
        out = torch.empty((*ids.shape, table.shape[-1]), dtype=table.dtype, device=table.device)
    cuda_ops(device_index(table)).gather_rows(table, ids.contiguous(), out, vocab_start, end, AUTO_LANES)
    return out


def _reference_gather(
    table: torch.Tensor, ids: torch.Tensor, vocab_start: int, vocab_end: int | None, out: torch.Tensor | None
) -> torch.Tensor:
    result = reference.gather_rows(table, ids, vocab_start, vocab_end)
    return result if out is None else out.copy_(result)

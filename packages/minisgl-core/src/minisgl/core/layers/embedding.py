"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary (the last
slice padded when the vocabulary does not divide by the TP size)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.core.parallel.distributed import all_gather_last_dim, all_reduce, get_tp
from minisgl.kernels import gather_rows


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        tp = get_tp()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.per_rank = -(-vocab_size // tp.size)
        self.vocab_start, self.vocab_end = tp.shard(vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # minisgl-kernels' row gather: ids outside this rank's slice give zero rows (a fused kernel on
        # CUDA, its torch reference elsewhere); the all-reduce then sums the ranks' slices.
        rows = gather_rows(self.weight, ids, self.vocab_start, self.vocab_end)
        return rows if get_tp().size == 1 else all_reduce(rows)

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        if tensor.shape != (self.vocab_size, self.hidden_size):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {(self.vocab_size, self.hidden_size)}"
            )
        rows = self.vocab_end - self.vocab_start
        self.weight.data[:rows].copy_(tensor[self.vocab_start : self.vocab_end])


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocabulary."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if get_tp().size == 1:
            return logits
        return all_gather_last_dim(logits)[..., : self.vocab_size]

"""Tensor-parallel rank information and collectives. At tp=1 every collective is the identity, so the
TP-ready layers run unchanged on a single device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1

    def shard(self, total: int) -> tuple[int, int]:
        """The [start, end) slice of `total` items that this rank owns (the last shard may be shorter)."""
        per_rank = -(-total // self.size)
        start = min(self.rank * per_rank, total)
        return start, min(start + per_rank, total)


_TP = TPInfo()


def get_tp() -> TPInfo:
    return _TP


def set_tp(info: TPInfo) -> None:
    global _TP
    _TP = info


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.size == 1:
        return x
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)

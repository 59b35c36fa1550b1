"""Linear layers written for tensor parallelism: column-parallel layers split their outputs over ranks,
row-parallel layers split their inputs and all-reduce. At tp=1 they are plain linears.

Each layer knows how to load its own slice of a checkpoint tensor (`load_weight`), so merged layers
(qkv, gate_up) take the separate checkpoint tensors by shard name. A checkpoint tensor is anything with
`.shape` whose slicing returns a torch tensor: a tensor, or a lazy safetensors slice, so that a rank reads
only its own rows or columns from disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.core.config import check_kv_split
from minisgl.core.parallel.distributed import all_reduce, get_tp


def _check_shape(name: str, expected: torch.Size, got: torch.Size) -> None:
    if expected != got:
        raise ValueError(f"tensor {name!r} has shape {tuple(got)}, expected {tuple(expected)}")


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over ranks; each rank returns its slice of y."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool) -> None:
        super().__init__()
        tp = get_tp()
        self.full_out_sizes = out_sizes
        self.local_out_sizes = [size // tp.size for size in out_sizes]
        for size in out_sizes:
            if size % tp.size:
                raise ValueError(f"output size {size} is not divisible by tp size {tp.size}")
        self.weight = nn.Parameter(torch.empty(sum(self.local_out_sizes), in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(sum(self.local_out_sizes)), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Copy this rank's slice of checkpoint tensor `name` (output shard `shard`) into place."""
        tp = get_tp()
        local = self.local_out_sizes[shard]
        _check_shape(name, torch.Size([self.full_out_sizes[shard], *tensor.shape[1:]]), tensor.shape)
        offset = sum(self.local_out_sizes[:shard])
        target = self.weight if name.endswith("weight") else self.bias
        assert target is not None, f"{name}: layer has no bias"
        target.data[offset : offset + local].copy_(tensor[tp.rank * local : (tp.rank + 1) * local])


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q, k, v projection. With fewer KV heads than ranks, KV heads are replicated."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        tp = get_tp()
        if num_heads % tp.size:
            raise ValueError(f"num_heads {num_heads} is not divisible by tp size {tp.size}")
        check_kv_split(num_kv_heads, tp.size)
        self.num_kv_heads_total = num_kv_heads
        self.local_kv_heads = max(1, num_kv_heads // tp.size)
        # Size the kv shards as if they were split evenly; replication is handled in load_weight.
        kv_size = self.local_kv_heads * head_dim * tp.size
        super().__init__(hidden_size, [num_heads * head_dim, kv_size, kv_size], bias)
        self.head_dim = head_dim

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        if shard == 0 or self.num_kv_heads_total >= get_tp().size:
            if shard != 0:
                _check_shape(
                    name,
                    torch.Size([self.num_kv_heads_total * self.head_dim, *tensor.shape[1:]]),
                    tensor.shape,
                )
            return super().load_weight(name, tensor, shard)
        # Replicated KV heads (tp is a multiple of kv): ranks r with the same r * kv // tp share a head,
        # and their query heads are exactly that head's group.
        _check_shape(
            name, torch.Size([self.num_kv_heads_total * self.head_dim, *tensor.shape[1:]]), tensor.shape
        )
        head = get_tp().rank * self.num_kv_heads_total // get_tp().size
        piece = tensor[head * self.head_dim : (head + 1) * self.head_dim]
        offset = sum(self.local_out_sizes[:shard])
        target = self.weight if name.endswith("weight") else self.bias
        assert target is not None
        target.data[offset : offset + self.head_dim].copy_(piece)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over ranks; partial sums are all-reduced, then the bias
    is added once (not once per rank)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        tp = get_tp()
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} is not divisible by tp size {tp.size}")
        self.local_in = in_features // tp.size
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        tp = get_tp()
        if name.endswith("bias"):
            _check_shape(name, torch.Size([self.out_features]), tensor.shape)
            assert self.bias is not None
            self.bias.data.copy_(tensor[:])
            return
        _check_shape(name, torch.Size([self.out_features, self.local_in * tp.size]), tensor.shape)
        self.weight.data.copy_(tensor[:, tp.rank * self.local_in : (tp.rank + 1) * self.local_in])


class ReplicatedLinear(nn.Module):
    """y = x W^T, the whole W on every rank (a MoE router: small, and every rank needs all its logits)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        _check_shape(name, self.weight.shape, tensor.shape)
        self.weight.data.copy_(tensor[:])

from __future__ import annotations

import torch
from torch import nn

from minisgl.core.layers.fused_ops import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as the reference implementation does, then cast back (fused on CUDA)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def forward_with_residual(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the residual, then normalize; returns (normalized, new residual). On CUDA the results are
        written over the inputs."""
        return add_rms_norm(x, residual, self.weight, self.eps)

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        if tensor.shape != self.weight.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(self.weight.shape)}"
            )
        self.weight.data.copy_(tensor[:])

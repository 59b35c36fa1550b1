from __future__ import annotations

import torch
from torch import nn

from minisgl.core.forward_context import current_forward_context


class PagedAttention(nn.Module):
    """Stores this layer's new K and V in the paged pool and attends over the request's whole context,
    through whichever backend the current forward context uses."""

    def __init__(self, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = current_forward_context()
        return ctx.backend.forward(q, k, v, self.layer_id, ctx.kv_pool, ctx.metadata)

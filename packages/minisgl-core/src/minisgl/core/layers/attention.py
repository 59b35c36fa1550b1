from __future__ import annotations

import torch
from torch import nn

from minisgl.core.model_runner.forward_context import current_forward_context
from minisgl.kernels import rope_store


class PagedAttention(nn.Module):
    """Stores this layer's new K and V in the paged pool and attends over the request's whole context,
    through whichever backend the current forward context uses."""

    def __init__(self, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = current_forward_context()
        ctx.kv_pool.store(self.layer_id, ctx.out_slots, k, v)
        return ctx.backend.forward(q, self.layer_id, ctx.kv_pool, ctx.metadata)

    def forward_fused(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None,
        num_heads: int,
        num_kv_heads: int,
    ) -> torch.Tensor:
        """The same from the fused qkv projection on CUDA: the optional q/k RMSNorm (weights, eps), the
        rotary embedding and the KV store run as one minisgl-kernels kernel, then attention."""
        ctx = current_forward_context()
        q_weight, k_weight, eps = qk_norm if qk_norm is not None else (None, None, 0.0)
        q = rope_store(
            qkv,
            positions,
            ctx.out_slots,
            cos_sin,
            q_weight,
            k_weight,
            eps,
            ctx.kv_pool.k_slots(self.layer_id),
            ctx.kv_pool.v_slots(self.layer_id),
            num_heads,
            num_kv_heads,
            ctx.kv_pool.k_scales[self.layer_id],
            ctx.kv_pool.v_scales[self.layer_id],
        )
        return ctx.backend.forward(q, self.layer_id, ctx.kv_pool, ctx.metadata)

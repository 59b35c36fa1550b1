"""The reference attention backend in plain torch: gathers each request's keys from the paged pool into
a padded (batch, max_kv, kv_heads, d) tensor and runs scaled_dot_product_attention with a causal mask
offset by the cached prefix. One SDPA call per layer for the whole batch. Keys and values of a pool in
another dtype than the queries (an FP8 or a half-precision cache under a float32 model) are converted
to the queries' dtype after the gather, FP8 ones times the layer's scales."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minisgl.core.attention.base import AttentionBackend, AttentionMetadata, BatchLayout
from minisgl.core.kv.kv_pool import KVPool
from minisgl.core.model_runner.transfer import to_device
from minisgl.kernels.reference import dequantize_kv


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    # (batch, max_kv) slot of each key position; padding points at slot 0 and is masked out.
    kv_slots: torch.Tensor
    # (num_tokens,) index of each query token in the flattened (batch * max_q) padded layout.
    padded_index: torch.Tensor
    # (batch, 1, max_q, max_kv) True where a query may attend to a key.
    mask: torch.Tensor
    batch_size: int
    max_q: int


class TorchAttentionBackend(AttentionBackend):
    def prepare(self, layout: BatchLayout, kv_pool: KVPool) -> AttentionMetadata:
        device = layout.positions.device
        page_size = kv_pool.page_size
        batch = len(layout.kv_lens_host)
        max_q = max(layout.query_lens_host)
        max_kv = max(layout.kv_lens_host)
        kv_positions = torch.arange(max_kv, device=device)
        pages = layout.page_table[:, kv_positions // page_size].long()
        kv_slots = pages * page_size + kv_positions % page_size

        query_lens = to_device(layout.query_lens_host, torch.int64, device)
        row_of_token = torch.repeat_interleave(torch.arange(batch, device=device), query_lens)
        offset_in_row = torch.arange(len(layout.positions), device=device) - layout.query_starts[row_of_token]
        padded_index = row_of_token * max_q + offset_in_row

        # Query positions in the padded layout; padding gets -1 so it sees nothing.
        q_pos = torch.full((batch * max_q,), -1, dtype=torch.long, device=device)
        q_pos[padded_index] = layout.positions.long()
        q_pos = q_pos.view(batch, max_q, 1)
        mask = (kv_positions.view(1, 1, -1) <= q_pos) & (
            kv_positions.view(1, 1, -1) < layout.kv_lens.view(-1, 1, 1)
        )
        kv_slots = torch.where(kv_positions.view(1, -1) < layout.kv_lens.view(-1, 1), kv_slots, 0)
        return TorchAttentionMetadata(
            kv_slots=kv_slots,
            padded_index=padded_index,
            mask=mask.unsqueeze(1),
            batch_size=batch,
            max_q=max_q,
        )

    def forward(
        self,
        q: torch.Tensor,
        layer: int,
        kv_pool: KVPool,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        assert isinstance(metadata, TorchAttentionMetadata)
        keys = kv_pool.k_slots(layer)[metadata.kv_slots]  # (batch, max_kv, kv_heads, d)
        values = kv_pool.v_slots(layer)[metadata.kv_slots]
        keys = dequantize_kv(keys, q.dtype, kv_pool.k_scales[layer])
        values = dequantize_kv(values, q.dtype, kv_pool.v_scales[layer])
        num_heads, head_dim = q.shape[1], q.shape[2]
        padded_q = q.new_zeros(metadata.batch_size * metadata.max_q, num_heads, head_dim)
        padded_q[metadata.padded_index] = q
        padded_q = padded_q.view(metadata.batch_size, metadata.max_q, num_heads, head_dim)
        out = F.scaled_dot_product_attention(
            padded_q.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=metadata.mask,
            enable_gqa=num_heads != keys.shape[2],
        )
        out = out.transpose(1, 2).reshape(metadata.batch_size * metadata.max_q, num_heads * head_dim)
        return out[metadata.padded_index]

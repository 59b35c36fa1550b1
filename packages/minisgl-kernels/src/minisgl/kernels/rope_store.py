"""Attention inputs in one kernel: q/k RMSNorm (optional), rotary embedding, and the KV store."""

from __future__ import annotations

import torch

from minisgl.kernels import reference
from minisgl.kernels._dispatch import cuda_ops, device_index, use_cuda_kernels

# The head sizes the CUDA kernel is built for (csrc/rope_store.cu); callers keep other models on torch.
ROPE_STORE_HEAD_DIMS = (64, 128, 256)


def rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Split a fused qkv projection into attention inputs; returns the queries (tokens, q_heads, head_dim).

    qkv: (tokens, (q_heads + 2 * kv_heads) * head_dim), its last dim dense (q heads, then k, then v).
    With q_weight and k_weight (head_dim,), each query and key head is RMS-normalized first (Qwen3); both
    are then rotated by the rotate-half rotary embedding at `positions` from `cos_sin`, a float32
    (max_positions, head_dim) table holding the cos of the head_dim / 2 frequencies, then their sin. The
    keys and the values are written to row `slots[i]` of k_cache and v_cache, (num_slots, kv_heads,
    head_dim) views of one layer's pool. positions and slots: int64 (tokens,). head_dim: one of ROPE_STORE_HEAD_DIMS.
    The caches have qkv's dtype, or are float8_e4m3fn (a quantized KV cache): then they hold K / k_scale
    and V / v_scale, saturated (`reference.quantize_kv`).

    CUDA tensors run one kernel on the current stream (capturable in a CUDA graph), computing in float32
    and rounding once; other devices run `reference.rope_store`. This replaces two copies, two RMSNorms,
    a RoPE and a KV store: five to six launches per layer.
    """
    if not use_cuda_kernels(qkv):
        return reference.rope_store(
            qkv,
            positions,
            slots,
            cos_sin,
            q_weight,
            k_weight,
            eps,
            k_cache,
            v_cache,
            q_heads,
            kv_heads,
            k_scale,
            v_scale,
        )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight go together (both or neither)")
    head_dim = k_cache.shape[-1]
    q = torch.empty(qkv.shape[0], q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    use_norm = q_weight is not None
    cuda_ops(device_index(qkv)).rope_store(
        qkv,
        positions,
        slots,
        cos_sin,
        q_weight if q_weight is not None else qkv,
        k_weight if k_weight is not None else qkv,
        q,
        k_cache,
        v_cache,
        q_heads,
        kv_heads,
        eps,
        int(use_norm),
        1.0 / k_scale,
        1.0 / v_scale,
    )
    return q

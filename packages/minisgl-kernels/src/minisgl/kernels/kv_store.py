"""KV store: write new K and V rows into the paged KV pool at the given slots."""

from __future__ import annotations

import torch

from minisgl.kernels import reference
from minisgl.kernels._dispatch import AUTO_LANES, cuda_ops, device_index, use_cuda_kernels


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write `k[i]` and `v[i]` into row `slots[i]` of `k_cache` and `v_cache`, in place.

    k_cache, v_cache: (num_slots, kv_heads, head_dim) views of one layer's pool (a paged pool of
    (num_pages, page_size, kv_heads, head_dim) viewed with .view(-1, kv_heads, head_dim)).
    k, v: (num_tokens, kv_heads, head_dim); strided views are fine as long as each token's
    (kv_heads, head_dim) block is dense, e.g. the K and V columns of a fused qkv projection.
    slots: 1-D int32/int64 of num_tokens distinct rows in [0, num_slots).

    CUDA tensors run one fused kernel on the current stream (capturable in a CUDA graph); other
    devices run `reference.store_kv`. k and v are converted to the cache dtype first if they differ
    (`reference.quantize_kv`: a float8 cache stores k / k_scale and v / v_scale).
    """
    if not use_cuda_kernels(k_cache):
        reference.store_kv(k_cache, v_cache, k, v, slots, k_scale, v_scale)
        return
    k = reference.quantize_kv(k, k_cache.dtype, k_scale)  # a no-op cast for a bf16/fp16 cache of k's type
    v = reference.quantize_kv(v, v_cache.dtype, v_scale)
    cuda_ops(device_index(k_cache)).store_kv(k_cache, v_cache, k, v, slots, AUTO_LANES)

"""The paged KV pool: per layer, K and V of shape (num_pages, page_size, kv_heads, head_dim).

A token at position p of a request lives in slot `page * page_size + p % page_size`, where `page` is the
request's (p // page_size)-th page. Which pages are free is the allocator's business, not the pool's.
"""

from __future__ import annotations

import torch

from minisgl.kernels import store_kv


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self._k = torch.zeros(shape, dtype=dtype, device=device)
        self._v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    def k_cache(self, layer: int) -> torch.Tensor:
        return self._k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._v[layer]

    def k_slots(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s K as (num_pages * page_size, kv_heads, head_dim): one row per token slot."""
        return self._k[layer].flatten(0, 1)

    def v_slots(self, layer: int) -> torch.Tensor:
        return self._v[layer].flatten(0, 1)

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k[i], v[i] (tokens, kv_heads, head_dim) to token slot slots[i] of the layer: one fused
        minisgl-kernels kernel on CUDA, its torch reference elsewhere."""
        store_kv(self.k_slots(layer), self.v_slots(layer), k, v, slots)

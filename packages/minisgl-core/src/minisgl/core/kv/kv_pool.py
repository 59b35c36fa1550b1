"""The paged KV pool: per layer, K and V of shape (num_pages, page_size, kv_heads, head_dim).

A token at position p of a request lives in slot `page * page_size + p % page_size`, where `page` is the
request's (p // page_size)-th page. Which pages are free is the allocator's business, not the pool's.

The pool's dtype is the model's, or float8_e4m3fn (an FP8 KV cache): then each layer stores K / k_scale
and V / v_scale, and attention multiplies them back. The scales are 1.0 unless the checkpoint gives them
(`set_scales`); with random weights 1.0 is all there is to go by.
"""

from __future__ import annotations

import math

import torch

from minisgl.kernels import store_kv
from minisgl.kernels.reference import FP8_KV_DTYPE


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
        self.dtype = dtype
        self.k_scales = [1.0] * num_layers
        self.v_scales = [1.0] * num_layers
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self._k = torch.zeros(shape, dtype=dtype, device=device)
        self._v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    @property
    def quantized(self) -> bool:
        return self.dtype == FP8_KV_DTYPE

    def set_scales(self, k_scales: list[float], v_scales: list[float]) -> None:
        """Per-layer scales of an FP8 pool (stored value = K / k_scale); set before anything is stored."""
        if not self.quantized:
            raise ValueError(f"k/v scales apply to an FP8 KV cache only, not to a {self.dtype} one")
        for name, scales in (("k_scale", k_scales), ("v_scale", v_scales)):
            if len(scales) != len(self.k_scales) or not all(map(_is_valid_scale, scales)):
                raise ValueError(f"{name}: need one finite positive scale per layer, got {scales}")
        self.k_scales, self.v_scales = list(k_scales), list(v_scales)

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
        minisgl-kernels kernel on CUDA, its torch reference elsewhere (quantized first in an FP8 pool)."""
        store_kv(
            self.k_slots(layer), self.v_slots(layer), k, v, slots, self.k_scales[layer], self.v_scales[layer]
        )


def _is_valid_scale(scale: float) -> bool:
    return scale > 0.0 and math.isfinite(scale)

"""Attention backends behind one interface.

- `torch`: the portable reference (CPU and any GPU); the CPU default.
- `fi`: FlashInfer paged prefill and decode; the CUDA default.
`attn="p,d"` picks one backend for prefill batches and one for decode batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisgl.core.attention.base import AttentionBackend, AttentionMetadata, BatchLayout
from minisgl.core.attention.torch_backend import TorchAttentionBackend
from minisgl.core.kv_pool import KVPool

BACKEND_NAMES = ("torch", "fi")


@dataclass
class SplitMetadata(AttentionMetadata):
    backend: AttentionBackend
    inner: AttentionMetadata


class SplitBackend(AttentionBackend):
    """One backend for prefill batches, another for decode batches."""

    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend) -> None:
        self.prefill = prefill
        self.decode = decode

    def prepare(self, layout: BatchLayout, kv_pool: KVPool) -> AttentionMetadata:
        backend = self.decode if layout.is_decode else self.prefill
        return SplitMetadata(backend, backend.prepare(layout, kv_pool))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        kv_pool: KVPool,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        assert isinstance(metadata, SplitMetadata)
        return metadata.backend.forward(q, k, v, layer, kv_pool, metadata.inner)


def resolve_attention(spec: str, device: torch.device) -> tuple[str, str]:
    """Parse "auto", "name" or "prefill,decode" into (prefill, decode) backend names."""
    names = [part.strip() for part in spec.split(",")]
    if len(names) == 1:
        names *= 2
    if len(names) != 2:
        raise ValueError(f"attn must be NAME or PREFILL,DECODE, got {spec!r}")
    resolved = []
    for name in names:
        if name == "auto":
            name = "fi" if device.type == "cuda" else "torch"
        if name not in BACKEND_NAMES:
            raise ValueError(f"attention backend {name!r} is not one of: auto, {', '.join(BACKEND_NAMES)}")
        if name != "torch" and device.type != "cuda":
            raise ValueError(f"attention backend {name!r} needs a CUDA device; use attn='torch' on the CPU")
        resolved.append(name)
    return resolved[0], resolved[1]


def create_backend(
    spec: str, num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> AttentionBackend:
    prefill_name, decode_name = resolve_attention(spec, device)
    built: dict[str, AttentionBackend] = {}
    for name in {prefill_name, decode_name}:
        if name == "torch":
            built[name] = TorchAttentionBackend()
        else:
            from minisgl.core.attention.flashinfer_backend import FlashInferBackend

            built[name] = FlashInferBackend(num_qo_heads, num_kv_heads, head_dim, dtype, device)
    if prefill_name == decode_name:
        return built[prefill_name]
    return SplitBackend(built[prefill_name], built[decode_name])


__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "AttentionMetadata",
    "BatchLayout",
    "SplitBackend",
    "create_backend",
]

"""Attention backends behind one interface. `torch` is the portable reference (CPU and any GPU)."""

from __future__ import annotations

from minisgl.core.attention.base import AttentionBackend, AttentionMetadata, BatchLayout
from minisgl.core.attention.torch_backend import TorchAttentionBackend

BACKENDS = {"torch": TorchAttentionBackend}


def create_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available (choose from: {', '.join(BACKENDS)})")
    return BACKENDS[name]()


__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "BatchLayout", "create_backend"]

"""The one piece of global state: the batch currently being run through the model. The engine sets it
around each forward pass so that attention layers deep in the model can reach the KV pool and the
attention metadata without threading them through every call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from minisgl.core.attention.base import AttentionBackend, AttentionMetadata
    from minisgl.core.kv.kv_pool import KVPool


@dataclass
class ForwardContext:
    kv_pool: KVPool
    backend: AttentionBackend
    metadata: AttentionMetadata
    # (num_tokens,) the KV slot of each token of the batch, where its new K and V are stored.
    out_slots: torch.Tensor


_CURRENT: ForwardContext | None = None


def current_forward_context() -> ForwardContext:
    if _CURRENT is None:
        raise RuntimeError("attention was called outside of an engine forward pass")
    return _CURRENT


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _CURRENT
    previous, _CURRENT = _CURRENT, ctx
    try:
        yield
    finally:
        _CURRENT = previous

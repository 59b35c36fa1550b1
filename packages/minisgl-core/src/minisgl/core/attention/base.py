"""The attention backend interface.

A batch is a list of requests, each contributing a contiguous run of query tokens at positions
[start, end) and attending to every cached key at positions [0, end). The engine describes the batch
once (BatchLayout); the backend turns it into whatever metadata its kernels want (prepare), and then
runs every layer with it (forward). A backend whose decode steps can run as CUDA graphs also gives the
graph runner its static inputs (graph_attention).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from minisgl.core.kv.kv_pool import KVPool


@dataclass
class BatchLayout:
    """Device tensors describing one batch. Token tensors are in batch order, request by request."""

    # (num_tokens,) position of each query token, and the KV slot its K and V are written to.
    positions: torch.Tensor
    out_slots: torch.Tensor
    # (batch,) query start offsets into the token dimension (batch + 1 entries) and KV lengths.
    query_starts: torch.Tensor
    kv_lens: torch.Tensor
    # (batch, max_pages) page ids of each request, from the page table.
    page_table: torch.Tensor
    # Host copies, so that backends can size things without a device sync.
    query_lens_host: list[int]
    kv_lens_host: list[int]
    is_decode: bool


class AttentionMetadata:
    """Whatever a backend precomputes per batch; shared by all layers."""


class GraphAttention(ABC):
    """A backend's decode metadata for CUDA graphs: over static device buffers sized for the largest
    captured batch, so that every replay reads the same addresses."""

    @abstractmethod
    def metadata(self, size: int) -> AttentionMetadata:
        """The metadata a graph of `size` rows is captured with (all of them padding until `load`)."""

    @abstractmethod
    def load(self, size: int, layout: BatchLayout) -> None:
        """Fill the buffers of the graph of `size` rows with a decode batch of len(layout.kv_lens_host) <=
        size requests, before its replay; the rows after them are padding, reading and writing only the
        dummy page. Queues device work only (no host synchronisation)."""


class AttentionBackend(ABC):
    def graph_attention(
        self, kv_pool: KVPool, max_batch_size: int, max_pages: int, dummy_page: int
    ) -> GraphAttention | None:
        """Static inputs for decode CUDA graphs of up to max_batch_size requests, each with up to max_pages
        pages (the page table's width); None: this backend's decode steps run eagerly."""
        return None

    @abstractmethod
    def prepare(self, layout: BatchLayout, kv_pool: KVPool) -> AttentionMetadata: ...

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        layer: int,
        kv_pool: KVPool,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """q: (tokens, heads, d), attending over the layer's pool, where the batch's new K and V are
        already stored (by PagedAttention). Returns (tokens, heads * d)."""

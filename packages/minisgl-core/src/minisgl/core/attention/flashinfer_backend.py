"""FlashInfer paged attention: batch prefill (with a cached prefix, causal) and batch decode.

The pool's per-layer (num_pages, page_size, kv_heads, head_dim) tensors are FlashInfer's NHD paged
layout as they are. `prepare` plans one wrapper per batch: the page-count prefix sums and last-page
lengths are built on the host (FlashInfer's planner reads them there), the page ids are gathered from
the device page table on the device, with no synchronisation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from minisgl.core.attention.base import AttentionBackend, AttentionMetadata, BatchLayout
from minisgl.core.kv_pool import KVPool

WORKSPACE_BYTES = 256 << 20


def import_flashinfer() -> Any:
    try:
        import flashinfer
    except ImportError as exc:
        raise ValueError(
            "the 'fi' attention backend needs FlashInfer: pip install flashinfer-python "
            f"(import failed: {exc})"
        ) from None
    return flashinfer


@dataclass
class FlashInferMetadata(AttentionMetadata):
    wrapper: Any
    out_slots: torch.Tensor


@dataclass
class PagedIndex:
    """FlashInfer's description of which pages each request reads."""

    indptr: torch.Tensor  # host int32 (batch + 1)
    indices: torch.Tensor  # device int32 (indptr[-1])
    last_page_len: torch.Tensor  # host int32 (batch)


def paged_index(page_table: torch.Tensor, kv_lens: list[int], page_size: int) -> PagedIndex:
    """page_table: (batch, max_pages) device rows of the requests, in batch order."""
    counts = [-(-n // page_size) for n in kv_lens]
    indptr = list(itertools.accumulate(counts, initial=0))
    total = indptr[-1]
    device = page_table.device
    counts_dev = torch.tensor(counts, dtype=torch.int64).to(device, non_blocking=True)
    starts_dev = torch.tensor(indptr[:-1], dtype=torch.int64).to(device, non_blocking=True)
    request = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_dev, output_size=total)
    offset = torch.arange(total, device=device) - starts_dev[request]
    return PagedIndex(
        indptr=torch.tensor(indptr, dtype=torch.int32),
        indices=page_table[request, offset].to(torch.int32),
        last_page_len=torch.tensor([(n - 1) % page_size + 1 for n in kv_lens], dtype=torch.int32),
    )


class FlashInferBackend(AttentionBackend):
    def __init__(
        self, num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.flashinfer = import_flashinfer()
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill_wrapper = self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode_wrapper = self.make_decode_wrapper()

    @property
    def use_tensor_cores(self) -> bool:
        # Tensor-core decode pays off when several query heads share a KV head.
        return self.num_qo_heads // self.num_kv_heads >= 4

    def make_decode_wrapper(self, **graph_buffers: torch.Tensor) -> Any:
        return self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=bool(graph_buffers),
            use_tensor_cores=self.use_tensor_cores,
            **graph_buffers,
        )

    def plan_decode(self, wrapper: Any, index: PagedIndex, page_size: int) -> None:
        wrapper.plan(
            index.indptr,
            index.indices,
            index.last_page_len,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            page_size,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def prepare(self, layout: BatchLayout, kv_pool: KVPool) -> AttentionMetadata:
        index = paged_index(layout.page_table, layout.kv_lens_host, kv_pool.page_size)
        if layout.is_decode:
            self.plan_decode(self.decode_wrapper, index, kv_pool.page_size)
            return FlashInferMetadata(self.decode_wrapper, layout.out_slots)
        qo_indptr = torch.tensor(
            list(itertools.accumulate(layout.query_lens_host, initial=0)), dtype=torch.int32
        )
        self.prefill_wrapper.plan(
            qo_indptr,
            index.indptr,
            index.indices,
            index.last_page_len,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            kv_pool.page_size,
            causal=True,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )
        return FlashInferMetadata(self.prefill_wrapper, layout.out_slots)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        kv_pool: KVPool,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        assert isinstance(metadata, FlashInferMetadata)
        kv_pool.store(layer, metadata.out_slots, k, v)
        out = metadata.wrapper.run(q.contiguous(), (kv_pool.k_cache(layer), kv_pool.v_cache(layer)))
        return out.reshape(q.shape[0], -1)

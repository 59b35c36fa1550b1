"""FlashInfer paged attention: batch prefill (with a cached prefix, causal) and batch decode, with
FlashInfer's FlashAttention-2 kernels (`fi`) or its FlashAttention-3 kernels (`fa3`, Hopper).

The pool's per-layer (num_pages, page_size, kv_heads, head_dim) tensors are FlashInfer's NHD paged
layout as they are. `prepare` plans one wrapper per batch: the page-count prefix sums and last-page
lengths are built on the host (FlashInfer's planner reads them there), the page ids are gathered from
the device page table on the device, with no synchronisation. The KV cache is in the queries' dtype or
FP8 E4M3: FlashInfer's FP8 paged kernels read one byte per element and take the layer's k/v scales.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from minisgl.core.attention.base import AttentionBackend, AttentionMetadata, BatchLayout, GraphAttention
from minisgl.core.kv.kv_pool import KVPool
from minisgl.core.model_runner.transfer import pinned, to_device
from minisgl.kernels.reference import FP8_KV_DTYPE

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


@dataclass
class PagedIndex:
    """FlashInfer's description of which pages each request reads."""

    indptr: torch.Tensor  # host int32 (batch + 1)
    indices: torch.Tensor  # device int32 (indptr[-1])
    last_page_len: torch.Tensor  # host int32 (batch)


def paged_index(
    page_table: torch.Tensor, kv_lens: list[int], page_size: int, pad_rows: int = 0, pad_page: int = 0
) -> PagedIndex:
    """page_table: (batch, max_pages) device rows of the requests, in batch order. pad_rows extra rows
    (CUDA-graph padding) each read one token of page pad_page."""
    counts = [-(-n // page_size) for n in kv_lens]
    indptr = list(itertools.accumulate(counts + [1] * pad_rows, initial=0))
    total = indptr[len(counts)]
    device = page_table.device
    counts_dev = to_device(counts, torch.int64, device)
    starts_dev = to_device(indptr[: len(counts)], torch.int64, device)
    request = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_dev, output_size=total)
    offset = torch.arange(total, device=device) - starts_dev[request]
    indices = page_table[request, offset].to(torch.int32)
    if pad_rows:
        indices = torch.cat([indices, torch.full((pad_rows,), pad_page, dtype=torch.int32, device=device)])
    return PagedIndex(
        indptr=pinned(indptr, torch.int32),
        indices=indices,
        last_page_len=pinned([(n - 1) % page_size + 1 for n in kv_lens] + [1] * pad_rows, torch.int32),
    )


def use_tensor_core_decode(group_size: int, page_size: int, kernels: str) -> bool:
    """Decode with FlashInfer's tensor-core (prefill) kernels or its CUDA-core decode kernel. Measured on
    an H100 (tools/attn_bench.py, batch 128, 400-1600 tokens, head_dim 128, bf16): with pages of 16 the
    tensor-core kernel reads the KV cache at 2.81 TB/s for 2 and 4 query heads per KV head, the CUDA-core
    one at 2.75 and 2.05 TB/s; with pages of 1 the CUDA-core one (2.72 / 1.78 TB/s) beats the tensor-core
    one (0.8 TB/s). FA3 has only tensor-core kernels."""
    return kernels == "fa3" or page_size >= 16 or group_size > 4


class FlashInferBackend(AttentionBackend):
    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        kv_dtype: torch.dtype,
        device: torch.device,
        page_size: int,
        kernels: str = "fa2",
    ) -> None:
        """kernels: "fa2" or "fa3", FlashInfer's implementation of prefill and tensor-core decode. dtype:
        the queries'; kv_dtype: the pool's, dtype itself or float8_e4m3fn."""
        if kv_dtype not in (dtype, FP8_KV_DTYPE):
            raise ValueError(
                f"FlashInfer attention reads a KV cache in the model's dtype ({dtype}) or fp8_e4m3, not "
                f"{kv_dtype}: set kv_cache_dtype to auto or fp8_e4m3, or use attn='torch'"
            )
        self.flashinfer = import_flashinfer()
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.kernels = kernels
        self.use_tensor_cores = use_tensor_core_decode(num_qo_heads // num_kv_heads, page_size, kernels)
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill_wrapper = self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=kernels
        )
        self.decode_wrapper = self.make_decode_wrapper()

    def make_decode_wrapper(self, **graph_buffers: torch.Tensor) -> Any:
        return self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=bool(graph_buffers),
            use_tensor_cores=self.use_tensor_cores,
            backend=self.kernels if self.use_tensor_cores else "auto",
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
            kv_data_type=self.kv_dtype,
        )

    def graph_attention(
        self, kv_pool: KVPool, max_batch_size: int, max_pages: int, dummy_page: int
    ) -> GraphAttention:
        return FlashInferGraphAttention(self, kv_pool, max_batch_size, dummy_page)

    def prepare(self, layout: BatchLayout, kv_pool: KVPool) -> AttentionMetadata:
        index = paged_index(layout.page_table, layout.kv_lens_host, kv_pool.page_size)
        if layout.is_decode:
            self.plan_decode(self.decode_wrapper, index, kv_pool.page_size)
            return FlashInferMetadata(self.decode_wrapper)
        qo_indptr = pinned(list(itertools.accumulate(layout.query_lens_host, initial=0)), torch.int32)
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
            kv_data_type=self.kv_dtype,
        )
        return FlashInferMetadata(self.prefill_wrapper)

    def forward(
        self,
        q: torch.Tensor,
        layer: int,
        kv_pool: KVPool,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        assert isinstance(metadata, FlashInferMetadata)
        cache = (kv_pool.k_cache(layer), kv_pool.v_cache(layer))
        if kv_pool.quantized:
            # FlashInfer folds k_scale into the softmax scale and multiplies the output by v_scale.
            scales = {"k_scale": kv_pool.k_scales[layer], "v_scale": kv_pool.v_scales[layer]}
            out = metadata.wrapper.run(q.contiguous(), cache, **scales)
        else:
            out = metadata.wrapper.run(q.contiguous(), cache)
        return out.reshape(q.shape[0], -1)


class FlashInferGraphAttention(GraphAttention):
    """One CUDA-graph decode wrapper per captured size over shared static index buffers; `load` plans the
    size's wrapper for the batch (the plan copies the index into the buffers)."""

    def __init__(
        self, backend: FlashInferBackend, kv_pool: KVPool, max_batch_size: int, dummy_page: int
    ) -> None:
        self.backend = backend
        self.page_size = kv_pool.page_size
        self.dummy_page = dummy_page
        n, device = max_batch_size, kv_pool.k_cache(0).device
        self.indptr = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self.last_page_len = torch.ones(n, dtype=torch.int32, device=device)
        # Every real page once, plus one dummy page per padding row.
        self.indices = torch.zeros(kv_pool.num_pages + n, dtype=torch.int32, device=device)
        self.wrappers: dict[int, Any] = {}

    def metadata(self, size: int) -> AttentionMetadata:
        wrapper = self.backend.make_decode_wrapper(
            paged_kv_indptr_buffer=self.indptr[: size + 1],
            paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len[:size],
        )
        self.wrappers[size] = wrapper
        empty = self.indptr.new_zeros((0, 1))
        self._plan(size, paged_index(empty, [], self.page_size, size, self.dummy_page))
        return FlashInferMetadata(wrapper)

    def load(self, size: int, layout: BatchLayout) -> None:
        padding = size - len(layout.kv_lens_host)
        index = paged_index(layout.page_table, layout.kv_lens_host, self.page_size, padding, self.dummy_page)
        self._plan(size, index)

    def _plan(self, size: int, index: PagedIndex) -> None:
        self.backend.plan_decode(self.wrappers[size], index, self.page_size)

"""FlashInfer's XQA decode kernels (`xqa`): decode batches only, named as the decode half of the
attention spec (`fi,xqa`).

XQA reads the pool's NHD pages through the rows of the device page table as they are, (batch, max_pages)
int32, and the KV length of each request as uint32: no plan and nothing on the host, so a decode step
adds no host work and its CUDA graphs need only those two buffers. The page table's width fixes XQA's
largest sequence (max_pages * page_size, the engine's context length rounded up to a page). Over an FP8
E4M3 cache on Hopper it runs FP8 tensor-core math and reads the cache at about the copy rate; the queries
and the softmax weights are rounded to FP8 too, which is its accuracy cost (docs/benchmarks.md). Over a
bf16 or fp16 cache it runs in that dtype.

The layer's FP8 scales are folded into XQA's two scales: `bmm1_scale` = softmax scale * k_scale (on
Q·K) and `bmm2_scale` = v_scale (on the output); plain floats, fixed before graphs are captured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minisgl.core.attention.base import AttentionBackend, AttentionMetadata, BatchLayout, GraphAttention
from minisgl.core.engine_config import prefill_backend_problem
from minisgl.core.kv.kv_pool import KVPool
from minisgl.kernels.reference import FP8_KV_DTYPE

# What FlashInfer 0.6.1 compiles XQA for (flashinfer/jit/xqa.py, flashinfer/xqa.py).
XQA_GPU_MAJORS = (9, 10, 12)  # sm_90 (Hopper), sm_100 and sm_120 (Blackwell)
XQA_PAGE_SIZES = (16, 32, 64, 128)
XQA_QUERY_DTYPES = (torch.bfloat16, torch.float16)
# The first 8 MiB are XQA's semaphores (zeroed once; the kernels leave them zero), the rest the scratch of
# its multi-block mode (a few MiB at the engine's shapes).
WORKSPACE_BYTES = 128 << 20


def xqa_support_problem(
    head_dim: int, page_size: int, dtype: torch.dtype, kv_dtype: torch.dtype
) -> str | None:
    """Why XQA cannot run this model's attention (None when it can)."""
    if page_size not in XQA_PAGE_SIZES:
        sizes = ", ".join(map(str, XQA_PAGE_SIZES))
        return f"reads pages of {sizes} tokens, not {page_size}: set page_size (--page-size) to one of them"
    if head_dim % 16 or not 16 <= head_dim <= 256:
        return f"needs a head_dim that is a multiple of 16 in [16, 256]; this model's is {head_dim}"
    if dtype not in XQA_QUERY_DTYPES:
        return f"computes in bfloat16 or float16, not {dtype}: set dtype (--dtype) to bfloat16 or float16"
    if kv_dtype not in (dtype, FP8_KV_DTYPE):
        return f"reads a KV cache in the model's dtype ({dtype}) or fp8_e4m3, not {kv_dtype}"
    return None


@dataclass
class XQAMetadata(AttentionMetadata):
    page_table: torch.Tensor  # (batch, max_pages) int32, the requests' page-table rows
    seq_lens: torch.Tensor  # (batch,) uint32, each request's KV length (its new token included)


def xqa_metadata(page_table: torch.Tensor, kv_lens: torch.Tensor) -> XQAMetadata:
    """A decode batch's metadata from its page-table rows and (batch,) KV lengths, on the device."""
    return XQAMetadata(page_table.to(torch.int32).contiguous(), kv_lens.to(torch.int32).view(torch.uint32))


class XQABackend(AttentionBackend):
    def __init__(
        self, head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype, device: torch.device, page_size: int
    ) -> None:
        """dtype: the queries'; kv_dtype: the pool's, dtype itself or float8_e4m3fn."""
        problem = xqa_support_problem(head_dim, page_size, dtype, kv_dtype)
        if problem is not None:
            raise ValueError(f"attention backend 'xqa' {problem}")
        self.decode = _import_xqa_decode()
        self.page_size = page_size
        self.softmax_scale = head_dim**-0.5
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)

    def graph_attention(
        self, kv_pool: KVPool, max_batch_size: int, max_pages: int, dummy_page: int
    ) -> GraphAttention:
        return XQAGraphAttention(max_batch_size, max_pages, dummy_page, kv_pool.k_cache(0).device)

    def prepare(self, layout: BatchLayout, kv_pool: KVPool) -> AttentionMetadata:
        if not layout.is_decode:
            raise ValueError(f"attention backend {prefill_backend_problem('xqa')}")
        return xqa_metadata(layout.page_table, layout.kv_lens)

    def forward(
        self,
        q: torch.Tensor,
        layer: int,
        kv_pool: KVPool,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        assert isinstance(metadata, XQAMetadata)
        page_table = metadata.page_table
        out = self.decode(
            q.contiguous(),
            (kv_pool.k_cache(layer), kv_pool.v_cache(layer)),
            self.workspace,
            page_table,
            metadata.seq_lens,
            page_table.shape[1] * self.page_size,
            bmm1_scale=self.softmax_scale * kv_pool.k_scales[layer],
            bmm2_scale=kv_pool.v_scales[layer],
            kv_layout="NHD",
            backend="xqa",
        )
        return out.reshape(q.shape[0], -1)


class XQAGraphAttention(GraphAttention):
    """Static (max_batch_size, max_pages) page-table rows and KV lengths that every captured graph reads
    the first `size` rows of. A padding row has length 1 and the dummy page in every entry: it reads (XQA
    reads only the pages a length covers) the one token its out slot wrote, on the dummy page."""

    def __init__(self, max_batch_size: int, max_pages: int, dummy_page: int, device: torch.device) -> None:
        self.dummy_page = dummy_page
        self.page_table = torch.full(
            (max_batch_size, max_pages), dummy_page, dtype=torch.int32, device=device
        )
        self.seq_lens = torch.ones(max_batch_size, dtype=torch.int32, device=device)

    def metadata(self, size: int) -> AttentionMetadata:
        return XQAMetadata(self.page_table[:size], self.seq_lens[:size].view(torch.uint32))

    def load(self, size: int, layout: BatchLayout) -> None:
        real = len(layout.kv_lens_host)
        self.page_table[:real].copy_(layout.page_table)
        self.page_table[real:size].fill_(self.dummy_page)
        self.seq_lens[:real].copy_(layout.kv_lens)
        self.seq_lens[real:size].fill_(1)


def _import_xqa_decode() -> Any:
    try:
        from flashinfer.decode import trtllm_batch_decode_with_kv_cache
    except ImportError as exc:
        raise ValueError(
            "the 'xqa' attention backend needs FlashInfer (>= 0.6): pip install flashinfer-python "
            f"(import failed: {exc})"
        ) from None
    return trtllm_batch_decode_with_kv_cache

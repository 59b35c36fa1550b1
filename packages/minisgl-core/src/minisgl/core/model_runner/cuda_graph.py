"""CUDA graphs for decode steps.

A decode step of a small model is dominated by kernel launches, so each step is captured once per batch
size (1, 2, 4, 8, then multiples of 16 up to cuda_graph_max_bs) and replayed. A batch of size b runs in
the smallest captured size >= b; the padding rows read and write one reserved dummy page of the KV pool,
so they never touch a real request's KV. The decode backend's GraphAttention owns the attention inputs
(static buffers, loaded before each replay). All graphs share one memory pool, and capture happens after
the KV pool is sized, so the pool does not count graph memory as free.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from minisgl.core.attention.base import AttentionBackend, BatchLayout, GraphAttention
from minisgl.core.kv.kv_pool import KVPool
from minisgl.core.model_runner.forward_context import ForwardContext, forward_context
from minisgl.core.models.decoder import DecoderForCausalLM

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = {b for b in (1, 2, 4, 8) if b <= max_batch_size}
    sizes.update(range(16, max_batch_size + 1, 16))
    sizes.add(max_batch_size)
    return sorted(sizes)


class DecodeGraphRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        backend: AttentionBackend,
        attention: GraphAttention,
        kv_pool: KVPool,
        max_batch_size: int,
        dummy_page: int,
        device: torch.device,
    ) -> None:
        """attention: backend's graph_attention for max_batch_size requests."""
        self.model = model
        self.backend = backend
        self.attention = attention
        self.kv_pool = kv_pool
        self.page_size = kv_pool.page_size
        self.dummy_page = dummy_page
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = self.batch_sizes[-1]
        n = self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.out_slots = torch.full((n,), dummy_page * self.page_size, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch_size

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):
            metadata = self.attention.metadata(size)
            with forward_context(ForwardContext(self.kv_pool, self.backend, metadata, self.out_slots[:size])):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(size)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s",
            len(self.graphs),
            self.batch_sizes[0],
            self.max_batch_size,
            time.perf_counter() - started,
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size])
        return self.model.compute_logits(hidden)

    def prepare(self, input_ids: torch.Tensor, layout: BatchLayout) -> int:
        """Load one decode step into the graph inputs and its attention's buffers; returns the graph's
        batch size. `replay` then runs it."""
        real = len(layout.kv_lens_host)
        size = self.batch_sizes[bisect.bisect_left(self.batch_sizes, real)]
        self.input_ids[:real].copy_(input_ids)
        self.positions[:real].copy_(layout.positions)
        self.out_slots[:real].copy_(layout.out_slots)
        self.input_ids[real:size].zero_()
        self.positions[real:size].zero_()
        self.out_slots[real:size].fill_(self.dummy_page * self.page_size)
        self.attention.load(size, layout)
        return size

    def replay(self, size: int, real: int) -> torch.Tensor:
        """Logits of the `real` requests of the step `prepare` loaded (all sampling)."""
        self.graphs[size].replay()
        return self.logits[size][:real]

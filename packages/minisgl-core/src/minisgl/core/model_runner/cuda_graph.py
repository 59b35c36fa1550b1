"""CUDA graphs for decode steps.

A decode step of a small model is dominated by kernel launches, so each step is captured once per batch
size (1, 2, 4, 8, then multiples of 16 up to cuda_graph_max_bs) and replayed. A batch of size b runs in
the smallest captured size >= b; the padding rows read and write one reserved dummy page of the KV pool,
so they never touch a real request's KV. All graphs share one memory pool, and capture happens after
the KV pool is sized, so the pool does not count graph memory as free.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from minisgl.core.attention.flashinfer_backend import (
    FlashInferBackend,
    FlashInferMetadata,
    paged_index,
)
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
        backend: FlashInferBackend,
        kv_pool: KVPool,
        max_batch_size: int,
        dummy_page: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_pool = kv_pool
        self.page_size = kv_pool.page_size
        self.dummy_page = dummy_page
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = self.batch_sizes[-1]
        n = self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.out_slots = torch.full((n,), dummy_page * self.page_size, dtype=torch.int64, device=device)
        self.indptr = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self.last_page_len = torch.ones(n, dtype=torch.int32, device=device)
        # Every real page once, plus one dummy page per padding row.
        self.indices = torch.zeros(kv_pool.num_pages + n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.wrappers: dict[int, object] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch_size

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):
            wrapper = self.backend.make_decode_wrapper(
                paged_kv_indptr_buffer=self.indptr[: size + 1],
                paged_kv_indices_buffer=self.indices,
                paged_kv_last_page_len_buffer=self.last_page_len[:size],
            )
            self.wrappers[size] = wrapper
            empty = self.indptr.new_zeros((0, 1))
            self.backend.plan_decode(
                wrapper, paged_index(empty, [], self.page_size, size, self.dummy_page), self.page_size
            )
            metadata = FlashInferMetadata(wrapper)
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

    def prepare(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        out_slots: torch.Tensor,
        page_table: torch.Tensor,
        kv_lens: list[int],
    ) -> int:
        """Load one decode step of len(kv_lens) requests into the graph inputs and plan its attention;
        returns the graph's batch size. `replay` then runs it."""
        real = len(kv_lens)
        size = self.batch_sizes[bisect.bisect_left(self.batch_sizes, real)]
        self.input_ids[:real].copy_(input_ids)
        self.positions[:real].copy_(positions)
        self.out_slots[:real].copy_(out_slots)
        self.input_ids[real:size].zero_()
        self.positions[real:size].zero_()
        self.out_slots[real:size].fill_(self.dummy_page * self.page_size)
        index = paged_index(page_table, kv_lens, self.page_size, size - real, self.dummy_page)
        self.backend.plan_decode(self.wrappers[size], index, self.page_size)
        return size

    def replay(self, size: int, real: int) -> torch.Tensor:
        """Logits of the `real` requests of the step `prepare` loaded (all sampling)."""
        self.graphs[size].replay()
        return self.logits[size][:real]

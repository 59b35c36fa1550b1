"""The scheduler: decides what each engine step computes, and applies what the step produced.

Policy (one step at a time):
- Prefill first: requests still owing prompt tokens (chunked prefill in progress, then newly admitted
  requests in FIFO order) share a budget of `max_prefill_tokens` tokens; the last one may be cut into a
  chunk and continues next step.
- Otherwise decode: every running request computes one token.
- Admission reserves KV for the request's whole future (prompt + max_tokens), so a running request never
  runs out of pages. A request that could never fit is rejected when it is added.
"""

from __future__ import annotations

import logging
from collections import deque

from minisgl.core.batch import Batch, Chunk
from minisgl.core.config import pages_for
from minisgl.core.page_allocator import PageAllocator
from minisgl.core.request import FinishReason, Request
from minisgl.core.tables import RequestTables

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        tables: RequestTables,
        max_seq_len: int,
        max_running_requests: int,
        max_prefill_tokens: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.allocator = allocator
        self.tables = tables
        self.page_size = tables.page_size
        self.max_seq_len = max_seq_len
        self.max_running_requests = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # ---- admission -------------------------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raise ValueError if a request of this size could never run."""
        if prompt_len < 1:
            raise ValueError("prompt is empty: at least one token is needed")
        if prompt_len >= self.max_seq_len:
            raise ValueError(
                f"prompt has {prompt_len} tokens, but the context length is {self.max_seq_len} "
                f"(prompt + at least one generated token must fit)"
            )
        needed = pages_for(self._final_len(prompt_len, max_tokens), self.page_size)
        if needed > self.allocator.num_pages:
            raise ValueError(
                f"request needs {needed} KV pages (prompt {prompt_len} + max_tokens {max_tokens}) "
                f"but the KV pool has only {self.allocator.num_pages}"
            )

    def add(self, req: Request) -> None:
        self.check_fits(len(req.prompt_ids), req.params.max_tokens)
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _final_len(self, prompt_len: int, max_tokens: int) -> int:
        return min(prompt_len + max_tokens, self.max_seq_len)

    def _pages_still_reserved(self, req: Request) -> int:
        return pages_for(self._final_len(len(req.prompt_ids), req.params.max_tokens), self.page_size) - len(
            req.pages
        )

    def _can_admit(self, req: Request) -> bool:
        if len(self.running) >= self.max_running_requests or self.tables.num_free_rows == 0:
            return False
        reserved = sum(self._pages_still_reserved(r) for r in self.running)
        needed = pages_for(self._final_len(len(req.prompt_ids), req.params.max_tokens), self.page_size)
        return self.allocator.num_free - reserved >= needed

    def _admit(self, req: Request) -> None:
        req.table_row = self.tables.acquire_row(req.prompt_ids)
        self.running.append(req)

    # ---- batch formation -------------------------------------------------------------------------

    def schedule(self) -> Batch | None:
        batch = self._schedule_prefill()
        if batch is None and self.running:
            batch = Batch([Chunk(r, r.num_computed, r.seq_len) for r in self.running], is_decode=True)
        if batch is not None:
            for chunk in batch.chunks:
                self._ensure_pages(chunk.req, chunk.end)
        return batch

    def _schedule_prefill(self) -> Batch | None:
        budget = self.max_prefill_tokens
        chunks: list[Chunk] = []
        for req in self.running:
            if req.is_prefilling and budget > 0:
                chunks.append(self._prefill_chunk(req, budget))
                budget -= chunks[-1].end - chunks[-1].start
        while self.waiting and budget > 0 and self._can_admit(self.waiting[0]):
            req = self.waiting.popleft()
            self._admit(req)
            chunks.append(self._prefill_chunk(req, budget))
            budget -= chunks[-1].end - chunks[-1].start
        return Batch(chunks, is_decode=False) if chunks else None

    @staticmethod
    def _prefill_chunk(req: Request, budget: int) -> Chunk:
        return Chunk(req, req.num_computed, min(len(req.prompt_ids), req.num_computed + budget))

    def _ensure_pages(self, req: Request, num_tokens: int) -> None:
        missing = pages_for(num_tokens, self.page_size) - len(req.pages)
        if missing > 0:
            new_pages = self.allocator.allocate(missing)
            self.tables.set_pages(req.table_row, len(req.pages), new_pages)
            req.pages.extend(new_pages)

    # ---- applying a step's results ---------------------------------------------------------------

    def process(self, batch: Batch, tokens: list[int | None]) -> list[Request]:
        """Advance every request of the batch; returns the requests that finished in this step."""
        finished: list[Request] = []
        for chunk, token in zip(batch.chunks, tokens, strict=True):
            req = chunk.req
            req.num_computed = chunk.end
            if token is None:
                continue
            req.output_ids.append(token)
            req.finish_reason = self._finish_reason(req, token)
            if req.finish_reason is not None:
                finished.append(req)
        for req in finished:
            self._release(req)
        return finished

    def _finish_reason(self, req: Request, token: int) -> FinishReason | None:
        if not req.params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in req.params.stop_token_id_set:
            return "stop"
        if len(req.output_ids) >= req.params.max_tokens or req.seq_len >= self.max_seq_len:
            return "length"
        return None

    def _release(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.free(req.pages)
        req.pages = []
        self.tables.release_row(req.table_row)
        req.table_row = -1

"""The scheduler: decides what each engine step computes, and applies what the step produced.

Policy (one step at a time):
- Prefill first: requests owing more than one token of KV (chunked prefill in progress, then waiting
  requests in FIFO order) share a budget of `max_prefill_tokens` tokens; the last one may be cut into a
  chunk that continues next step. A waiting request reuses the longest cached prefix of its tokens.
  A request whose first tokens (a shared system prompt, the same prompt n times) are being computed by
  another request of the same batch waits one step and then takes them from the cache.
- Otherwise decode: every running request computes one token.
- Admission does not reserve each request's whole max_tokens: it expects a running request to still
  generate `new_token_ratio` of its remaining budget (the ratio decays while decoding goes well). When a
  decode step finds too few pages, the newest requests are retracted: their computed KV goes to the prefix
  cache, they return to the front of the queue and later resume where they stopped, outputs unchanged.
- A request that could never fit (prompt + max_tokens beyond the pool or the context) is rejected when
  it is added, never dropped or left waiting forever.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque

from minisgl.core import env
from minisgl.core.config import pages_for
from minisgl.core.kv.kv_cache import KVCacheManager
from minisgl.core.request import FinishReason, Request
from minisgl.core.request_error import InvalidRequestError
from minisgl.core.scheduler.batch import Batch, Chunk

# Stands in output_ids for a token that is sampled on the device but not yet copied to the host.
PLACEHOLDER = -1

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_seq_len: int,
        max_running_requests: int,
        max_prefill_tokens: int,
        eos_token_ids: tuple[int, ...],
        mix_decode_into_prefill: bool = True,
    ) -> None:
        self.kv = kv
        # Decode steps of running requests join prefill batches: while prompts are being prefilled, the
        # requests already generating keep going (prefill is compute-bound, decode memory-bound).
        self.mix_decode_into_prefill = mix_decode_into_prefill
        self.page_size = kv.page_size
        self.max_seq_len = max_seq_len
        self.max_running_requests = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.init_new_token_ratio = env.INIT_NEW_TOKEN_RATIO.get()
        self.min_new_token_ratio = env.MIN_NEW_TOKEN_RATIO.get()
        self.new_token_ratio_decay = env.NEW_TOKEN_RATIO_DECAY.get()
        self.new_token_ratio = self.init_new_token_ratio
        # Prompts whose first this-many tokens are being computed in the batch being formed wait a step.
        self.shared_prefix_tokens = max(1, env.IN_BATCH_PREFIX_TOKENS.get())
        self.num_retractions = 0
        self._admissions = itertools.count()

    # ---- admission -------------------------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse a request whose prompt and output (within the context, request_checks.output_budget)
        could never be in the KV pool at once."""
        needed = pages_for(prompt_len + max_new_tokens, self.page_size)
        if needed > self.kv.num_pages:
            raise InvalidRequestError(
                "prompt",
                f"request needs {needed} KV pages (prompt {prompt_len} + {max_new_tokens} new tokens) "
                f"but the KV pool has only {self.kv.num_pages}",
            )

    def add(self, req: Request) -> None:
        """Queue a request that check_fits accepted."""
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _expected_pages(self, req: Request) -> int:
        """Pages req may still need: the rest of its known tokens, plus the expected share of the tokens
        it may still generate."""
        final = len(req.prompt_ids) + req.max_new_tokens
        expected_new = math.ceil((final - req.seq_len) * self.new_token_ratio)
        return max(0, pages_for(req.seq_len + expected_new, self.page_size) - len(req.pages))

    def _try_admit(self, req: Request, reserved: int) -> int | None:
        """Admit req if the KV it is expected to need fits beside `reserved` (what the running requests
        are expected to need); returns req's own expectation, or None if it must wait."""
        if len(self.running) >= self.max_running_requests or self.kv.tables.num_free_rows == 0:
            return None
        self.kv.attach(req, use_cache=not req.params.prompt_logprobs)
        expected = self._expected_pages(req)
        if self.kv.available_pages - reserved < expected:
            self.kv.detach(req)
            req.num_computed = 0
            return None
        if req.admitted_at < 0:
            req.num_cached = req.num_computed
        req.admitted_at = next(self._admissions)
        self.running.append(req)
        return expected

    # ---- batch formation -------------------------------------------------------------------------

    def schedule(self, allow_retract: bool = True) -> Batch | None:
        """The next batch, or None if nothing can run now. Without allow_retract (a batch is in flight,
        and retraction needs every request's tokens on the host) a batch that would need a retraction is
        not formed: the caller completes the batch in flight and asks again."""
        batch = self._schedule_prefill()
        if batch is not None:
            batch = self._fit(batch, allow_retract)
        if batch is None:
            batch = self._schedule_decode(allow_retract)
        if batch is not None:
            self.kv.grow_all([(chunk.req, chunk.end) for chunk in batch.chunks])
        return batch

    def _schedule_decode(self, allow_retract: bool) -> Batch | None:
        """One token for every running request that may still take one; the expected share of the
        remaining budgets decays with every decode batch."""
        decoding = [r for r in self.running if not self._fully_scheduled(r)]
        if not decoding:
            return None
        batch = self._fit(Batch([self._decode_chunk(r) for r in decoding], True), allow_retract)
        ratio = self.new_token_ratio - self.new_token_ratio_decay
        self.new_token_ratio = max(self.min_new_token_ratio, ratio)
        return batch

    @staticmethod
    def _decode_chunk(req: Request) -> Chunk:
        return Chunk(req, req.num_computed, req.seq_len, is_prefill=False)

    def _fully_scheduled(self, req: Request) -> bool:
        """Its last token is already in flight (max_tokens or the context reached)."""
        return req.awaits_last_token or req.seq_len >= self.max_seq_len

    def on_launch(self, batch: Batch) -> None:
        """The batch is on the device: its positions count as computed, and every sampling chunk gets a
        placeholder token, so the next batch can be scheduled before the tokens reach the host.
        Prefilled prefixes go to the prefix cache now, not when the results arrive, so that the next
        batch can already share them: any batch reading them runs after this one on the device."""
        for chunk in batch.chunks:
            chunk.req.num_computed = chunk.end
            if chunk.samples:
                chunk.req.output_ids.append(PLACEHOLDER)
                chunk.req.num_pending += 1
            if chunk.is_prefill:
                self.kv.cache_progress(chunk.req)

    def needs_latest_tokens(self) -> bool:
        """Whether a running request's next step depends on its previous token's value on the host
        (penalties count generated tokens; logprobs of a constrained request, which the engine's late
        sampling does not give), so the step in flight must complete first."""
        return any(
            r.params.has_penalties or (r.grammar is not None and r.params.logprobs is not None)
            for r in self.running
        )

    def _schedule_prefill(self) -> Batch | None:
        """Requests still owing prompt tokens, then newly admitted ones, share max_prefill_tokens; the
        running decoders ride along when mix_decode_into_prefill."""
        chunks = self._continue_prefills()
        chunks += self._admit_waiting(self.max_prefill_tokens - _tokens_of(chunks))
        if not chunks:
            return None
        if self.mix_decode_into_prefill:
            chunks = self._decoding_alongside(chunks) + chunks
        return Batch(chunks, is_decode=False)

    def _continue_prefills(self) -> list[Chunk]:
        budget = self.max_prefill_tokens
        chunks: list[Chunk] = []
        for req in self.running:
            if req.is_prefilling and budget > 0:
                chunks.append(self._prefill_chunk(req, budget))
                budget -= chunks[-1].end - chunks[-1].start
        return chunks

    def _admit_waiting(self, budget: int) -> list[Chunk]:
        """Admit waiting requests in order while the budget and the pool allow, each with its first chunk."""
        chunks: list[Chunk] = []
        # First tokens that requests of this batch compute (not from the cache): a later request starting
        # with them waits one step, then shares them through the cache instead of computing them again.
        fresh_prefixes: set[tuple[int, ...]] = set()
        # Summed once per batch, then kept up to date: a running request's expectation does not change
        # while others are admitted (it depends on its own length, pages and the ratio only).
        reserved = sum(self._expected_pages(r) for r in self.running) if self.waiting else 0
        while self.waiting and budget > 0:
            req = self.waiting[0]
            prefix = self._shared_prefix(req)
            if prefix in fresh_prefixes:
                break
            expected = self._try_admit(req, reserved)
            if expected is None:
                break
            reserved += expected
            self.waiting.popleft()
            if prefix is not None and req.num_computed < len(prefix):
                fresh_prefixes.add(prefix)
            chunks.append(self._prefill_chunk(req, budget))
            budget -= chunks[-1].end - chunks[-1].start
        return chunks

    def _decoding_alongside(self, prefill_chunks: list[Chunk]) -> list[Chunk]:
        prefilling = {id(c.req) for c in prefill_chunks}
        return [
            self._decode_chunk(r)
            for r in self.running
            if id(r) not in prefilling and not r.is_prefilling and not self._fully_scheduled(r)
        ]

    def _shared_prefix(self, req: Request) -> tuple[int, ...] | None:
        """The first tokens by which requests of one batch are recognized as sharing a prefix: the whole
        prompt when it is short (n samples, repeated prompts). None for a request that reads no cache."""
        if req.params.prompt_logprobs:
            return None
        return tuple(req.prompt_ids[: self.shared_prefix_tokens])

    @staticmethod
    def _prefill_chunk(req: Request, budget: int) -> Chunk:
        return Chunk(req, req.num_computed, min(req.seq_len, req.num_computed + budget))

    def _pages_needed(self, batch: Batch) -> int:
        return sum(max(0, pages_for(c.end, self.page_size) - len(c.req.pages)) for c in batch.chunks)

    def _fit(self, batch: Batch, allow_retract: bool) -> Batch | None:
        """Retract the newest requests until the batch's new pages fit; None if nothing is left to run."""
        retracted = 0
        while self._pages_needed(batch) > self.kv.available_pages:
            if not allow_retract:
                return None
            if len(self.running) <= 1:
                raise RuntimeError(
                    "a lone request does not fit the KV pool; check_fits should have refused it"
                )
            newest = max(self.running, key=lambda r: r.admitted_at)
            self._retract(newest)
            batch.chunks = [c for c in batch.chunks if c.req is not newest]
            retracted += 1
        if retracted:
            self._note_retractions(retracted)
        return batch if batch.chunks else None

    def _note_retractions(self, retracted: int) -> None:
        self.num_retractions += retracted
        # Admission was too optimistic: expect more of the remaining budgets to be used again.
        self.new_token_ratio = self.init_new_token_ratio
        logger.info("KV pool full: retracted %d request(s), %d still running", retracted, len(self.running))

    def _retract(self, req: Request) -> None:
        """Send a running request back to the front of the queue. Its computed KV stays in the prefix cache
        (until evicted), so resuming usually recomputes little; its outputs are kept."""
        assert req.num_pending == 0, "retracting a request whose tokens are still in flight"
        self.running.remove(req)
        self.kv.detach(req)
        req.num_computed = 0
        req.num_retractions += 1
        self.waiting.appendleft(req)

    # ---- applying a step's results ---------------------------------------------------------------

    def process(self, batch: Batch, tokens: list[int | None]) -> list[Request]:
        """Apply a completed batch's tokens; returns the requests that finished with them. Requests that
        finished or were aborted while the batch was in flight are skipped."""
        finished: list[Request] = []
        for chunk, token in zip(batch.chunks, tokens, strict=True):
            req = chunk.req
            if token is None or req.finish_reason is not None:
                continue
            index = chunk.end - len(req.prompt_ids)  # this token's place among the outputs
            req.output_ids[index] = token
            req.num_pending -= 1
            req.finish_reason = self._finish_reason(req, token, index + 1)
            if req.finish_reason is not None:
                self.finish(req)
                finished.append(req)
        return finished

    def _finish_reason(self, req: Request, token: int, num_outputs: int) -> FinishReason | None:
        if not req.params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in req.params.stop_token_id_set:
            return "stop"
        if num_outputs >= req.max_new_tokens:  # max_tokens, or the end of the context
            return "length"
        return None

    def finish(self, req: Request) -> None:
        """Drop any token launched after the final one (it is discarded) and release the request."""
        keep = len(req.output_ids) - req.num_pending
        del req.output_ids[keep:]
        req.num_pending = 0
        req.num_computed = min(req.num_computed, req.seq_len)
        self.release(req)

    def release(self, req: Request) -> None:
        """Take a finished request out of the running set, caching its KV and freeing the rest."""
        self.running.remove(req)
        self.kv.detach(req)

    def abort(self, uid: int, reason: FinishReason = "abort") -> Request | None:
        """Stop request uid wherever it is; returns it (with finish_reason `reason`), or None if
        unknown/done."""
        for req in self.waiting:
            if req.uid == uid:
                self.waiting.remove(req)
                req.finish_reason = reason
                return req
        for req in self.running:
            if req.uid == uid:
                req.finish_reason = reason
                self.finish(req)
                return req
        return None

    def check_integrity(self) -> None:
        for req in self.waiting:
            assert not req.pages and req.table_row == -1, f"waiting request {req.uid} holds KV"
        self.kv.check_integrity(self.running)


def _tokens_of(chunks: list[Chunk]) -> int:
    return sum(c.end - c.start for c in chunks)

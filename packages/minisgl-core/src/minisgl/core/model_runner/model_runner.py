"""The model runner: turns a scheduled Batch into device tensors, runs the model, samples, and writes
the sampled tokens back into the device token table."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from minisgl.core.attention import AttentionBackend, BatchLayout
from minisgl.core.kv.kv_pool import KVPool
from minisgl.core.kv.tables import RequestTables
from minisgl.core.model_runner.cuda_graph import DecodeGraphRunner
from minisgl.core.model_runner.forward_context import ForwardContext, forward_context
from minisgl.core.model_runner.transfer import to_device
from minisgl.core.models.decoder import DecoderForCausalLM
from minisgl.core.request import Request
from minisgl.core.sampling.sampler import SampleOutput, sample
from minisgl.core.sampling.structured import mask_logits
from minisgl.core.scheduler.batch import Batch, Chunk


@dataclass
class StepOutput:
    """Per chunk of the batch (None where the chunk sampled nothing)."""

    tokens: list[int | None]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]
    # Logprobs of prompt tokens start+1 .. end (where known) for chunks that asked for them, and the top
    # alternatives at each of those positions (empty dicts when the request asked for none).
    prompt_logprobs: list[list[float]] = field(default_factory=list)
    prompt_top_logprobs: list[list[dict[int, float]]] = field(default_factory=list)


@dataclass
class PromptLogprobs:
    """Device tensors of one chunk's prompt logprobs: the prompt tokens' own, and the top k per position."""

    chosen: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_values: torch.Tensor | None = None

    def to_host(self) -> tuple[list[float], list[dict[int, float]]]:
        chosen = self.chosen.tolist()
        if self.top_ids is None or self.top_values is None:
            return chosen, [{} for _ in chosen]
        ids, values = self.top_ids.tolist(), self.top_values.tolist()
        tops = [dict(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]
        return chosen, tops


@dataclass
class LateRows:
    """Sampled rows of constrained requests whose previous token was still in flight at launch: their
    grammar mask needs that token, so they are sampled (sample_late) once it has reached the host."""

    rows: list[int]  # into the step's sampled rows
    requests: list[Request]
    num_generated: list[int]  # each request's tokens before this one, as at launch (min_tokens)
    logits: torch.Tensor
    table_rows: torch.Tensor
    columns: torch.Tensor


@dataclass
class PendingStep:
    """A launched step whose results are still on the way to the host."""

    num_chunks: int
    sampling: list[int]  # chunk index of each sampled row
    result: SampleOutput | None
    tokens_host: torch.Tensor | None
    done: torch.cuda.Event | None
    requested_logprobs: list[int]  # k asked for, per row of result.logprob_rows
    prompt_logprobs: dict[int, PromptLogprobs]
    # Set when the engine times steps on the device: recorded before the step's first device work.
    started: torch.cuda.Event | None = None
    late: LateRows | None = None

    def device_seconds(self) -> float | None:
        """Device time from the stream reaching this step to its end (call after wait), if timed."""
        if self.started is None or self.done is None:
            return None
        return self.started.elapsed_time(self.done) / 1000

    def wait(self) -> StepOutput:
        """Block until the step has finished on the device; returns its results on the host."""
        assert self.late is None, "the step's late rows were never sampled"
        if self.done is not None:
            self.done.synchronize()
        n = self.num_chunks
        output = StepOutput(
            [None] * n, [None] * n, [None] * n, [[] for _ in range(n)], [[] for _ in range(n)]
        )
        for i, values in self.prompt_logprobs.items():
            output.prompt_logprobs[i], output.prompt_top_logprobs[i] = values.to_host()
        if self.result is None or self.tokens_host is None:
            return output
        for row, token in zip(self.sampling, self.tokens_host.tolist(), strict=True):
            output.tokens[row] = token
        self._fill_logprobs(self.result, output)
        return output

    def _fill_logprobs(self, result: SampleOutput, output: StepOutput) -> None:
        if result.chosen_logprobs is None:
            return
        chosen = result.chosen_logprobs.tolist()
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_values = result.top_values.tolist() if result.top_values is not None else None
        for j, row in enumerate(result.logprob_rows):
            chunk = self.sampling[row]
            output.logprobs[chunk] = chosen[j]
            k = self.requested_logprobs[j]
            tops = {}
            if k and top_ids is not None and top_values is not None:
                tops = dict(zip(top_ids[j][:k], top_values[j][:k], strict=True))
            output.top_logprobs[chunk] = tops


class ModelRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_pool: KVPool,
        tables: RequestTables,
        backend: AttentionBackend,
        device: torch.device,
        generator: torch.Generator,
        graphs: DecodeGraphRunner | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.tables = tables
        self.backend = backend
        self.device = device
        # Draws the noise of sampled requests that have no seed of their own.
        self.generator = generator
        self.graphs = graphs
        # For min_tokens: EOS may not be sampled before a request has generated that many tokens.
        self.eos_token_ids = eos_token_ids
        self._is_cuda = device.type == "cuda"
        # Record CUDA events around every step (for benchmarks: device busy time against wall time).
        self.time_device = False
        # Seconds the last launch waited for the device (for the planner's host buffers).
        self.last_launch_wait = 0.0
        # Set once a step's host-to-device planning copies have run: FlashInfer's planner reuses pinned
        # host buffers, so the next plan must not overwrite them before then.
        self._planned: torch.cuda.Event | None = None

    @torch.inference_mode()
    def launch(self, batch: Batch) -> PendingStep:
        """Enqueue one step on the device and return without waiting for it."""
        waiting_since = time.perf_counter()
        if self._planned is not None:
            self._planned.synchronize()
        self.last_launch_wait = time.perf_counter() - waiting_since
        started = self._event() if self.time_device else None
        pending = self._launch(batch)
        pending.started = started
        return pending

    def _launch(self, batch: Batch) -> PendingStep:
        self.tables.flush()
        layout, token_rows = self._layout(batch)
        input_ids = self.tables.token_table[token_rows, layout.positions]
        if batch.is_decode and self.graphs is not None and self.graphs.fits(len(batch.chunks)):
            size = self.graphs.prepare(input_ids, layout)
            # Marked before the replay: the next launch waits only for this plan's copies, so the host
            # prepares and launches the next graph while this one runs.
            self._mark_planned()
            graph_logits = self.graphs.replay(size, len(batch.chunks))
            return self._sample(batch.chunks, list(range(len(batch.chunks))), graph_logits, {})
        metadata = self.backend.prepare(layout, self.kv_pool)
        self._mark_planned()
        with forward_context(ForwardContext(self.kv_pool, self.backend, metadata, layout.out_slots)):
            hidden = self.model(input_ids, layout.positions)
        first_rows = list(itertools.accumulate(layout.query_lens_host, initial=0))
        prompt_logprobs = {
            i: self._prompt_logprobs(c, hidden, first_rows[i])
            for i, c in enumerate(batch.chunks)
            if c.req.params.prompt_logprobs
        }
        sampling = [i for i, c in enumerate(batch.chunks) if c.samples]
        logits = (
            self.model.compute_logits(
                hidden[to_device([first_rows[i + 1] - 1 for i in sampling], torch.int64, self.device)]
            )
            if sampling
            else None
        )
        return self._sample(batch.chunks, sampling, logits, prompt_logprobs)

    def _mark_planned(self) -> None:
        self._planned = self._event()

    def _event(self) -> torch.cuda.Event | None:
        """A CUDA event recorded on the current stream now (None on the CPU)."""
        if not self._is_cuda:
            return None
        event = torch.cuda.Event(enable_timing=self.time_device)
        event.record()
        return event

    def _layout(self, batch: Batch) -> tuple[BatchLayout, torch.Tensor]:
        """The batch's layout for the attention backend, and the table row of every token."""
        chunks = batch.chunks
        page_size = self.kv_pool.page_size
        positions_host = [p for c in chunks for p in range(c.start, c.end)]
        query_lens = [c.end - c.start for c in chunks]
        starts = list(itertools.accumulate(query_lens, initial=0))
        positions = to_device(positions_host, torch.int64, self.device)
        request_rows = to_device([c.req.table_row for c in chunks], torch.int64, self.device)
        page_table = self.tables.page_table[request_rows]
        token_request = torch.repeat_interleave(
            torch.arange(len(chunks), device=self.device),
            to_device(query_lens, torch.int64, self.device),
            output_size=len(positions_host),
        )
        pages = page_table[token_request, positions // page_size].long()
        layout = BatchLayout(
            positions=positions,
            out_slots=pages * page_size + positions % page_size,
            query_starts=to_device(starts, torch.int64, self.device),
            kv_lens=to_device([c.end for c in chunks], torch.int64, self.device),
            page_table=page_table,
            query_lens_host=query_lens,
            kv_lens_host=[c.end for c in chunks],
            is_decode=batch.is_decode,
        )
        return layout, request_rows[token_request]

    def _sample(
        self,
        chunks: list[Chunk],
        sampling: list[int],
        logits: torch.Tensor | None,
        prompt_logprobs: dict[int, PromptLogprobs],
    ) -> PendingStep:
        if logits is None:
            done = self._event() if self.time_device else None
            return PendingStep(len(chunks), [], None, None, done, [], prompt_logprobs)
        requests = [chunks[i].req for i in sampling]
        late, ready = _split_late(requests)
        if late:
            result = self._sample_ready(logits, requests, ready)
        else:
            mask_logits(logits, requests)  # only the constrained rows change
            result = sample(logits, requests, self.generator, self.eos_token_ids)
        # The next step reads its input ids from the token table: write the new tokens there on the device.
        rows = to_device([r.table_row for r in requests], torch.int64, self.device)
        columns = to_device([chunks[i].end for i in sampling], torch.int64, self.device)
        requested = [requests[row].params.logprobs or 0 for row in result.logprob_rows]
        pending = PendingStep(len(chunks), sampling, result, None, None, requested, prompt_logprobs)
        if not late:
            self.tables.token_table[rows, columns] = result.tokens
            self._finish_step(pending)
            return pending
        ready_index = to_device(ready, torch.int64, self.device)
        self.tables.token_table[rows[ready_index], columns[ready_index]] = result.tokens[ready_index]
        pending.late = self._late_rows(late, requests, logits, rows, columns)
        return pending

    def _late_rows(
        self,
        late: list[int],
        requests: list[Request],
        logits: torch.Tensor,
        rows: torch.Tensor,
        columns: torch.Tensor,
    ) -> LateRows:
        """What sample_late needs of the rows it samples: their logits and token-table cells."""
        index = to_device(late, torch.int64, self.device)
        late_requests = [requests[j] for j in late]
        generated = [len(r.output_ids) for r in late_requests]
        return LateRows(late, late_requests, generated, logits[index], rows[index], columns[index])

    def _sample_ready(self, logits: torch.Tensor, requests: list[Request], ready: list[int]) -> SampleOutput:
        """Sample the ready rows only (the late ones' tokens are filled in by sample_late)."""
        tokens = torch.zeros(len(requests), dtype=torch.int64, device=self.device)
        if not ready:
            return SampleOutput(tokens, [], None, None, None)
        index = to_device(ready, torch.int64, self.device)
        ready_logits = logits[index]
        ready_requests = [requests[j] for j in ready]
        mask_logits(ready_logits, ready_requests)
        result = sample(ready_logits, ready_requests, self.generator, self.eos_token_ids)
        tokens[index] = result.tokens
        logprob_rows = [ready[k] for k in result.logprob_rows]
        return SampleOutput(tokens, logprob_rows, result.chosen_logprobs, result.top_ids, result.top_values)

    @torch.inference_mode()
    def sample_late(self, pending: PendingStep) -> None:
        """Sample the step's late rows, now that their requests' matchers have taken the tokens of the
        step before (a request finished meanwhile samples unconstrained: its token is dropped)."""
        late = pending.late
        if late is None:
            return
        pending.late = None
        live = [r if r.finish_reason is None else None for r in late.requests]
        mask_logits(late.logits, live)
        tokens = sample(
            late.logits, late.requests, self.generator, self.eos_token_ids, late.num_generated
        ).tokens
        assert pending.result is not None
        pending.result.tokens[to_device(late.rows, torch.int64, self.device)] = tokens
        self.tables.token_table[late.table_rows, late.columns] = tokens
        self._finish_step(pending)

    def _finish_step(self, pending: PendingStep) -> None:
        """Start copying the sampled tokens to the host and mark the step's end."""
        assert pending.result is not None
        tokens_host = torch.empty(len(pending.sampling), dtype=torch.int64, pin_memory=self._is_cuda)
        tokens_host.copy_(pending.result.tokens, non_blocking=True)
        pending.tokens_host = tokens_host
        pending.done = self._event()

    def _prompt_logprobs(self, chunk: Chunk, hidden: torch.Tensor, first_row: int) -> PromptLogprobs:
        """Logprob of each prompt token at positions start+1 .. min(end, prompt_len - 1), and the
        request's `logprobs` most likely tokens at each of those positions."""
        prompt = chunk.req.prompt_ids
        last = min(chunk.end, len(prompt) - 1)
        if last <= chunk.start:
            return PromptLogprobs(torch.empty(0))
        targets = to_device(prompt[chunk.start + 1 : last + 1], torch.int64, self.device)
        rows = hidden[first_row : first_row + len(targets)]
        logprobs = self.model.compute_logits(rows).float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        k = chunk.req.params.logprobs or 0
        if k == 0:
            return PromptLogprobs(chosen)
        top_values, top_ids = logprobs.topk(k, dim=-1)
        return PromptLogprobs(chosen, top_ids, top_values)


def _split_late(requests: list[Request]) -> tuple[list[int], list[int]]:
    """(late, ready) rows. Structured output: a constrained request whose previous token is still in
    flight is sampled late, once its matcher has taken that token."""
    late = [j for j, r in enumerate(requests) if r.grammar is not None and r.num_pending > 0]
    late_set = set(late)
    return late, [j for j in range(len(requests)) if j not in late_set]

"""The model runner: turns a scheduled Batch into device tensors, runs the model, samples, and writes
the sampled tokens back into the device token table."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from minisgl.core.attention import AttentionBackend, BatchLayout
from minisgl.core.batch import Batch, Chunk
from minisgl.core.cuda_graph import DecodeGraphRunner
from minisgl.core.forward_context import ForwardContext, forward_context
from minisgl.core.kv_pool import KVPool
from minisgl.core.models.decoder import DecoderForCausalLM
from minisgl.core.sampler import sample
from minisgl.core.tables import RequestTables


@dataclass
class StepOutput:
    """Per chunk of the batch (None where the chunk sampled nothing)."""

    tokens: list[int | None]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]
    # Logprobs of prompt tokens start+1 .. end (where known) for chunks that asked for them.
    prompt_logprobs: list[list[float]] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_pool: KVPool,
        tables: RequestTables,
        backend: AttentionBackend,
        device: torch.device,
        generator: torch.Generator,
        graphs: DecodeGraphRunner | None = None,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.tables = tables
        self.backend = backend
        self.device = device
        # Draws the noise of sampled requests that have no seed of their own.
        self.generator = generator
        self.graphs = graphs

    @torch.inference_mode()
    def step(self, batch: Batch) -> StepOutput:
        layout = self._layout(batch)
        rows = self._token_rows(batch.chunks)
        input_ids = self.tables.token_table[rows, layout.positions]
        if batch.is_decode and self.graphs is not None and self.graphs.fits(len(batch.chunks)):
            logits = self.graphs.run(
                input_ids, layout.positions, layout.out_slots, layout.page_table, layout.kv_lens_host
            )
            output = self._empty_output(len(batch.chunks))
            self._sample(batch.chunks, list(range(len(batch.chunks))), logits, output)
            return output
        metadata = self.backend.prepare(layout, self.kv_pool)
        with forward_context(ForwardContext(self.kv_pool, self.backend, metadata)):
            hidden = self.model(input_ids, layout.positions)
        return self._sample_hidden(batch.chunks, hidden, layout)

    def _token_rows(self, chunks: list[Chunk]) -> torch.Tensor:
        rows = [c.req.table_row for c in chunks for _ in range(c.end - c.start)]
        return torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)

    def _layout(self, batch: Batch) -> BatchLayout:
        chunks = batch.chunks
        page_size = self.kv_pool.page_size
        positions_host = [p for c in chunks for p in range(c.start, c.end)]
        query_lens = [c.end - c.start for c in chunks]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        positions = torch.tensor(positions_host, dtype=torch.int64).to(self.device, non_blocking=True)
        request_rows = torch.tensor([c.req.table_row for c in chunks], dtype=torch.int64).to(self.device)
        page_table = self.tables.page_table[request_rows]
        token_request = torch.repeat_interleave(
            torch.arange(len(chunks), device=self.device), torch.tensor(query_lens, device=self.device)
        )
        pages = page_table[token_request, positions // page_size].long()
        return BatchLayout(
            positions=positions,
            out_slots=pages * page_size + positions % page_size,
            query_starts=torch.tensor(starts, dtype=torch.int64).to(self.device),
            kv_lens=torch.tensor([c.end for c in chunks], dtype=torch.int64).to(self.device),
            page_table=page_table,
            query_lens_host=query_lens,
            kv_lens_host=[c.end for c in chunks],
            is_decode=batch.is_decode,
        )

    @staticmethod
    def _empty_output(size: int) -> StepOutput:
        return StepOutput([None] * size, [None] * size, [None] * size, [[] for _ in range(size)])

    def _sample_hidden(self, chunks: list[Chunk], hidden: torch.Tensor, layout: BatchLayout) -> StepOutput:
        first_rows = list(itertools.accumulate(layout.query_lens_host, initial=0))
        output = self._empty_output(len(chunks))
        for i, chunk in enumerate(chunks):
            if chunk.req.params.prompt_logprobs:
                output.prompt_logprobs[i] = self._prompt_logprobs(chunk, hidden, first_rows[i])
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        if sampling:
            logits = self.model.compute_logits(hidden[[first_rows[i + 1] - 1 for i in sampling]])
            self._sample(chunks, sampling, logits, output)
        return output

    def _sample(
        self, chunks: list[Chunk], sampling: list[int], logits: torch.Tensor, output: StepOutput
    ) -> None:
        result = sample(logits, [chunks[i].req for i in sampling], self.generator)
        # The next step reads its input ids from the token table: write the new tokens there on the device.
        rows = torch.tensor([chunks[i].req.table_row for i in sampling], device=self.device)
        columns = torch.tensor([chunks[i].end for i in sampling], device=self.device)
        self.tables.token_table[rows, columns] = result.tokens
        for j, token in enumerate(result.tokens.tolist()):
            i = sampling[j]
            output.tokens[i] = token
            output.logprobs[i] = result.logprobs[j]
            output.top_logprobs[i] = result.top_logprobs[j]

    def _prompt_logprobs(self, chunk: Chunk, hidden: torch.Tensor, first_row: int) -> list[float]:
        """Logprob of each prompt token at positions start+1 .. min(end, prompt_len - 1)."""
        prompt = chunk.req.prompt_ids
        last = min(chunk.end, len(prompt) - 1)
        if last <= chunk.start:
            return []
        targets = torch.tensor(prompt[chunk.start + 1 : last + 1], device=self.device)
        rows = hidden[first_row : first_row + len(targets)]
        logprobs = self.model.compute_logits(rows).float().log_softmax(dim=-1)
        return logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()

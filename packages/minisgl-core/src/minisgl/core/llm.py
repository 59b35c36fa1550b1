"""The offline API: `LLM(model).generate(prompts, params)` runs requests to completion in this process."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from minisgl.core.attention import create_backend
from minisgl.core.config import EngineConfig, ModelConfig, pages_for, parse_dtype, resolve_device
from minisgl.core.engine import Engine
from minisgl.core.kv_pool import KVPool
from minisgl.core.loader import build_model, load_hf_config, load_model_config, load_tokenizer
from minisgl.core.model_source import DEFAULT_MODEL, resolve_model
from minisgl.core.page_allocator import PageAllocator
from minisgl.core.request import GenerationResult, Request
from minisgl.core.sampling_params import SamplingParams
from minisgl.core.scheduler import Scheduler
from minisgl.core.tables import RequestTables

logger = logging.getLogger("minisgl")

Prompt = str | list[int]
Conversation = list[dict[str, Any]]


class LLM:
    """An engine in this process. Keyword options are the fields of EngineConfig."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: Any) -> None:
        unknown = set(engine_options) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        self.config = EngineConfig(**engine_options)
        self.config.validate()
        started = time.perf_counter()
        source = resolve_model(model)
        hf_config = load_hf_config(source)
        self.model_config: ModelConfig = load_model_config(source, hf_config)
        self.device = resolve_device(self.config.device)
        self.dtype = parse_dtype(self.config.dtype, self.model_config.checkpoint_dtype, self.device)
        self.tokenizer = load_tokenizer(source)
        self.model_config = self._with_tokenizer_eos(self.model_config)
        self.max_seq_len = min(self.config.max_seq_len or 1 << 62, self.model_config.max_position_embeddings)
        model_module = build_model(
            source, hf_config, self.model_config, self.dtype, self.device, self.config.load_format
        )
        num_pages = self._num_kv_pages()
        self.kv_pool = KVPool(
            self.model_config.num_layers,
            num_pages,
            self.config.page_size,
            self.model_config.local_kv_heads(self.config.tp_size),
            self.model_config.head_dim,
            self.dtype,
            self.device,
        )
        rows = self.config.max_running_requests
        self.tables = RequestTables(rows, self.max_seq_len, self.config.page_size, self.device)
        self.allocator = PageAllocator(num_pages)
        self.engine = Engine(model_module, self.kv_pool, self.tables, create_backend("torch"), self.device)
        self.scheduler = Scheduler(
            self.allocator,
            self.tables,
            self.max_seq_len,
            self.config.max_running_requests,
            self.config.max_prefill_tokens,
            self.model_config.eos_token_ids,
        )
        self._rids = itertools.count()
        self._rng = torch.Generator().manual_seed(self.config.seed)
        logger.info(
            "loaded %s (%s) on %s in %s: %d KV pages of %d tokens, context %d, in %.1f s",
            source.name,
            self.model_config.architecture,
            self.device,
            self.dtype,
            num_pages,
            self.config.page_size,
            self.max_seq_len,
            time.perf_counter() - started,
        )

    def _with_tokenizer_eos(self, config: ModelConfig) -> ModelConfig:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None or eos in config.eos_token_ids:
            return config
        from dataclasses import replace

        return replace(config, eos_token_ids=(*config.eos_token_ids, int(eos)))

    def _num_kv_pages(self) -> int:
        if self.config.num_kv_pages is not None:
            return self.config.num_kv_pages
        cfg = self.model_config
        bytes_per_page = (
            KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype)
            * self.config.page_size
        )
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1.0 - self.config.memory_ratio) * total
        else:
            budget = self.config.cpu_kv_cache_gib * (1 << 30)
        # More pages than every row filled to the context length can never be used.
        useful = self.config.max_running_requests * pages_for(self.max_seq_len, self.config.page_size)
        pages = min(int(budget // bytes_per_page), useful)
        if pages < 1:
            raise ValueError("not enough memory for a single KV page; lower memory use or raise memory_ratio")
        return pages

    # ---- public API ------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerationResult]:
        prompt_ids = [self._tokenize(p) for p in _as_prompt_list(prompts)]
        params = _as_params_list(sampling_params, len(prompt_ids))
        # Validate everything before queuing anything, so a bad prompt leaves the engine untouched.
        for ids, p in zip(prompt_ids, params, strict=True):
            p.validate()
            self._check_token_ids(ids)
            self.scheduler.check_fits(len(ids), p.max_tokens)
        requests = [self._make_request(ids, p) for ids, p in zip(prompt_ids, params, strict=True)]
        for req in requests:
            self.scheduler.add(req)
        self._run(len(requests), use_tqdm)
        return [self._result(req) for req in requests]

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerationResult]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        batch = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        prompts: list[list[int]] = []
        for conversation in batch:
            if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
                raise ValueError("a conversation must be a list of {'role': ..., 'content': ...} messages")
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
            # The template already holds any BOS token: adding special tokens again would double it.
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params, use_tqdm)

    # ---- internals -------------------------------------------------------------------------------

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            return list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def _check_token_ids(self, ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        for token in ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise ValueError(f"token id {token!r} is outside the vocabulary [0, {vocab})")

    def _make_request(self, ids: list[int], params: SamplingParams) -> Request:
        seed = (
            params.seed if params.seed is not None else int(torch.randint(1 << 62, (1,), generator=self._rng))
        )
        generator = None
        if not params.is_greedy:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return Request(next(self._rids), ids, params, generator=generator)

    def _run(self, num_requests: int, use_tqdm: bool) -> None:
        bar = tqdm(total=num_requests, desc="Generating", disable=not use_tqdm or num_requests < 2)
        started, generated = time.perf_counter(), 0
        while self.scheduler.has_work():
            batch = self.scheduler.schedule()
            if batch is None:
                raise RuntimeError("scheduler has waiting requests but cannot run any (KV pool too small?)")
            output = self.engine.step(batch)
            for chunk, prompt_logprobs in zip(batch.chunks, output.prompt_logprobs, strict=True):
                if chunk.req.params.prompt_logprobs and chunk.start == 0:
                    chunk.req.prompt_logprobs.append(None)
                chunk.req.prompt_logprobs.extend(prompt_logprobs)
            for chunk, logprob, top in zip(batch.chunks, output.logprobs, output.top_logprobs, strict=True):
                if logprob is not None:
                    chunk.req.output_logprobs.append(logprob)
                    chunk.req.output_top_logprobs.append(top or {})
            finished = self.scheduler.process(batch, output.tokens)
            generated += sum(t is not None for t in output.tokens)
            if finished:
                bar.update(len(finished))
                bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.0f}")
        bar.close()

    def _result(self, req: Request) -> GenerationResult:
        assert req.finish_reason is not None
        text_ids = req.output_ids
        if req.finish_reason == "stop" and text_ids:
            text_ids = text_ids[:-1]  # the stop or EOS token is reported in token_ids, not in the text
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        wants_logprobs = req.params.logprobs is not None
        return GenerationResult(
            text=text,
            token_ids=list(req.output_ids),
            finish_reason=req.finish_reason,
            num_prompt_tokens=len(req.prompt_ids),
            num_cached_tokens=req.num_cached,
            logprobs=list(req.output_logprobs) if wants_logprobs else None,
            top_logprobs=list(req.output_top_logprobs) if wants_logprobs else None,
            prompt_logprobs=list(req.prompt_logprobs) if req.params.prompt_logprobs else None,
        )


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(
            "prompts must be a string, a list of strings, or a list of token-id lists (non-empty)"
        )
    return list(prompts)


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return list(params)

"""The runtime: one loaded model with its KV pool, tables, scheduler and engine, driven one step at a
time. The offline `LLM` runs it to completion; a server's scheduler process steps it between messages."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from minisgl.core import env
from minisgl.core.attention import SplitBackend, create_backend
from minisgl.core.attention.flashinfer_backend import FlashInferBackend
from minisgl.core.batch import Batch
from minisgl.core.config import (
    EngineConfig,
    ModelConfig,
    default_page_size,
    pages_for,
    parse_dtype,
    parse_kv_cache_dtype,
    resolve_device,
)
from minisgl.core.cuda_graph import DecodeGraphRunner
from minisgl.core.distributed import (
    disagreeing_rank,
    get_tp,
    init_distributed,
    min_over_ranks,
    shutdown_distributed,
)
from minisgl.core.engine import Engine, PendingStep
from minisgl.core.gguf_cache import converted
from minisgl.core.kv_cache import KVCacheManager
from minisgl.core.kv_pool import KVPool
from minisgl.core.loader import build_model, load_hf_config, load_model_config, load_tokenizer
from minisgl.core.lockstep import AbortRequest, AddRequest, Lockstep, Stop
from minisgl.core.model_source import resolve_model
from minisgl.core.models.decoder import DecoderForCausalLM
from minisgl.core.request import FinishReason, Request
from minisgl.core.request_checks import CheckedRequest, check_token_ids, output_budget
from minisgl.core.request_error import InvalidRequestError
from minisgl.core.sampling_params import SamplingParams
from minisgl.core.scheduler import Scheduler
from minisgl.core.structured import GrammarCompiler
from minisgl.core.tables import RequestTables

logger = logging.getLogger("minisgl")

# GPU memory kept out of the KV pool for activations, logits and CUDA graphs.
ACTIVATION_RESERVE_BYTES = 3 << 30


@dataclass
class Launched:
    batch: Batch
    pending: PendingStep


@dataclass
class StepResult:
    """What one call of Runtime.step applied: the completed batch (None if it only launched one), the
    tokens it gave each still-live request, and the requests that finished."""

    batch: Batch | None
    new_tokens: list[tuple[Request, int]]
    finished: list[Request]

    @property
    def num_new_tokens(self) -> int:
        return len(self.new_tokens)


@dataclass
class StepRecord:
    """One completed step: what it ran and how long it took."""

    is_decode: bool
    num_chunks: int
    num_tokens: int
    kv_tokens: int  # cached plus new tokens the step's attention read
    wall_seconds: float
    host_wait_seconds: float  # of the wall time, the host waiting for the device
    device_seconds: float | None  # set when the engine times steps on the device


@dataclass
class StepTiming:
    """Wall time of steps by kind of the batch they complete. With overlap scheduling a step launches one
    batch and completes the previous one, so the split between kinds is approximate (on the CPU, where a
    launch computes the whole forward pass, it is off by one batch). With device timing on, the device
    time of each step too: wall time minus device time is when the device waited for the host."""

    steps: list[StepRecord] = field(default_factory=list)

    def record(self, batch: Batch, wall: float, host_wait: float, device: float | None) -> None:
        kv_tokens = sum(chunk.end for chunk in batch.chunks)
        self.steps.append(
            StepRecord(
                batch.is_decode, len(batch.chunks), batch.num_tokens, kv_tokens, wall, host_wait, device
            )
        )

    def summary(self) -> str:
        lines = []
        for name, decode in (("prefill", False), ("decode", True)):
            steps = [s for s in self.steps if s.is_decode == decode]
            wall = sum(s.wall_seconds for s in steps)
            tokens = sum(s.num_tokens for s in steps)
            line = f"{name}: {len(steps)} steps, {tokens} tokens, {wall:.2f} s"
            if decode:
                line += (
                    f", mean batch {tokens / max(1, len(steps)):.1f}"
                    f" ({1000 * wall / max(1, len(steps)):.2f} ms/step)"
                )
            line += f", host waited {sum(s.host_wait_seconds for s in steps):.2f} s"
            timed = [s.device_seconds for s in steps if s.device_seconds is not None]
            if timed:
                line += f"; device busy {sum(timed):.2f} s"
            lines.append(line)
        return "; ".join(lines)

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.steps]


class Runtime:
    """With tp_size > 1 every rank builds a Runtime (tp_rank 0..N-1, all meeting at dist_init_address,
    "host:port"); rank 0 is driven like a single-rank runtime and the others run `follow()`."""

    def __init__(
        self,
        model: str,
        config: EngineConfig,
        tp_rank: int = 0,
        dist_init_address: str | None = None,
        check_peers: Callable[[], None] | None = None,  # rank 0: raises when a rank it started died
    ) -> None:
        env.check_all()
        logging.getLogger("minisgl").setLevel(env.LOG_LEVEL.get().upper())
        if config.tp_size > 1 and dist_init_address is None:
            raise ValueError("tp_size > 1 needs dist_init_address (host:port where the ranks meet)")
        if not 0 <= tp_rank < config.tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside [0, tp_size={config.tp_size})")
        started = time.perf_counter()
        source = resolve_model(model)
        if config.load_format in ("auto", "dummy"):
            source = converted(source)  # a GGUF file: its Hugging Face conversion, made once
        hf_config = load_hf_config(source)
        self.device = _rank_device(resolve_device(config.device), tp_rank, config.tp_size)
        self.page_size = config.page_size or default_page_size(self.device)
        self.config = config = replace(config, page_size=self.page_size)
        self.tokenizer: Any | None = load_tokenizer(source)
        self.model_config = _with_tokenizer_eos(load_model_config(source, hf_config), self.tokenizer)
        self.model_config.check_tp(config.tp_size)
        self.dtype = parse_dtype(config.dtype, self.model_config.checkpoint_dtype, self.device)
        self.kv_dtype = parse_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.max_seq_len = _context_length(config.max_seq_len, self.model_config.max_position_embeddings)
        init_distributed(tp_rank, config.tp_size, dist_init_address or "", self.device, check_peers)
        try:
            self._build(source, hf_config, started)
        except BaseException:
            shutdown_distributed()  # leave the group, so that this process can start another runtime
            raise

    def _build(self, source: Any, hf_config: Any, started: float) -> None:
        config = self.config
        self.tp = get_tp()
        _check_same_settings(config, self.model_config)
        self.lockstep = Lockstep()
        model_module = build_model(
            source,
            hf_config,
            self.model_config,
            self.dtype,
            self.device,
            config.load_format,
            config.moe_backend,
        )
        # Every rank must schedule alike, so all use the smallest pool any of them can hold.
        num_pages = min_over_ranks(self._num_kv_pages())
        # One page more than the allocator hands out: the dummy page that CUDA-graph padding writes to.
        self.kv_pool = KVPool(
            self.model_config.num_layers,
            num_pages + 1,
            self.page_size,
            self.model_config.local_kv_heads(config.tp_size),
            self.model_config.head_dim,
            self.kv_dtype,
            self.device,
        )
        self._use_checkpoint_kv_scales(model_module)
        self.tables = RequestTables(
            config.max_running_requests, self.max_seq_len, self.page_size, self.device
        )
        self.kv = KVCacheManager(num_pages, self.tables, config.cache)
        self.engine = self._build_engine(model_module, dummy_page=num_pages)
        self.grammars = GrammarCompiler(
            self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids
        )
        self.debug_checks = env.DEBUG_CHECKS.get()
        self.scheduler = Scheduler(
            self.kv,
            self.max_seq_len,
            config.max_running_requests,
            config.max_prefill_tokens,
            self.model_config.eos_token_ids,
            config.mix_decode_into_prefill,
        )
        self._uids = itertools.count()  # ids of requests added without one
        # Per-step timing, for benchmarks (None: not recorded; a server would keep every step forever).
        self.timing: StepTiming | None = None
        # Overlap scheduling keeps up to two batches in flight: one running, one being prepared.
        overlap = not (config.disable_overlap or env.DISABLE_OVERLAP_SCHEDULING.get())
        self.max_in_flight = 2 if overlap else 1
        self.in_flight: deque[Launched] = deque()
        logger.info(
            "loaded %s (%s%s) on %s in %s: %d KV pages of %d tokens in %s, %s cache, context %d, in %.1f s",
            source.name,
            self.model_config.architecture,
            f", TP rank {self.tp.rank} of {self.tp.size}" if self.tp.size > 1 else "",
            self.device,
            self.dtype,
            num_pages,
            self.page_size,
            self.kv_dtype,
            config.cache,
            self.max_seq_len,
            time.perf_counter() - started,
        )

    def _build_engine(self, model: DecoderForCausalLM, dummy_page: int) -> Engine:
        cfg, tp = self.model_config, self.config.tp_size
        backend = create_backend(
            self.config.attn,
            cfg.num_heads // tp,
            cfg.local_kv_heads(tp),
            cfg.head_dim,
            self.dtype,
            self.kv_dtype,
            self.device,
            self.page_size,
        )
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        engine = Engine(
            model,
            self.kv_pool,
            self.tables,
            backend,
            self.device,
            generator,
            eos_token_ids=frozenset(self.model_config.eos_token_ids),
        )
        max_graph_bs = self.config.cuda_graph_max_bs
        if max_graph_bs is None:
            max_graph_bs = min(256, self.config.max_running_requests)
        decode_backend = backend.decode if isinstance(backend, SplitBackend) else backend
        if self.device.type == "cuda" and max_graph_bs > 0 and isinstance(decode_backend, FlashInferBackend):
            engine.graphs = DecodeGraphRunner(
                model, decode_backend, self.kv_pool, max_graph_bs, dummy_page, self.device
            )
            engine.graphs.capture()
        return engine

    def _use_checkpoint_kv_scales(self, model: DecoderForCausalLM) -> None:
        """An FP8 pool takes the checkpoint's per-layer k/v scales (1.0 for a layer without one)."""
        found = model.kv_scales
        if not found["k"] and not found["v"]:
            return
        if not self.kv_pool.quantized:
            logger.info("the checkpoint's KV cache scales are unused: the KV cache is %s", self.kv_dtype)
            return
        layers = range(self.model_config.num_layers)
        self.kv_pool.set_scales(
            [found["k"].get(i, 1.0) for i in layers], [found["v"].get(i, 1.0) for i in layers]
        )
        logger.info("FP8 KV cache scales from the checkpoint for %d layers", len(found["k"]))

    def _num_kv_pages(self) -> int:
        if self.config.num_kv_pages is not None:
            return self.config.num_kv_pages
        cfg = self.model_config
        per_token = KVPool.bytes_per_token(
            cfg.num_layers, cfg.local_kv_heads(self.config.tp_size), cfg.head_dim, self.kv_dtype
        )
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1.0 - self.config.memory_ratio) * total - ACTIVATION_RESERVE_BYTES
        else:
            budget = self.config.cpu_kv_cache_gib * (1 << 30)
        # More pages than every row filled to the context length can never be used.
        useful = self.config.max_running_requests * pages_for(self.max_seq_len, self.page_size)
        pages = min(int(budget // (per_token * self.page_size)), useful)
        if pages < 1:
            raise ValueError("not enough memory for a single KV page; free memory or raise memory_ratio")
        return pages

    # ---- driving ---------------------------------------------------------------------------------

    def check_request(
        self, prompt_ids: list[int], params: SamplingParams, refuse_overflow: bool = False
    ) -> CheckedRequest:
        """The request as add_checked takes it, or an InvalidRequestError (a ValueError) if it is invalid
        or could never run; changes nothing. refuse_overflow: an explicit max_tokens beyond the context
        is refused rather than cut at the context's end (request_checks.output_budget)."""
        params.ensure_valid()  # a no-op unless a field was set since the params were built
        check_token_ids(prompt_ids, params, self.model_config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop", "stop strings need a tokenizer, and this model has none; use stop_token_ids"
            )
        budget = output_budget(len(prompt_ids), params.max_tokens, self.max_seq_len, refuse_overflow)
        self.scheduler.check_fits(len(prompt_ids), budget)
        self.grammars.state_for(params)  # compiles (and caches) the grammar, or says why it cannot
        return CheckedRequest(list(prompt_ids), params, budget)

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """check_request, then add_checked."""
        return self.add_checked(self.check_request(prompt_ids, params))

    def add_checked(self, checked: CheckedRequest, uid: int | None = None) -> Request:
        """Queue a request check_request accepted, under the caller's uid (or a new one)."""
        self._check_leader("add_request")
        add = AddRequest(next(self._uids) if uid is None else uid, checked)
        self.lockstep.record(add)
        return self._add(add)

    def _add(self, add: AddRequest) -> Request:
        params = add.checked.params
        generator = None
        if params.seed is not None and not params.is_greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        req = Request(
            add.uid,
            list(add.checked.prompt_ids),
            params,
            add.checked.max_new_tokens,
            generator=generator,
            grammar=self.grammars.state_for(params),
        )
        self.scheduler.add(req)
        return req

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight)

    def step(self) -> StepResult:
        """Launch the next batch and apply the results of the oldest one in flight. With overlap
        scheduling, batch N+1 is launched before batch N's results are applied, so the host prepares
        the next step while the device runs the current one; a step may then apply nothing."""
        self._check_leader("step")
        if self.lockstep.enabled:
            self.lockstep.exchange()  # the followers apply our changes since the last step, then step too
        return self._step()

    def follow(self) -> None:
        """The loop of TP ranks > 0: apply the leader's changes and step in lockstep with it, until the
        leader shuts down."""
        if self.tp.is_leader:
            raise RuntimeError("follow() is for TP ranks > 0; rank 0 is driven with add_request/step")
        while True:
            for message in self.lockstep.exchange():
                if isinstance(message, Stop):
                    return
                if isinstance(message, AddRequest):
                    self._add(message)
                else:
                    self.scheduler.abort(message.uid)
            self._step()

    def shutdown(self) -> None:
        """Release the followers (rank 0) and leave the TP group; a no-op at tp=1."""
        if self.lockstep.enabled and self.tp.is_leader:
            self.lockstep.record(Stop())
            self.lockstep.exchange()
        shutdown_distributed()

    def _check_leader(self, what: str) -> None:
        if not self.tp.is_leader:
            raise RuntimeError(f"{what}() is for TP rank 0; rank {self.tp.rank} runs follow()")

    def _step(self) -> StepResult:
        started = time.perf_counter()
        if self.in_flight and self.scheduler.needs_latest_tokens():
            return self._complete(self.in_flight.popleft(), started, 0.0)
        launched = False
        launch_wait = 0.0
        if len(self.in_flight) < self.max_in_flight:
            batch = self.scheduler.schedule(allow_retract=not self.in_flight)
            if batch is not None:
                self.in_flight.append(Launched(batch, self.engine.launch(batch)))
                launch_wait = self.engine.last_launch_wait
                self.scheduler.on_launch(batch)
                launched = True
        if not self.in_flight:
            raise RuntimeError("requests are waiting but none can run: the KV pool is too small for them")
        if launched and len(self.in_flight) < self.max_in_flight:
            return StepResult(None, [], [])
        return self._complete(self.in_flight.popleft(), started, launch_wait)

    def _complete(self, launched: Launched, started: float, launch_wait: float) -> StepResult:
        waiting_since = time.perf_counter()
        batch, output = launched.batch, launched.pending.wait()
        host_wait = launch_wait + time.perf_counter() - waiting_since
        live = [c.req.finish_reason is None for c in batch.chunks]
        for i, (chunk, alive, logprob, top) in enumerate(
            zip(batch.chunks, live, output.logprobs, output.top_logprobs, strict=True)
        ):
            if not alive:
                continue
            _record_prompt_logprobs(
                chunk.req, chunk.start, output.prompt_logprobs[i], output.prompt_top_logprobs[i]
            )
            if logprob is not None:
                chunk.req.output_logprobs.append(logprob)
                chunk.req.output_top_logprobs.append(top or {})
        finished = self.scheduler.process(batch, output.tokens)
        finished += self._advance_grammars(batch, output.tokens)
        if self.in_flight:  # the next step's constrained rows waited for these tokens
            self.engine.sample_late(self.in_flight[0].pending)
        new_tokens = [
            (chunk.req, token)
            for chunk, alive, token in zip(batch.chunks, live, output.tokens, strict=True)
            if alive and token is not None
        ]
        if self.debug_checks and not self.in_flight:
            self.scheduler.check_integrity()
        if self.debug_checks and self.tp.size > 1:
            _check_ranks_agree(batch, output.tokens)
        if self.timing is not None:
            wall = time.perf_counter() - started
            self.timing.record(batch, wall, host_wait, launched.pending.device_seconds())
        return StepResult(batch, new_tokens, finished)

    def _advance_grammars(self, batch: Batch, tokens: list[int | None]) -> list[Request]:
        """Each constrained request's matcher takes its new token; a request whose grammar has ended
        (its stop token accepted, even under ignore_eos) is finished."""
        finished = []
        for chunk, token in zip(batch.chunks, tokens, strict=True):
            req = chunk.req
            if req.grammar is None or token is None or req.finish_reason is not None:
                continue
            if not req.grammar.accept(token):
                logger.error("request %d: token %d is outside its grammar; stopping it", req.uid, token)
            elif not req.grammar.terminated:
                continue
            req.finish_reason = "stop"
            self.scheduler.finish(req)
            finished.append(req)
        return finished

    def abort(self, uid: int, reason: FinishReason = "abort") -> Request | None:
        """Stop a request wherever it is (waiting, mid-prefill, decoding); its KV pages are returned.
        reason "stop": its caller found a stop string in its text (runtimes do not decode text)."""
        self._check_leader("abort")
        req = self.scheduler.abort(uid, reason)
        if req is not None:
            self.lockstep.record(AbortRequest(uid))
            if self.debug_checks:
                self.scheduler.check_integrity()
        return req

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def stats(self) -> dict[str, int | float]:
        kv = self.kv
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "pages_total": kv.num_pages,
            "pages_free": kv.allocator.num_free,
            "pages_cached": kv.cached_pages,
            "pages_used": kv.num_pages - kv.allocator.num_free,
            "page_size": kv.page_size,
            "num_retractions": self.scheduler.num_retractions,
            "new_token_ratio": self.scheduler.new_token_ratio,
        }


def _record_prompt_logprobs(
    req: Request, start: int, values: list[float], tops: list[dict[int, float]]
) -> None:
    """Append the logprobs (and top alternatives) of prompt tokens start+1 ... that the request does not
    have yet (a retracted request recomputes positions it already reported)."""
    if not req.params.prompt_logprobs:
        return
    if not req.prompt_logprobs:
        req.prompt_logprobs.append(None)
        req.prompt_top_logprobs.append(None)
    already = max(0, len(req.prompt_logprobs) - (start + 1))
    req.prompt_logprobs.extend(values[already:])
    req.prompt_top_logprobs.extend(tops[already:])


def _rank_device(device: torch.device, rank: int, tp_size: int) -> torch.device:
    """A TP rank's device: cuda:(rank mod GPUs here) unless an index was given; on the CPU, the cores are
    shared out between the ranks."""
    if device.type == "cpu":
        if tp_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))
        return device
    if device.index is None and tp_size > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    if device.index is not None:
        # CUDA graphs, events and FlashInfer's workspaces use the current device.
        torch.cuda.set_device(device)
    return device


def _check_same_settings(config: EngineConfig, model_config: ModelConfig) -> None:
    """Ranks (perhaps on other machines, with other environments) must schedule alike: the same engine
    options apart from the device, the same model, and the same MINISGL_* scheduling variables."""
    settings = (
        {name: value for name, value in asdict(config).items() if name != "device"},
        model_config,
        {
            var.name: var.get()
            for var in env.ALL
            if var not in (env.LOG_LEVEL, env.KERNEL_CACHE, env.GGUF_CACHE)
        },
    )
    differs = disagreeing_rank(settings)
    if differs is not None:
        rank, theirs = differs
        raise ValueError(
            f"TP rank {rank} runs with other settings than rank {get_tp().rank}: {theirs} != {settings}; "
            "start every rank with the same model, engine flags and MINISGL_* variables"
        )


def _check_ranks_agree(batch: Batch, tokens: list[int | None]) -> None:
    """MINISGL_DEBUG_CHECKS at tp>1: every rank must have scheduled the same batch and sampled the same
    tokens; a difference means the ranks have drifted apart."""
    mine = ([(c.req.uid, c.start, c.end) for c in batch.chunks], tokens)
    differs = disagreeing_rank(mine)
    if differs is not None:
        rank, theirs = differs
        raise RuntimeError(f"TP ranks disagree: rank {get_tp().rank} ran {mine}, rank {rank} ran {theirs}")


def _with_tokenizer_eos(config: ModelConfig, tokenizer: Any | None) -> ModelConfig:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or eos in config.eos_token_ids:
        return config
    return replace(config, eos_token_ids=(*config.eos_token_ids, int(eos)))


def _context_length(requested: int | None, model_limit: int) -> int:
    """The requested context length, or the model's when none is asked for; above the model's it is an
    error, not a silent clamp (positions beyond what the model was trained on)."""
    if requested is None:
        return model_limit
    if requested > model_limit:
        raise ValueError(
            f"the context length {requested} (max_seq_len, --context-length) is above this model's "
            f"maximum of {model_limit} tokens (max_position_embeddings)"
        )
    return requested

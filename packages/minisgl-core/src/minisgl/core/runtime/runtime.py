"""The runtime: one loaded model with its KV pool, tables, scheduler and model runner, driven one step at
a time. The offline `LLM` runs it to completion; a server's scheduler process steps it between messages."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from minisgl.core import env
from minisgl.core.config import (
    EngineConfig,
    default_page_size,
    parse_dtype,
    parse_kv_cache_dtype,
    resolve_device,
)
from minisgl.core.kv.kv_cache import KVCacheManager
from minisgl.core.kv.kv_pool import KVPool
from minisgl.core.kv.tables import RequestTables
from minisgl.core.loading.loader import build_model, load_hf_config, load_model_config, load_tokenizer
from minisgl.core.parallel.distributed import get_tp, init_distributed, min_over_ranks, shutdown_distributed
from minisgl.core.parallel.lockstep import AbortRequest, AddRequest, Lockstep, Stop
from minisgl.core.request import FinishReason, Request
from minisgl.core.request_checks import CheckedRequest, check_token_ids, output_budget
from minisgl.core.request_error import InvalidRequestError
from minisgl.core.runtime.build import (
    build_model_runner,
    check_same_settings,
    check_tp_rank,
    context_length,
    model_source,
    num_kv_pages,
    rank_device,
    use_checkpoint_kv_scales,
    with_tokenizer_eos,
)
from minisgl.core.runtime.results import (
    Launched,
    StepResult,
    check_ranks_agree,
    live_tokens,
    record_logprobs,
)
from minisgl.core.runtime.timing import StepTiming
from minisgl.core.sampling.structured import GrammarCompiler
from minisgl.core.sampling_params import SamplingParams
from minisgl.core.scheduler.batch import Batch
from minisgl.core.scheduler.scheduler import Scheduler

logger = logging.getLogger("minisgl")


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
        check_tp_rank(config, tp_rank, dist_init_address)
        started = time.perf_counter()
        source = model_source(model, config.load_format)
        hf_config = load_hf_config(source)
        self.device = rank_device(resolve_device(config.device), tp_rank, config.tp_size)
        self.page_size = config.page_size or default_page_size(self.device)
        self.config = config = replace(config, page_size=self.page_size)
        self.tokenizer: Any | None = load_tokenizer(source)
        self.model_config = with_tokenizer_eos(load_model_config(source, hf_config), self.tokenizer)
        self.model_config.check_tp(config.tp_size)
        self.dtype = parse_dtype(config.dtype, self.model_config.checkpoint_dtype, self.device)
        self.kv_dtype = parse_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.max_seq_len = context_length(config.max_seq_len, self.model_config.max_position_embeddings)
        init_distributed(tp_rank, config.tp_size, dist_init_address or "", self.device, check_peers)
        try:
            self._build(source, hf_config, started)
        except BaseException:
            shutdown_distributed()  # leave the group, so that this process can start another runtime
            raise

    def _build(self, source: Any, hf_config: Any, started: float) -> None:
        config = self.config
        self.tp = get_tp()
        check_same_settings(config, self.model_config)
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
        num_pages = min_over_ranks(
            num_kv_pages(
                config, self.model_config, self.kv_dtype, self.device, self.page_size, self.max_seq_len
            )
        )
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
        use_checkpoint_kv_scales(model_module, self.kv_pool, self.model_config.num_layers)
        self.tables = RequestTables(
            config.max_running_requests, self.max_seq_len, self.page_size, self.device
        )
        self.kv = KVCacheManager(num_pages, self.tables, config.cache)
        self.model_runner = build_model_runner(
            config,
            self.model_config,
            model_module,
            self.kv_pool,
            self.tables,
            self.dtype,
            self.device,
            num_pages,
        )
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
                self._apply_leader_change(message)
            self._step()

    def _apply_leader_change(self, message: AddRequest | AbortRequest) -> None:
        if isinstance(message, AddRequest):
            self._add(message)
        else:
            self.scheduler.abort(message.uid)

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
        launch_wait = 0.0
        if not (self.in_flight and self.scheduler.needs_latest_tokens()):
            launched_wait = self._launch_if_room()
            if launched_wait is not None:
                if len(self.in_flight) < self.max_in_flight:
                    return StepResult(None, [], [])  # the pipeline is filling: nothing to apply yet
                launch_wait = launched_wait
        return self._complete(self.in_flight.popleft(), started, launch_wait)

    def _launch_if_room(self) -> float | None:
        """Schedule and launch the next batch if fewer than max_in_flight are in flight: the host's wait
        during the launch, or None when nothing was launched."""
        batch = None
        if len(self.in_flight) < self.max_in_flight:
            batch = self.scheduler.schedule(allow_retract=not self.in_flight)
        if batch is not None:
            self.in_flight.append(Launched(batch, self.model_runner.launch(batch)))
            self.scheduler.on_launch(batch)
        if not self.in_flight:
            raise RuntimeError("requests are waiting but none can run: the KV pool is too small for them")
        return None if batch is None else self.model_runner.last_launch_wait

    def _complete(self, launched: Launched, started: float, launch_wait: float) -> StepResult:
        waiting_since = time.perf_counter()
        batch, output = launched.batch, launched.pending.wait()
        host_wait = launch_wait + time.perf_counter() - waiting_since
        live = [c.req.finish_reason is None for c in batch.chunks]
        record_logprobs(batch, live, output)
        finished = self.scheduler.process(batch, output.tokens)
        finished += self._advance_grammars(batch, output.tokens)
        if self.in_flight:  # the next step's constrained rows waited for these tokens
            self.model_runner.sample_late(self.in_flight[0].pending)
        new_tokens = live_tokens(batch, live, output.tokens)
        if self.debug_checks:
            self._debug_check(batch, output.tokens)
        if self.timing is not None:
            wall = time.perf_counter() - started
            self.timing.record(batch, wall, host_wait, launched.pending.device_seconds())
        return StepResult(batch, new_tokens, finished)

    def _debug_check(self, batch: Batch, tokens: list[int | None]) -> None:
        """MINISGL_DEBUG_CHECKS: page ownership once nothing is in flight; at tp>1, that the ranks agree."""
        if not self.in_flight:
            self.scheduler.check_integrity()
        if self.tp.size > 1:
            check_ranks_agree(batch, tokens)

    def _advance_grammars(self, batch: Batch, tokens: list[int | None]) -> list[Request]:
        """Each constrained request's matcher takes its new token; a request whose grammar has ended
        (its stop token accepted, even under ignore_eos) is finished."""
        finished = []
        for chunk, token in zip(batch.chunks, tokens, strict=True):
            req = chunk.req
            if token is None or req.finish_reason is not None or not _grammar_ends(req, token):
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


def _grammar_ends(req: Request, token: int) -> bool:
    """A constrained request's matcher takes its new token: True when the grammar has ended (its stop token
    accepted) or rejected the token (an error: the request is stopped)."""
    if req.grammar is None:
        return False
    if not req.grammar.accept(token):
        logger.error("request %d: token %d is outside its grammar; stopping it", req.uid, token)
        return True
    return req.grammar.terminated

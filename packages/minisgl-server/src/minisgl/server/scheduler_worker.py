"""The scheduler processes: each owns the Runtime of one TP rank.

Rank 0's loop: take every message that is waiting (block when there is no work, so an idle server costs
nothing), add / abort requests, run one engine step, and send the step's tokens downstream in one message.
A request the runtime refuses (too long, bad parameters, full queue) gets a RequestError back; it never
brings the process down. Ranks > 0 run `Runtime.follow()`: rank 0's runtime hands them its changes at the
start of every step, so they need no sockets of their own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from minisgl.core.request_checks import CheckedRequest
from minisgl.core.request_error import InvalidRequestError
from minisgl.core.sampling_params import SamplingParams
from minisgl.server import messages as msg
from minisgl.server.activity import ActivityLog
from minisgl.server.args import ServerArgs
from minisgl.server.ipc import IpcAddresses, parent_is_gone, prepare_child, pull_socket, push_socket

if TYPE_CHECKING:  # the scheduler process imports torch and the runtime only once it starts
    from minisgl.core.request import Request
    from minisgl.core.runtime import Runtime
    from minisgl.core.scheduler.batch import Batch

logger = logging.getLogger("minisgl.server.scheduler")

IDLE_POLL_MS = 500


def run_scheduler(args: ServerArgs, addresses: IpcAddresses, rank: int, ready: Connection) -> None:
    """Entry point of the scheduler process of TP rank `rank`."""
    prepare_child(args.log_level, f"minisgl-sched{rank}")
    parent_pid = os.getppid()
    try:
        runtime = _load_runtime(args, rank)
    except Exception as exc:  # report any failure to load to the launcher, which prints it and exits
        logger.debug("loading failed", exc_info=True)
        ready.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    if rank > 0:
        ready.send(("ready", {"rank": rank, "device": str(runtime.device)}))
        ready.close()
        _follow(runtime, rank)
        return
    worker = SchedulerWorker(runtime, args, addresses)
    if args.engine.tp_size > 1:
        # Stop between steps rather than at once, so that the other ranks are told to stop too.
        signal.signal(signal.SIGTERM, worker.request_stop)
    ready.send(("ready", worker.describe()))
    ready.close()
    try:
        worker.run(parent_pid)
    finally:
        runtime.shutdown()


def _follow(runtime: Runtime, rank: int) -> None:
    try:
        runtime.follow()
    except RuntimeError as exc:  # gloo reports a vanished rank 0 as a RuntimeError
        logger.error("TP rank %d lost rank 0 (%s); exiting", rank, exc)
        raise SystemExit(1) from None
    runtime.shutdown()
    logger.info("TP rank %d stopped", rank)


def _load_runtime(args: ServerArgs, rank: int) -> Runtime:
    import torch

    from minisgl.core.runtime import Runtime

    torch.set_grad_enabled(False)
    config = args.engine
    if config.tp_size > 1 and config.device in ("auto", "cuda") and torch.cuda.is_available():
        config = dataclasses.replace(config, device=f"cuda:{rank % args.ranks_per_node}")
    return Runtime(args.model, config, tp_rank=rank, dist_init_address=args.dist_init_addr)


class SchedulerWorker:
    def __init__(self, runtime: Runtime, args: ServerArgs, addresses: IpcAddresses) -> None:
        self.runtime = runtime
        self.args = args
        self.context = zmq.Context()
        self.receiver = pull_socket(self.context, addresses.scheduler)
        # One socket per tokenizer worker; each request's outputs go to the worker that sent it.
        self.senders = [push_socket(self.context, address) for address in addresses.tokenizers]
        self.worker_of: dict[int, int] = {}  # uid -> tokenizer worker
        self.poller = zmq.Poller()
        self.poller.register(self.receiver, zmq.POLLIN)
        self.requests: dict[int, Request] = {}  # uid -> the runtime's request of that uid
        self.pending_finished: list[msg.FinishedRequest] = []
        self.eos_ids = frozenset(runtime.model_config.eos_token_ids)
        self.started = time.time()
        self.num_requests = 0
        self.num_rejected = 0
        self.stopping = False
        self.activity = ActivityLog(args.log_interval)

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        self.stopping = True

    def describe(self) -> dict[str, Any]:
        runtime = self.runtime
        stats = self._runtime_stats()
        return {
            "model": self.args.model,
            "architecture": runtime.model_config.architecture,
            "device": str(runtime.device),
            "dtype": str(runtime.dtype).removeprefix("torch."),
            "context_length": runtime.max_seq_len,
            "vocab_size": runtime.model_config.vocab_size,
            "kv_pages": stats.get("pages_total"),
            "page_size": stats.get("page_size", self.args.engine.page_size),
            "has_tokenizer": runtime.tokenizer is not None,
            "tp_size": self.args.engine.tp_size,
        }

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self, parent_pid: int) -> None:
        while not self.stopping:
            busy = self.runtime.has_work()
            for message in self._receive(0 if busy else IDLE_POLL_MS):
                self._handle(message)
            if self.runtime.has_work():
                self._step()
                self._log_activity_when_due()
            elif not self._rest(busy, parent_pid):
                return

    def _rest(self, was_busy: bool, parent_pid: int) -> bool:
        """A pass with nothing to run: the last busy spell's activity line once its interval is over, the
        outputs of aborts still waiting. False when the launching process is gone (time to exit)."""
        self.activity.rest()
        self._log_activity_when_due()
        if self.pending_finished:
            self._send_outputs()
        elif not was_busy and parent_is_gone(parent_pid):
            logger.error("the launching process is gone; exiting")
            return False
        return True

    def _log_activity_when_due(self) -> None:
        if not self.activity.due():
            return
        line = self.activity.take_line(self._runtime_stats)
        if line is not None:
            logger.info("%s", line)

    def _receive(self, timeout_ms: int) -> list[Any]:
        if not self.poller.poll(timeout_ms):
            return []
        received = []
        while True:
            try:
                received.append(msg.decode(self.receiver.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return received

    def _send(self, message: Any, worker: int = 0) -> None:
        self.senders[worker].send(msg.encode(message))

    def _send_outputs(self, parts: defaultdict[int, _WorkerOutputs] | None = None) -> None:
        """One StepOutputs per tokenizer worker that has something (tokens, finishes, aborts)."""
        parts = parts if parts is not None else defaultdict(_WorkerOutputs)
        for end in self.pending_finished:
            parts[self.worker_of.pop(end.uid, 0)].finished.append(end)
        self.pending_finished = []
        for worker, part in parts.items():
            self._send(part.message(), worker)

    # ---- messages ---------------------------------------------------------------------------------

    def _handle(self, message: Any) -> None:
        if isinstance(message, msg.TokenizedGroup):
            self._add_group(message)
        elif isinstance(message, msg.AbortRequests):
            for uid in message.uids:
                self._abort(uid, message.reason)
        elif isinstance(message, msg.StatsQuery):
            self._send(msg.StatsReply(message.query_id, self.stats()))
        else:
            logger.error("scheduler got an unexpected %s; ignored", type(message).__name__)

    def _add_group(self, group: msg.TokenizedGroup) -> None:
        """Add every request of the group, or none of them."""
        checked = self._admit(group)
        if isinstance(checked, msg.RequestError):
            self._send(checked, group.worker)
            return
        for request, accepted in zip(group.requests, checked, strict=True):
            self.requests[request.uid] = self.runtime.add_checked(accepted, request.uid)
            self.worker_of[request.uid] = group.worker
            self.num_requests += 1

    def _admit(self, group: msg.TokenizedGroup) -> list[CheckedRequest] | msg.RequestError:
        """The group's checked requests, or why it is refused: a full queue (503) or a bad request (400)."""
        uids = [r.uid for r in group.requests]
        limit = self.args.max_queued_requests
        if limit is not None and self._num_queued() + len(uids) > limit:
            self.num_rejected += len(uids)
            message = f"the server is overloaded: {limit} requests are already queued"
            return msg.RequestError(uids, 503, message, None, "queue_full")
        try:
            return self._check_group(group.requests)
        except ValueError as exc:  # an InvalidRequestError names its field
            param = exc.param if isinstance(exc, InvalidRequestError) else None
            return msg.RequestError(uids, 400, str(exc), param, None)

    def _check_group(self, requests: list[msg.TokenizedRequest]) -> list[CheckedRequest]:
        """Check each distinct request once: the n samples of a prompt differ only in their seed, which
        no check reads, so they share their first sample's check (context length, KV fit, token ids)."""
        checks_of_prompt: dict[bytes, list[CheckedRequest]] = defaultdict(list)
        checked: list[CheckedRequest] = []
        for request in requests:
            earlier = checks_of_prompt[request.prompt_ids.tobytes()]
            twin = next((c for c in earlier if _same_but_seed(c.params, request.params)), None)
            if twin is None:  # the API refuses an explicit max_tokens beyond the context, as vLLM's does
                ids = request.prompt_ids.tolist()
                twin = self.runtime.check_request(ids, request.params, refuse_overflow=True)
                earlier.append(twin)
            checked.append(dataclasses.replace(twin, params=request.params))
        return checked

    def _num_queued(self) -> int:
        """Requests that wait beyond the free running slots (those start at the next step)."""
        stats = self._runtime_stats()
        free_slots = max(0, self.runtime.config.max_running_requests - int(stats["num_running"]))
        return max(0, int(stats["num_waiting"]) - free_slots)

    def _abort(self, uid: int, reason: str) -> None:
        req = self.requests.pop(uid, None)
        if req is None:
            return  # finished already (its FinishedRequest is on the way), or never added
        self.runtime.abort(uid, "stop" if reason == "stop" else "abort")
        self.pending_finished.append(self._finished(uid, req, reason))

    # ---- stepping ---------------------------------------------------------------------------------

    def _step(self) -> None:
        """Run one engine step and send its new tokens and finished requests to their tokenizer workers."""
        result = self.runtime.step()
        parts: defaultdict[int, _WorkerOutputs] = defaultdict(_WorkerOutputs)
        num_tokens = self._take_tokens(result.new_tokens, parts)
        num_finished = self._take_finished(result.finished)
        self._send_outputs(parts)
        self.activity.record(_prefilled_tokens(result.batch), num_tokens, num_finished)

    def _take_tokens(self, new_tokens: list[tuple[Request, int]], parts: dict[int, _WorkerOutputs]) -> int:
        """Route each new token of a request still ours to its tokenizer worker; returns how many."""
        ours = [(req, token) for req, token in new_tokens if req.uid in self.requests]
        for req, token in ours:
            parts[self.worker_of.get(req.uid, 0)].add_token(req, token)
        return len(ours)

    def _take_finished(self, finished: list[Request]) -> int:
        """Forget the requests that finished (those aborted before are gone already); returns how many."""
        ours = [req for req in finished if self.requests.pop(req.uid, None) is not None]
        for req in ours:
            self.pending_finished.append(self._finished(req.uid, req, req.finish_reason or "stop"))
        return len(ours)

    def _finished(self, uid: int, req: Request, reason: str) -> msg.FinishedRequest:
        last = req.output_ids[-1] if req.output_ids else None
        stop_ids = set(req.params.stop_token_id_set)
        if not req.params.ignore_eos:
            stop_ids |= self.eos_ids
        return msg.FinishedRequest(
            uid=uid,
            reason=reason,
            num_prompt_tokens=len(req.prompt_ids),
            num_cached_tokens=int(req.num_cached),
            num_output_tokens=len(req.output_ids),
            last_token_is_stop=reason == "stop" and last in stop_ids,
        )

    # ---- stats ------------------------------------------------------------------------------------

    def _runtime_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = dict(self.runtime.stats())
        return stats

    def stats(self) -> dict[str, Any]:
        stats = self._runtime_stats()
        stats.update(
            num_requests_total=self.num_requests,
            num_rejected_total=self.num_rejected,
            uptime_s=time.time() - self.started,
            max_running_requests=self.runtime.config.max_running_requests,
        )
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in stats.items()}


_SEEDLESS_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.init and f.name != "seed")


def _same_but_seed(a: SamplingParams, b: SamplingParams) -> bool:
    return all(getattr(a, name) == getattr(b, name) for name in _SEEDLESS_FIELDS)


@dataclass
class _WorkerOutputs:
    uids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[msg.TokenLogprobs] = field(default_factory=list)
    finished: list[msg.FinishedRequest] = field(default_factory=list)
    prompt_logprobs: list[msg.PromptLogprobs] = field(default_factory=list)

    def add_token(self, req: Request, token: int) -> None:
        """A new token of req, with its logprobs. A request's first token comes once its whole prompt is
        computed: its prompt logprobs go with it."""
        self.uids.append(req.uid)
        self.tokens.append(token)
        if req.params.prompt_logprobs and len(req.output_ids) - req.num_pending == 1:
            self.prompt_logprobs.append(_prompt_logprobs(req.uid, req))
        if req.params.logprobs is not None and req.output_logprobs:
            self.logprobs.append(_token_logprobs(req))

    def message(self) -> msg.StepOutputs:
        uids, tokens = msg.int64_array(self.uids), msg.int32_array(self.tokens)
        return msg.StepOutputs(uids, tokens, self.logprobs, self.finished, self.prompt_logprobs)


def _prefilled_tokens(batch: Batch | None) -> int:
    return sum(c.end - c.start for c in batch.chunks if c.is_prefill) if batch is not None else 0


def _token_logprobs(req: Request) -> msg.TokenLogprobs:
    """The logprob of req's newest token and its top alternatives."""
    top = req.output_top_logprobs[-1] if req.output_top_logprobs else {}
    logprob = float(req.output_logprobs[-1])
    return msg.TokenLogprobs(req.uid, logprob, msg.int32_array(list(top)), list(top.values()))


def _prompt_logprobs(uid: int, req: Request) -> msg.PromptLogprobs:
    tops = [top or {} for top in req.prompt_top_logprobs[1:]]
    return msg.PromptLogprobs(
        uid,
        [float(v) for v in req.prompt_logprobs[1:] if v is not None],  # only the first one is None
        [list(t) for t in tops],
        [list(t.values()) for t in tops],
    )

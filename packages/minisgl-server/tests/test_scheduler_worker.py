"""The scheduler process's message handling over a fake runtime: groups are all-or-nothing, the queue
limit answers 503, bad requests answer 400 without touching the engine, aborts report back."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from minisgl.core.request_checks import CheckedRequest, output_budget
from minisgl.core.sampling_params import SamplingParams
from minisgl.server import messages as msg
from minisgl.server.args import ServerArgs
from minisgl.server.ipc import IpcAddresses, pull_socket
from minisgl.server.scheduler_worker import SchedulerWorker

EOS = 0


class FakeRuntime:
    """Two running slots; each step gives every running request token 5, then EOS at its third token."""

    def __init__(self, max_running: int = 2, context: int = 32) -> None:
        self.max_seq_len = context
        self.config = SimpleNamespace(max_running_requests=max_running)
        self.model_config = SimpleNamespace(eos_token_ids=(EOS,), architecture="Fake", vocab_size=100)
        self.device, self.dtype, self.tokenizer = "cpu", "float32", None
        self.waiting: list[Any] = []
        self.running: list[Any] = []
        self.aborted: list[int] = []

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "pages_total": 64,
            "pages_used": 8,
            "pages_cached": 2,
            "page_size": 1,
        }

    def check_request(
        self, prompt_ids: list[int], params: SamplingParams, refuse_overflow: bool = False
    ) -> CheckedRequest:
        budget = output_budget(len(prompt_ids), params.max_tokens, self.max_seq_len, refuse_overflow)
        return CheckedRequest(prompt_ids, params, budget)

    def add_checked(self, checked: CheckedRequest, uid: int) -> Any:
        req = SimpleNamespace(
            uid=uid, prompt_ids=checked.prompt_ids, params=checked.params, output_ids=[], num_cached=1,
            output_logprobs=[], output_top_logprobs=[], finish_reason=None,
            max_new_tokens=checked.max_new_tokens,
        )  # fmt: skip
        self.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, uid: int, reason: str = "abort") -> Any:
        self.aborted.append(uid)
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.uid == uid:
                    queue.remove(req)
                    req.finish_reason = reason
                    return req
        return None

    def step(self) -> Any:
        while self.waiting and len(self.running) < self.config.max_running_requests:
            self.running.append(self.waiting.pop(0))
        tokens, finished = [], []
        for req in self.running:
            token = EOS if len(req.output_ids) == 2 else 5
            req.output_ids.append(token)
            if req.params.logprobs is not None:
                req.output_logprobs.append(-0.25)
                req.output_top_logprobs.append({token: -0.25, 7: -3.0})
            tokens.append(token)
            if token == EOS:
                req.finish_reason = "stop"
                finished.append(req)
        new_tokens = list(zip(self.running, tokens, strict=True))
        self.running = [r for r in self.running if r.finish_reason is None]
        return SimpleNamespace(batch=None, new_tokens=new_tokens, finished=finished)


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    addresses = IpcAddresses.in_directory(tmp_path, num_tokenizers=2)
    context = zmq.Context()
    downstreams = [pull_socket(context, address) for address in addresses.tokenizers]
    workers: list[SchedulerWorker] = []

    def make(
        max_queued: int | None = None, log_interval: float = 10.0, **runtime_options: Any
    ) -> tuple[SchedulerWorker, FakeRuntime]:
        runtime = FakeRuntime(**runtime_options)
        args = ServerArgs(max_queued_requests=max_queued, log_interval=log_interval)
        worker = SchedulerWorker(runtime, args, addresses)
        workers.append(worker)
        return worker, runtime

    def received(tokenizer_worker: int = 0) -> list[Any]:
        """What tokenizer worker 0 (or another) has been sent."""
        downstream, messages = downstreams[tokenizer_worker], []
        while downstream.poll(200):
            messages.append(msg.decode(downstream.recv()))
        return messages

    yield make, received
    for worker in workers:
        worker.receiver.close(0)
        for sender in worker.senders:
            sender.close(0)
        worker.context.term()
    for downstream in downstreams:
        downstream.close(0)
    context.term()


def group(
    *requests: tuple[int, list[int]],
    max_tokens: int | None = 4,
    worker: int = 0,
    **params: Any,
) -> msg.TokenizedGroup:
    return msg.TokenizedGroup(
        [
            msg.TokenizedRequest(uid, msg.int32_array(ids), SamplingParams(max_tokens=max_tokens, **params))
            for uid, ids in requests
        ],
        worker,
    )


def test_requests_run_and_report_tokens_and_finish(setup: Any) -> None:
    make, received = setup
    worker, runtime = make()
    worker._handle(group((1, [3, 4]), logprobs=1))
    while runtime.has_work():
        worker._step()
    steps = received()
    assert [s.tokens.tolist() for s in steps] == [[5], [5], [EOS]]
    assert all(s.uids.tolist() == [1] for s in steps)
    assert steps[0].logprobs[0].logprob == -0.25 and steps[0].logprobs[0].top_ids.tolist() == [5, 7]
    (finished,) = steps[-1].finished
    assert finished == msg.FinishedRequest(1, "stop", 2, 1, 3, last_token_is_stop=True)
    assert not worker.requests


@pytest.mark.parametrize("interval", [1e-9, 0.0])
def test_activity_lines_while_working(setup: Any, interval: float, caplog: pytest.LogCaptureFixture) -> None:
    make, received = setup
    worker, _ = make(log_interval=interval)
    worker._handle(group((1, [3, 4]), (2, [5])))
    with caplog.at_level(logging.INFO, logger="minisgl.server.scheduler"):
        worker.run(parent_pid=-1)  # "the parent is gone" ends the loop once the work is done
    lines = [
        r.getMessage() for r in caplog.records if " in " in r.getMessage() and "running" in r.getMessage()
    ]
    if interval == 0.0:
        assert lines == []
        return
    assert len(lines) == 3  # one per step: every step makes the tiny interval due
    assert lines[0].startswith("1 step in ") and "2 running, 0 waiting, KV 12.5% used" in lines[0]
    assert lines[-1].endswith("2 finished")
    assert len(received()) == 3


def test_queue_limit_counts_requests_beyond_free_slots(setup: Any) -> None:
    make, received = setup
    worker, runtime = make(max_queued=3)
    for uid in range(1, 7):
        worker._handle(group((uid, [1])))
    assert len(runtime.waiting) == 5  # 2 start at the next step, 3 wait
    (error,) = received()
    assert (error.uids, error.status, error.code) == ([6], 503, "queue_full")


def test_a_group_is_added_whole_or_not_at_all(setup: Any) -> None:
    make, received = setup
    worker, runtime = make(context=8)
    worker._handle(group((1, [1, 2]), (2, [1] * 8)))  # the second prompt fills the whole context
    (error,) = received()
    assert (error.uids, error.status, error.param) == ([1, 2], 400, "prompt")
    assert "context length is 8" in error.message
    assert not runtime.waiting


def test_max_tokens_beyond_the_context_is_refused(setup: Any) -> None:
    make, received = setup
    worker, _runtime = make(context=8)
    worker._handle(group((1, [1, 2, 3]), max_tokens=6))
    (error,) = received()
    assert (error.status, error.param) == (400, "max_tokens")


def test_no_max_tokens_fills_the_context(setup: Any) -> None:
    make, _ = setup
    worker, runtime = make(context=8)
    worker._handle(group((1, [1, 2, 3]), max_tokens=None))
    assert runtime.waiting[0].max_new_tokens == 5


def test_engine_refusals_become_400(setup: Any) -> None:
    make, received = setup
    worker, _runtime = make()
    worker._handle(group((1, [])))
    (error,) = received()
    assert error.status == 400 and "prompt is empty" in error.message


def test_abort_reports_a_finished_request(setup: Any) -> None:
    make, received = setup
    worker, _runtime = make()
    worker._handle(group((1, [1]), (2, [1])))
    worker._step()
    worker._handle(msg.AbortRequests([1, 99]))  # 99 is unknown: ignored
    worker._step()
    steps = received()
    aborted = [f for s in steps for f in s.finished if f.reason == "abort"]
    assert [f.uid for f in aborted] == [1]
    assert steps[-1].uids.tolist() == [2]


def test_a_stop_from_the_detokenizer_finishes_with_stop(setup: Any) -> None:
    """While serving, the detokenizer owns stop strings: it tells the scheduler to stop the request."""
    make, received = setup
    worker, runtime = make()
    worker._handle(group((1, [1]), stop=["x"]))
    worker._step()
    worker._handle(msg.AbortRequests([1], reason="stop"))
    worker._step()
    ends = [f for s in received() for f in s.finished]
    assert [(f.uid, f.reason) for f in ends] == [(1, "stop")]
    assert runtime.aborted == [1] and not runtime.has_work() and not worker.requests


def test_stats_reply(setup: Any) -> None:
    make, received = setup
    worker, _ = make()
    worker._handle(msg.StatsQuery(5))
    (reply,) = received()
    assert reply.query_id == 5 and reply.stats["num_running"] == 0 and "uptime_s" in reply.stats


def test_prepare_keeps_params_valid() -> None:
    params = SamplingParams(max_tokens=3, stop_token_ids=[9])
    assert dataclasses.replace(params, max_tokens=5).stop_token_id_set == frozenset({9})


def test_each_tokenizer_worker_gets_the_outputs_of_its_own_requests(setup: Any) -> None:
    """With two tokenizer workers, one step's tokens are split between them; errors and aborts go to the
    worker whose group they concern."""
    make, received = setup
    worker, runtime = make(max_running=3)
    worker._handle(group((1, [3, 4]), worker=0))
    worker._handle(group((2, [3, 4]), (3, [5]), worker=1))
    worker._step()
    first = received(0)
    second = received(1)
    assert [m.uids.tolist() for m in first] == [[1]]
    assert [m.uids.tolist() for m in second] == [[2, 3]]
    worker._handle(msg.AbortRequests([3]))
    worker._handle(group((4, []), worker=1))  # refused: the error goes to worker 1
    while runtime.has_work():
        worker._step()
    to_first, to_second = received(0), received(1)
    assert sum(len(m.uids) for m in to_first) == 2 and {f.uid for m in to_first for f in m.finished} == {1}
    errors = [m for m in to_second if isinstance(m, msg.RequestError)]
    assert [e.uids for e in errors] == [[4]]
    ends = {f.uid: f.reason for m in to_second if isinstance(m, msg.StepOutputs) for f in m.finished}
    assert ends == {2: "stop", 3: "abort"}
    assert not worker.worker_of  # nothing left behind

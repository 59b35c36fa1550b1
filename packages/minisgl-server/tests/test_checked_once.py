"""A served request is checked once: its SamplingParams are validated where the API builds them (the
tokenizer and scheduler processes decode them from our own wire without checking them again), and its
context-length policy and KV fit run once per prompt in the scheduler (the n samples of a prompt share
them). The test drives the in-process pieces of the serving path over real sockets: the API's parse, the
wire, the tokenizer worker and the scheduler worker in front of a real (tiny, random) runtime."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from minisgl.core.sampling_params import SamplingParams
from minisgl.server import messages as msg
from minisgl.server.api.app import _engine_requests
from minisgl.server.api.protocol import parse_completion
from minisgl.server.args import ServerArgs
from minisgl.server.ipc import IpcAddresses
from minisgl.server.scheduler_worker import SchedulerWorker
from minisgl.server.tokenizer_worker import TokenizerWorker

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Any:
    """A one-layer random model with the embedded tokenizer's vocabulary, so its prompts are in range."""
    from transformers import LlamaConfig

    from minisgl.core.engine_config import EngineConfig
    from minisgl.core.runtime import Runtime

    directory = tmp_path_factory.mktemp("tiny")
    LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    ).save_pretrained(directory)  # fmt: skip
    tokenizer.save_pretrained(directory)  # stop strings need the runtime to have a tokenizer
    built = Runtime(str(directory), EngineConfig(device="cpu", load_format="dummy"))
    yield built
    built.shutdown()


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, counts: Counter[str]) -> None:
    original = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("prompts", [["The capital of France is"], ["one", "two words"]])
def test_a_served_request_is_checked_once(
    runtime: Any, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prompts: list[str]
) -> None:
    import minisgl.core.runtime.runtime as runtime_module
    from minisgl.core.scheduler.scheduler import Scheduler

    counts: Counter[str] = Counter()
    _count_calls(monkeypatch, SamplingParams, "validate", counts)
    _count_calls(monkeypatch, runtime_module, "output_budget", counts)  # the context-length policy
    _count_calls(monkeypatch, Scheduler, "check_fits", counts)
    addresses = IpcAddresses.in_directory(tmp_path)
    scheduler = SchedulerWorker(runtime, ServerArgs(), addresses)
    tokenizer_worker = TokenizerWorker(tokenizer, addresses)
    try:
        body = {"model": MODEL, "prompt": prompts, "n": 3, "seed": 7, "max_tokens": 4, "stop": ["\n"]}
        spec = parse_completion(body, MODEL)  # the API: the one validation
        client = SimpleNamespace(new_uid=itertools.count(1).__next__)
        group = msg.GenerateGroup(_engine_requests(client, spec))  # type: ignore[arg-type]
        tokenizer_worker._handle(msg.decode(msg.encode(group)), [])  # as the tokenizer process gets it
        received = scheduler._receive(timeout_ms=5000)  # as the scheduler process gets it
        for message in received:
            scheduler._handle(message)
        added = sorted(scheduler.requests.values(), key=lambda r: r.uid)
        assert [r.params.seed for r in added] == [7, 8, 9] * len(prompts)  # 3 samples of each prompt
        assert all(r.params.stop == ["\n"] and r.max_new_tokens == 4 for r in added)
        assert counts == {"validate": 1, "output_budget": len(prompts), "check_fits": len(prompts)}
    finally:
        for uid in list(scheduler.requests):
            scheduler._abort(uid, "abort")
        sockets = [scheduler.receiver, *scheduler.senders, tokenizer_worker.receiver]
        for socket in [*sockets, tokenizer_worker.to_scheduler, tokenizer_worker.to_frontend]:
            socket.close(0)
        scheduler.context.term()
        tokenizer_worker.context.term()

"""The offline API: `LLM(model).generate(prompts, params)` runs requests to completion in this process.

With tp_size > 1 this process is TP rank 0 and starts one process per other rank (spawned, on this
machine); they follow rank 0 step by step until `shutdown()` or the end of a `with LLM(...)` block.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, TypeVar

from tqdm.auto import tqdm

from minisgl.core.config import EngineConfig
from minisgl.core.loading.model_source import DEFAULT_MODEL
from minisgl.core.request import FinishReason, GenerationResult, Request
from minisgl.core.runtime import Runtime
from minisgl.core.sampling_params import SamplingParams
from minisgl.core.stop_strings import first_stop, reached_stop_strings

Prompt = str | list[int]
T = TypeVar("T")
Conversation = list[dict[str, Any]]


class LLM:
    """An engine in this process. Keyword options are the fields of EngineConfig."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: Any) -> None:
        config = _engine_config(engine_options)
        address = f"127.0.0.1:{_free_port()}" if config.tp_size > 1 else None
        started = [_start_follower(model, config, r, address) for r in range(1, config.tp_size) if address]
        self._followers = [process for process, _ in started]
        try:
            self.runtime = Runtime(
                model,
                config,
                tp_rank=0,
                dist_init_address=address,
                check_peers=lambda: _check_started(started),
            )
        except BaseException:
            _stop(self._followers)
            raise
        self.tokenizer = self.runtime.tokenizer
        self.model_config = self.runtime.model_config

    def shutdown(self) -> None:
        """Stop the other TP ranks' processes and leave the TP group (nothing to do at tp=1)."""
        self.runtime.shutdown()
        _stop(self._followers)
        self._followers = []

    def __enter__(self) -> LLM:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerationResult]:
        prompt_ids = [self._tokenize(p) for p in _as_prompt_list(prompts)]
        params = _as_params_list(sampling_params, len(prompt_ids))
        # Check everything before queuing anything, so a bad prompt leaves the engine untouched.
        checked = [self.runtime.check_request(ids, p) for ids, p in zip(prompt_ids, params, strict=True)]
        # n samples of a prompt are n requests; the scheduler makes the later ones reuse the first's KV.
        groups = [[self.runtime.add_checked(c) for _ in range(c.params.n)] for c in checked]
        stopped = self._run(sum(len(g) for g in groups), use_tqdm)
        return [self._group_result(group, stopped) for group in groups]

    def _group_result(self, group: list[Request], stopped: set[int]) -> GenerationResult:
        """A prompt's result: its first sample, holding all n samples when n > 1."""
        samples = [self._result(req, req.uid in stopped) for req in group]
        if len(samples) > 1:
            samples[0].samples = samples
        return samples[0]

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerationResult]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        batch = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        prompts = [_chat_prompt(self.tokenizer, conversation) for conversation in batch]
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

    def _run(self, num_requests: int, use_tqdm: bool) -> set[int]:
        """Step until every request has finished; the uids of those a stop string ended."""
        bar = tqdm(total=num_requests, desc="Generating", disable=not use_tqdm or num_requests < 2)
        started, generated = time.perf_counter(), 0
        stopped: set[int] = set()
        while self.runtime.has_work():
            step = self.runtime.step()
            generated += step.num_new_tokens
            ended = len(step.finished) + self._stop_on_strings(step.new_tokens, stopped)
            if ended:
                bar.update(ended)
                bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.0f}")
        bar.close()
        return stopped

    def _stop_on_strings(self, new_tokens: list[tuple[Request, int]], stopped: set[int]) -> int:
        """End the requests whose new token completed a stop string (added to `stopped`); how many."""
        live = [req for req, _ in new_tokens if not req.finished]
        if self.tokenizer is None or not live:
            return 0
        reached = reached_stop_strings(self.tokenizer, live)
        for req in reached:
            self.runtime.abort(req.uid, "stop")
            stopped.add(req.uid)
        return len(reached)

    def _result(self, req: Request, stopped_by_string: bool) -> GenerationResult:
        assert req.finish_reason is not None
        wants_logprobs = req.params.logprobs is not None
        text, finish_reason = self._text(req, stopped_by_string)
        return GenerationResult(
            text=text,
            token_ids=list(req.output_ids),
            finish_reason=finish_reason,
            num_prompt_tokens=len(req.prompt_ids),
            num_cached_tokens=req.num_cached,
            logprobs=_copy_if(wants_logprobs, req.output_logprobs),
            top_logprobs=_copy_if(wants_logprobs, req.output_top_logprobs),
            prompt_logprobs=_copy_if(req.params.prompt_logprobs, req.prompt_logprobs),
            prompt_top_logprobs=_copy_if(req.params.prompt_logprobs, req.prompt_top_logprobs),
        )

    def _text(self, req: Request, stopped_by_string: bool) -> tuple[str, FinishReason]:
        """The output text, ending before the first stop string (the request then finished with
        "stop", whatever else ended it in the same step), and the finish reason."""
        assert req.finish_reason is not None
        if self.tokenizer is None:
            return "", req.finish_reason
        # The EOS or stop token that ended a request is reported in token_ids, not in the text.
        ends_on_stop_token = req.finish_reason == "stop" and not stopped_by_string
        ids = req.output_ids[:-1] if ends_on_stop_token else req.output_ids
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = first_stop(text, req.params.stop or [])
        return (text, req.finish_reason) if cut is None else (text[:cut], "stop")


def _copy_if(asked: bool, values: list[T]) -> list[T] | None:
    """A copy of what the request asked for (None if it did not ask)."""
    return list(values) if asked else None


def _engine_config(options: dict[str, Any]) -> EngineConfig:
    unknown = set(options) - set(EngineConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
    return EngineConfig(**options)  # checks the values


def _chat_prompt(tokenizer: Any, conversation: Any) -> list[int]:
    """A conversation's token ids, as the chat template writes it, with the generation prompt."""
    if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
        raise ValueError("a conversation must be a list of {'role': ..., 'content': ...} messages")
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    # The template already holds any BOS token: adding special tokens again would double it.
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_follower(
    model: str, config: EngineConfig, rank: int, address: str
) -> tuple[BaseProcess, Connection]:
    """TP rank `rank` in a spawned process, and the pipe on which it reports a start-up error."""
    context = mp.get_context("spawn")
    errors, report = context.Pipe(duplex=False)
    process = context.Process(
        target=_follow, args=(model, config, rank, address, report), name=f"minisgl-tp{rank}", daemon=True
    )
    process.start()
    report.close()
    return process, errors


def _follow(model: str, config: EngineConfig, rank: int, address: str, report: Connection) -> None:
    try:
        runtime = Runtime(model, config, tp_rank=rank, dist_init_address=address)
    except BaseException as exc:
        report.send(f"{type(exc).__name__}: {exc}")
        raise
    report.close()
    runtime.follow()
    runtime.shutdown()


def _check_started(started: list[tuple[BaseProcess, Connection]]) -> None:
    """Raise when a TP rank this process started has died during start-up, with its error if it sent one."""
    for process, errors in started:
        if process.exitcode is not None:
            _raise_start_failure(process, errors)


def _raise_start_failure(process: BaseProcess, errors: Connection) -> None:
    try:
        reason = errors.recv() if errors.poll() else None
    except EOFError:  # it died before it could report anything
        reason = None
    if reason is not None:
        raise RuntimeError(f"TP rank process {process.name} failed to start: {reason}")
    raise RuntimeError(
        f"TP rank process {process.name} exited during start-up (exit code {process.exitcode}) before "
        "loading the model. Spawned ranks re-import the main module: a script that creates an LLM "
        'with tp_size > 1 must do it under `if __name__ == "__main__":`.'
    )


def _stop(processes: list[BaseProcess], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join(5.0)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(
            "prompts must be a string, a list of strings, or a list of token-id lists (non-empty)"
        )
    if all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
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

"""The tokenizer/detokenizer process: text to token ids on the way in, token ids to text on the way out.

One PULL socket receives both directions, so the order of a request, its abort and its outputs is kept:
an abort always reaches the scheduler after its request. Every request's decode state lives from its
GenerateRequest to the scheduler's FinishedRequest (or RequestError), and is then dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import zmq

from minisgl.server import messages as msg
from minisgl.server.api.prompt_size import longest_token_chars
from minisgl.server.args import ServerArgs
from minisgl.server.detokenize import DecodeState, Detokenizer
from minisgl.server.ipc import IpcAddresses, parent_is_gone, prepare_child, pull_socket, push_socket

logger = logging.getLogger("minisgl.server.tokenizer")

IDLE_POLL_MS = 500
MAX_DRAIN = 256


def run_tokenizer(args: ServerArgs, addresses: IpcAddresses, worker: int, ready: Connection) -> None:
    """Entry point of tokenizer/detokenizer process number `worker`."""
    prepare_child(args.log_level, "minisgl-tok" if args.tokenizer_workers == 1 else f"minisgl-tok{worker}")
    parent_pid = os.getppid()
    try:
        from minisgl.core.loading.gguf_cache import converted
        from minisgl.core.loading.loader import load_sampling_defaults, load_tokenizer
        from minisgl.core.loading.model_source import resolve_model

        source = resolve_model(args.model)
        sampling_defaults = load_sampling_defaults(source)
        if args.engine.load_format != "gguf":
            source = converted(source)  # what the scheduler loads too, converted once
        tokenizer = load_tokenizer(source)
    except Exception as exc:
        ready.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    process = TokenizerWorker(tokenizer, addresses, worker)
    ready.send(
        (
            "ready",
            {
                "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
                "longest_token": longest_token_chars(tokenizer),
                "sampling_defaults": sampling_defaults,
            },
        )
    )
    ready.close()
    process.run(parent_pid)


@dataclass
class RequestState:
    decode: DecodeState
    top_logprobs: int | None
    num_tokens: int = 0
    sent_first: bool = False
    # Tokens when a stop string was found here (stop strings are this process's to find); the scheduler
    # is told to stop the request, and its usage counts these tokens when its FinishedRequest comes back.
    tokens_at_stop: int | None = None
    pending_logprobs: list[list[Any]] = field(default_factory=list)
    # echo: the prompt's text (and its ids, for its logprob entries), sent before any output.
    echo_text: str = ""
    echo_ids: list[int] | None = None
    # max_tokens 0: the engine's one token is dropped.
    score_only: bool = False

    @property
    def outputs_tokens(self) -> bool:
        """New tokens are output: not once a stop string was found here, never when only scoring."""
        return self.tokens_at_stop is None and not self.score_only


class TokenizerWorker:
    def __init__(self, tokenizer: Any, addresses: IpcAddresses, worker: int = 0) -> None:
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.worker = worker
        self.context = zmq.Context()
        self.receiver = pull_socket(self.context, addresses.tokenizers[worker])
        self.to_scheduler = push_socket(self.context, addresses.scheduler)
        self.to_frontend = push_socket(self.context, addresses.frontend)
        self.states: dict[int, RequestState] = {}
        # Each inbound message type and what is done with it (with the outputs gathered so far).
        self._handlers: dict[type, Callable[[Any, list[msg.RequestOutput]], None]] = {
            msg.StepOutputs: self._detokenize,
            msg.GenerateGroup: lambda group, _: self._tokenize(group),
            msg.TokenizeQuery: self._answer_query,
            msg.DetokenizeQuery: self._answer_query,
            msg.AbortRequests: self._pass_to_scheduler,
            msg.StatsQuery: self._pass_to_scheduler,
            msg.RequestError: self._refused,
            msg.StatsReply: self._flush_then_forward,
        }

    def run(self, parent_pid: int) -> None:
        while True:
            if self.receiver.poll(IDLE_POLL_MS):
                self._drain()
            elif parent_is_gone(parent_pid):
                logger.error("the launching process is gone; exiting")
                return

    def _drain(self) -> None:
        """Handle the messages waiting (at most MAX_DRAIN); the outputs they make go out in one batch."""
        outputs: list[msg.RequestOutput] = []
        for _ in range(MAX_DRAIN):
            try:
                message = msg.decode(self.receiver.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            self._handle(message, outputs)
        if outputs:
            self.to_frontend.send(msg.encode(msg.OutputBatch(outputs)))

    def _handle(self, message: Any, outputs: list[msg.RequestOutput]) -> None:
        handler = self._handlers.get(type(message))
        if handler is None:
            logger.error("tokenizer got an unexpected %s; ignored", type(message).__name__)
            return
        handler(message, outputs)

    def _answer_query(self, query: msg.TokenizeQuery | msg.DetokenizeQuery, _: Any) -> None:
        self.to_frontend.send(msg.encode(self._answer(query)))

    def _pass_to_scheduler(self, message: msg.AbortRequests | msg.StatsQuery, _: Any) -> None:
        self.to_scheduler.send(msg.encode(message))

    def _refused(self, error: msg.RequestError, outputs: list[msg.RequestOutput]) -> None:
        for uid in error.uids:
            self.states.pop(uid, None)
        self._flush_then_forward(error, outputs)

    def _flush_then_forward(self, message: Any, outputs: list[msg.RequestOutput]) -> None:
        """Keep the order the scheduler sent things in: outputs gathered so far go first."""
        if outputs:
            self.to_frontend.send(msg.encode(msg.OutputBatch(list(outputs))))
            outputs.clear()
        self.to_frontend.send(msg.encode(message))

    # ---- inbound: text to token ids ---------------------------------------------------------------

    def _tokenize(self, group: msg.GenerateGroup) -> None:
        """Tokenize every request of the group and pass them on together, or refuse them together."""
        memo: dict[str, Any] = {}
        try:
            tokenized = [
                msg.TokenizedRequest(r.uid, self._prompt_ids(r, memo), r.params) for r in group.requests
            ]
        except ValueError as exc:
            uids = [r.uid for r in group.requests]
            error = msg.RequestError(uids, 400, str(exc), _prompt_param(group), None)
            self.to_frontend.send(msg.encode(error))
            return
        for request, sent in zip(group.requests, tokenized, strict=True):
            self.states[request.uid] = self._new_state(request, sent.prompt_ids)
        self.to_scheduler.send(msg.encode(msg.TokenizedGroup(tokenized, self.worker)))

    def _new_state(self, request: msg.GenerateRequest, prompt_ids: Any) -> RequestState:
        params = request.params
        decode = DecodeState(stop=params.stop or [], skip_special_tokens=request.skip_special_tokens)
        state = RequestState(decode, params.logprobs, score_only=request.score_only)
        if request.echo:
            state.echo_text = self._echo_text(request, prompt_ids)
            state.echo_ids = prompt_ids.tolist()
        return state

    def _echo_text(self, request: msg.GenerateRequest, ids: Any) -> str:
        if request.prompt is not None:
            return request.prompt
        if self.tokenizer is None:
            return ""
        text: str = self.tokenizer.decode(ids.tolist(), skip_special_tokens=request.skip_special_tokens)
        return text

    def _prompt_ids(self, request: msg.GenerateRequest, memo: dict[str, Any]) -> Any:
        if request.prompt_ids is not None:
            return request.prompt_ids
        if request.messages is not None:
            chat = [request.messages, request.tools, request.chat_template_kwargs]
            key = "chat:" + json.dumps(chat, sort_keys=True)
        else:
            key = "text:" + (request.prompt or "")
        if key not in memo:
            memo[key] = msg.int32_array(
                self._encode(
                    request.prompt, request.messages, True, request.tools, request.chat_template_kwargs
                )
            )
        return memo[key]

    def _encode(
        self,
        prompt: str | None,
        messages: list[dict[str, Any]] | None,
        add_special_tokens: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send the prompt as a list of token ids")
        if messages is None:
            ids: list[int] = self.tokenizer.encode(prompt or "", add_special_tokens=add_special_tokens)
            return ids
        text = _render_chat(self.tokenizer, messages, tools, template_kwargs)
        # The template already holds any BOS token: adding special tokens again would double it.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def _answer(self, query: msg.TokenizeQuery | msg.DetokenizeQuery) -> msg.TokenizerReply:
        """/tokenize and /detokenize, answered here: this process holds the tokenizer."""
        try:
            if isinstance(query, msg.TokenizeQuery):
                ids = self._encode(query.prompt, query.messages, query.add_special_tokens)
                return msg.TokenizerReply(
                    query.query_id, {"tokens": [int(i) for i in ids], "count": len(ids)}
                )
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer")
            text = self.tokenizer.decode(query.token_ids.tolist())
            return msg.TokenizerReply(query.query_id, {"prompt": text})
        except ValueError as exc:
            return msg.TokenizerReply(query.query_id, error=str(exc))

    # ---- outbound: token ids to text --------------------------------------------------------------

    def _detokenize(self, step: msg.StepOutputs, outputs: list[msg.RequestOutput]) -> None:
        finished = {f.uid: f for f in step.finished}
        self._take_prompt_logprobs(step)
        new_counts, token_of = self._take_tokens(step, finished)
        self._take_logprobs(step, new_counts, token_of)
        for uid in dict.fromkeys([*new_counts, *finished]):
            state = self.states.get(uid)
            if state is not None:
                self._emit(uid, state, new_counts.get(uid, 0), finished.get(uid), outputs)

    def _take_prompt_logprobs(self, step: msg.StepOutputs) -> None:
        for prompt in step.prompt_logprobs:
            state = self.states.get(prompt.uid)
            if state is not None and state.echo_ids is not None and self.detokenizer is not None:
                state.pending_logprobs += self._prompt_entries(state.echo_ids, prompt)

    def _take_tokens(
        self, step: msg.StepOutputs, finished: dict[int, msg.FinishedRequest]
    ) -> tuple[dict[int, int], dict[int, int]]:
        """Count each request's new tokens and feed them to its incremental decoder (a final stop token
        is not text); returns (new tokens per uid, the last token of each uid)."""
        new_counts: dict[int, int] = {}
        token_of: dict[int, int] = {}
        updates: list[tuple[DecodeState, list[int]]] = []
        for uid, token in zip(step.uids.tolist(), step.tokens.tolist(), strict=True):
            token_of[uid] = token
            state = self.states.get(uid)
            if state is None or not state.outputs_tokens:
                continue
            state.num_tokens += 1
            new_counts[uid] = new_counts.get(uid, 0) + 1
            if _is_text(finished.get(uid)):
                updates.append((state.decode, [token]))
        if self.detokenizer is not None:
            self.detokenizer.add_tokens_batch(updates)
        return new_counts, token_of

    def _take_logprobs(
        self, step: msg.StepOutputs, new_counts: dict[int, int], token_of: dict[int, int]
    ) -> None:
        if self.detokenizer is None:
            return
        for entry in step.logprobs:
            state = self.states.get(entry.uid)
            if state is not None and entry.uid in new_counts:
                state.pending_logprobs.append(self._logprob_entry(entry, token_of[entry.uid]))

    def _emit(
        self,
        uid: int,
        state: RequestState,
        num_new: int,
        end: msg.FinishedRequest | None,
        outputs: list[msg.RequestOutput],
    ) -> None:
        """Queue the request's new output; forget a finished request; stop one whose text hit a stop
        string (this process owns stop strings while serving: the scheduler is told to stop it)."""
        output = self._output(uid, state, num_new, end)
        if output is not None:
            outputs.append(output)
        if end is not None:
            del self.states[uid]
        elif state.decode.stopped and state.tokens_at_stop is None:
            state.tokens_at_stop = state.num_tokens
            self.to_scheduler.send(msg.encode(msg.AbortRequests([uid], reason="stop")))

    def _output(
        self, uid: int, state: RequestState, num_new: int, end: msg.FinishedRequest | None
    ) -> msg.RequestOutput | None:
        """The request's news since its last output, or None when it has none (its first output and its
        end are always sent)."""
        text = self._new_text(state, end)
        logprobs = state.pending_logprobs if state.top_logprobs is not None else None
        if not any((text, logprobs, end is not None, not state.sent_first)):
            return None
        state.sent_first = True
        state.pending_logprobs = []
        output = msg.RequestOutput(uid, text, num_new, logprobs or None)  # score-only: num_new is 0
        if end is not None:
            _set_finish(output, state, end)
        return output

    def _new_text(self, state: RequestState, end: msg.FinishedRequest | None) -> str:
        """The text decoded since the last output; the first output starts with the echoed prompt."""
        text = ""
        if self.detokenizer is not None:
            if end is not None:
                self.detokenizer.finish(state.decode)
            text = self.detokenizer.take_text(state.decode, end is not None or state.decode.stopped)
        return text if state.sent_first else state.echo_text + text

    def _prompt_entries(self, prompt_ids: list[int], prompt: msg.PromptLogprobs) -> list[list[Any]]:
        """Logprob entries of the echoed prompt; its first token has no logprob (nothing comes before it)."""
        assert self.detokenizer is not None
        text = self.detokenizer.token_text
        entries: list[list[Any]] = [[text(prompt_ids[0]), None, None]]
        for token, logprob, ids, values in zip(
            prompt_ids[1:], prompt.logprobs, prompt.top_ids, prompt.top_logprobs, strict=True
        ):
            entries.append(
                [text(token), float(logprob), [[text(i), float(v)] for i, v in zip(ids, values, strict=True)]]
            )
        return entries

    def _logprob_entry(self, entry: msg.TokenLogprobs, token: int) -> list[Any]:
        assert self.detokenizer is not None
        top = [
            [self.detokenizer.token_text(top_id), float(lp)]
            for top_id, lp in zip(entry.top_ids.tolist(), entry.top_logprobs, strict=True)
        ]
        return [self.detokenizer.token_text(token), float(entry.logprob), top]


def _is_text(end: msg.FinishedRequest | None) -> bool:
    """Whether a request's new token is text: not when it is the EOS or stop token that ended it."""
    return end is None or not end.last_token_is_stop


def _set_finish(output: msg.RequestOutput, state: RequestState, end: msg.FinishedRequest) -> None:
    """A finished request's reason and usage. A stop string found here ends it with "stop" and counts
    the tokens up to the match; a score-only request (max_tokens 0) reports no output token."""
    output.num_prompt_tokens = end.num_prompt_tokens
    output.num_cached_tokens = end.num_cached_tokens
    if state.score_only:
        output.finish_reason = "abort" if end.reason == "abort" else "length"
        output.num_output_tokens = 0
        return
    output.finish_reason = "stop" if state.decode.stopped else end.reason
    stopped_here = state.tokens_at_stop
    output.num_output_tokens = end.num_output_tokens if stopped_here is None else stopped_here


def _render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> str:
    """The chat as the model's chat template writes it, with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: use /v1/completions with a plain prompt")
    try:
        text: str = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
        )
    except Exception as exc:  # template errors (jinja raise_exception) are the client's fault
        raise ValueError(f"the chat template rejected these messages: {exc}") from None
    return text


def _prompt_param(group: msg.GenerateGroup) -> str:
    return "messages" if group.requests and group.requests[0].messages is not None else "prompt"

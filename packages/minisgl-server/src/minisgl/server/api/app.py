"""The OpenAI-compatible HTTP API (a Starlette app): routes, and the life of one generation request.

A request is checked (protocol.py), submitted as one group, and answered only once the engine's first
event for it arrives: a refusal (too long, queue full) is then still a proper 400 / 503, even for a
stream. A client that goes away, while waiting or mid-stream, aborts its requests, which frees their KV.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from minisgl.core.sampling_params import SamplingParams
from minisgl.server import messages as msg
from minisgl.server.api.body import read_json
from minisgl.server.api.prompt_size import check_prompt_size
from minisgl.server.api.protocol import (
    ApiError,
    GenerationSpec,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from minisgl.server.api.responses import ResponseBuilder
from minisgl.server.args import DEFAULT_MAX_REQUEST_BYTES
from minisgl.server.engine_client import EngineClient, EngineError, EngineGone, Event, Generation
from minisgl.server.metrics import Metrics
from minisgl.server.versions import package_versions, server_version

logger = logging.getLogger("minisgl.server.api")

HEALTH_TIMEOUT_S = 5.0
HEALTH_BUSY_S = 30.0  # a scheduler that sent something this recently is busy, not hung
METRICS_STATS_TIMEOUT_S = 5.0
TOKENIZER_TIMEOUT_S = 30.0
SHUTTING_DOWN = "the server is shutting down"
T = TypeVar("T")


@dataclass
class ServerState:
    client: EngineClient
    model_name: str
    model_path: str
    context_length: int | None = None
    api_key: str | None = None
    log_requests: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    longest_token: int | None = None  # characters of the vocabulary's longest token
    # the model's generation_config.json values for sampling fields a request leaves out
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    draining: bool = False  # the server is stopping: new requests and /health get 503
    started: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.model_name)


class ClientGone(Exception):
    """The HTTP client disconnected."""


def build_app(state: ServerState) -> Starlette:
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/version", version, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            EngineError: _engine_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    app.state.server = state
    return app


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


# ---- errors -----------------------------------------------------------------------------------------------


def error_response(request: Request, error: ApiError) -> JSONResponse:
    """The OpenAI-style error body; every error answered is counted in /metrics by status and reason."""
    state = _state(request)
    state.metrics.request_rejected(error.status, error.code or error.type)
    if state.log_requests:
        logger.info(
            "%s %s: %d %s (param %s): %s",
            request.method, request.url.path, error.status, error.code or error.type, error.param, error.message[:200],
        )  # fmt: skip
    return JSONResponse(error.body(), status_code=error.status)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request, exc)


async def _engine_error(request: Request, exc: Exception) -> Response:
    """The engine refused a request (queue full, engine gone) before any response was sent."""
    assert isinstance(exc, EngineError)
    return error_response(request, ApiError(exc.status, exc.message, exc.param, exc.code))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "not found" if exc.status_code == 404 else exc.detail
    return error_response(
        request, ApiError(exc.status_code, f"{request.method} {request.url.path}: {message}")
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(request, ApiError(500, f"internal server error: {type(exc).__name__}"))


def _check_api_key(request: Request) -> None:
    key = _state(request).api_key
    if key is not None and request.headers.get("authorization", "") != f"Bearer {key}":
        raise ApiError(
            401, "invalid or missing API key (send `Authorization: Bearer KEY`)", code="invalid_api_key"
        )


# ---- simple routes --------------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    """200 only when the scheduler answers a query through the tokenizer worker, now."""
    state = _state(request)
    if state.draining:
        return JSONResponse({"status": "unhealthy", "reason": SHUTTING_DOWN}, status_code=503)
    try:
        stats = await state.client.stats(HEALTH_TIMEOUT_S)
    except (EngineError, TimeoutError) as exc:
        return _unanswered_health(state, exc)
    return JSONResponse(
        {"status": "ok", "running": stats.get("num_running"), "waiting": stats.get("num_waiting")}
    )


def _unanswered_health(state: ServerState, exc: EngineError | TimeoutError) -> Response:
    """The scheduler did not answer: busy while its outputs still flow (a long step, such as a large
    prefill on a CPU), else unhealthy."""
    last = state.client.last_message_at
    if isinstance(exc, TimeoutError) and last is not None and time.monotonic() - last < HEALTH_BUSY_S:
        return JSONResponse({"status": "busy", "reason": "the scheduler is in a long step"})
    reason = exc.message if isinstance(exc, EngineError) else "the scheduler did not answer in time"
    return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)


async def metrics(request: Request) -> Response:
    state = _state(request)
    try:
        stats: dict[str, Any] | None = await state.client.stats(METRICS_STATS_TIMEOUT_S)
    except (EngineError, TimeoutError):
        stats = None
    return PlainTextResponse(state.metrics.render(stats), media_type="text/plain; version=0.0.4")


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "minisgl",
        "root": state.model_path,
        "max_model_len": state.context_length,
    }


async def list_models(request: Request) -> Response:
    _check_api_key(request)
    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


async def get_model(request: Request) -> Response:
    _check_api_key(request)
    state = _state(request)
    name = request.path_params["model"]
    if name != state.model_name:
        raise ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found")
    return JSONResponse(_model_card(state))


async def version(request: Request) -> Response:
    return JSONResponse({"version": server_version(), "packages": package_versions()})


async def tokenize(request: Request) -> Response:
    """vLLM's and SGLang's /tokenize: {"tokens": [...], "count": n, "max_model_len": context}."""
    _check_api_key(request)
    state = _state(request)
    query = parse_tokenize(await read_json(request, state.max_request_bytes), state.model_name)
    result = await _tokenizer_query(state, query, "messages" if query.messages is not None else "prompt")
    return JSONResponse({**result, "max_model_len": state.context_length})


async def detokenize(request: Request) -> Response:
    """{"tokens": [...]} -> {"prompt": text}."""
    _check_api_key(request)
    state = _state(request)
    query = parse_detokenize(await read_json(request, state.max_request_bytes), state.model_name)
    return JSONResponse(await _tokenizer_query(state, query, "tokens"))


async def _tokenizer_query(
    state: ServerState, query: msg.TokenizeQuery | msg.DetokenizeQuery, param: str
) -> dict[str, Any]:
    try:
        reply = await state.client.tokenizer_query(query, TOKENIZER_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(503, "the tokenizer did not answer in time", code="engine_unavailable") from None
    if reply.error is not None:
        raise ApiError(400, reply.error, param)
    return reply.result


# ---- generation -------------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    return await _generate(
        request,
        lambda body, model: parse_chat(
            body, model, state.tool_call_parser, state.reasoning_parser, state.sampling_defaults
        ),
    )


async def completions(request: Request) -> Response:
    state = _state(request)
    return await _generate(
        request, lambda body, model: parse_completion(body, model, state.sampling_defaults)
    )


async def _generate(request: Request, parse: Callable[[Any, str], GenerationSpec]) -> Response:
    _check_api_key(request)
    state = _state(request)
    if state.draining:
        raise ApiError(503, SHUTTING_DOWN, code="shutting_down")
    body = await read_json(request, state.max_request_bytes)
    spec = parse(body, state.model_name)  # SamplingParams' own checks are 400s there already
    check_prompt_size(spec, state.context_length, state.longest_token)
    requests = _engine_requests(state.client, spec)
    generation = state.client.submit(requests)  # an EngineError here is answered by _engine_error
    run = _Run(state, spec, generation, time.perf_counter())
    streaming = False
    try:
        run.accept(_first_output(await _unless_disconnected(request, generation.next_event())))
        if spec.stream:
            streaming = True  # from here on, the stream closes the generation
            return StreamingResponse(
                run.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return JSONResponse(await _unless_disconnected(request, run.collect()))
    except ClientGone:
        run.close()
        return Response(status_code=499)
    finally:
        if not streaming:
            generation.close()


def _first_output(first: Event) -> msg.RequestOutput:
    """A generation's first event: an output, or what the whole request is answered with (nothing has
    been sent yet, so a refusal or a dead engine is an HTTP error)."""
    if isinstance(first, msg.RequestError):
        raise ApiError(first.status, first.message, first.param, first.code)
    if isinstance(first, EngineGone):
        raise ApiError(503, first.reason, code="engine_unavailable")
    return first


def _engine_requests(client: EngineClient, spec: GenerationSpec) -> list[msg.GenerateRequest]:
    requests = []
    for prompt in spec.prompts:
        ids = msg.int32_array(prompt.token_ids) if prompt.token_ids is not None else None
        for sample in range(spec.n):
            requests.append(
                msg.GenerateRequest(
                    uid=client.new_uid(),
                    params=_sample_params(spec.params, sample),
                    prompt=prompt.text,
                    messages=prompt.messages,
                    prompt_ids=ids,
                    skip_special_tokens=spec.skip_special_tokens,
                    tools=spec.extras.tools,
                    chat_template_kwargs=spec.extras.template_kwargs or None,
                    echo=spec.echo,
                    score_only=spec.score_only,
                )
            )
    return requests


def _sample_params(params: SamplingParams, sample: int) -> SamplingParams:
    """Sample k of n is seeded seed + k: the n samples differ, each reproducibly. A copy of the checked
    params, not a rebuilt (re-checked) one: the protocol bounds seed so that seed + k stays in range."""
    if sample == 0 or params.seed is None:
        return params
    seeded = copy.copy(params)
    seeded.seed = params.seed + sample
    return seeded


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, unless the client disconnects first (then raise ClientGone)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    raise ClientGone


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Run:
    """One accepted generation request: its outputs, timings, and the response being built."""

    def __init__(
        self, state: ServerState, spec: GenerationSpec, generation: Generation, arrived: float
    ) -> None:
        self.state = state
        self.spec = spec
        self.generation = generation
        self.arrived = arrived
        self.builder = ResponseBuilder(spec, generation.uids)
        self.first: msg.RequestOutput | None = None

    def accept(self, first: msg.RequestOutput) -> None:
        self.first = first

    async def _output_batches(self) -> AsyncIterator[list[msg.RequestOutput]]:
        if self.first is not None:
            first, self.first = self.first, None
            yield [first]
        async for outputs in self.generation.output_batches():
            yield outputs

    def _record(self, output: msg.RequestOutput) -> Any:
        now = time.perf_counter()
        choice = self.builder.add(output, now)
        if output.finish_reason is not None:
            ttft = None if choice.first_token_at is None else choice.first_token_at - self.arrived
            self.state.metrics.request_finished(
                output.finish_reason,
                output.num_prompt_tokens,
                output.num_cached_tokens,
                output.num_output_tokens,
                ttft,
                now - self.arrived,
            )
            if self.state.log_requests:
                logger.info(
                    "%s (request %d): 200, finished (%s): prompt %d (cached %d), output %d tokens, %.3f s",
                    self.builder.id, output.uid, output.finish_reason, output.num_prompt_tokens,
                    output.num_cached_tokens, output.num_output_tokens, now - self.arrived,
                )  # fmt: skip
        return choice

    async def collect(self) -> dict[str, Any]:
        async for outputs in self._output_batches():
            for output in outputs:
                self._record(output)
        return self.builder.response()

    async def stream(self) -> AsyncIterator[str]:
        try:
            for chunk in self.builder.opening_chunks():
                yield chunk
            async for chunk in self._output_chunks():
                yield chunk
            for chunk in self.builder.closing_chunks():
                yield chunk
        finally:
            self.close()

    async def _output_chunks(self) -> AsyncIterator[str]:
        try:
            # Everything that arrived since the last write goes out in one write: under load this
            # costs the event loop one pass per request per wake-up instead of one per token.
            async for outputs in self._output_batches():
                chunks = "".join(self._chunks(outputs))
                if chunks:
                    yield chunks
        except EngineError as exc:
            # Headers are sent: say why in an error frame, and end every open choice with "abort".
            yield "data: " + json.dumps(ApiError(exc.status, exc.message, code=exc.code).body()) + "\n\n"
            for chunk in self.builder.abort_chunks():
                yield chunk

    def _chunks(self, outputs: list[msg.RequestOutput]) -> list[str]:
        return [c for output in outputs for c in self.builder.output_chunks(output, self._record(output))]

    def close(self) -> None:
        """Abort whatever has not finished (the client went away) and count it."""
        if self.generation.unfinished:
            self.state.metrics.requests_aborted(len(self.generation.unfinished))
        self.generation.close()

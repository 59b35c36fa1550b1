"""The launcher's side of the engine: submit requests, read their outputs, abort them, ask for stats.

Used by the HTTP API and by the shell's local mode. Everything runs on the caller's asyncio loop; one
listener task reads the PULL socket and routes each output to the Generation it belongs to. Outputs for
requests nobody waits for any more are dropped. With several tokenizer workers, groups are dealt to them
in turn; a group's aborts follow it to its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from minisgl.server import messages as msg
from minisgl.server.ipc import IpcAddresses

logger = logging.getLogger("minisgl.server")


@dataclass
class EngineGone:
    """Put in every open Generation when the engine's processes die."""

    reason: str


Event = msg.RequestOutput | msg.RequestError | EngineGone


class EngineError(RuntimeError):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class Generation:
    """The outputs of one submitted group, in arrival order. Iterate it; close() aborts what is left."""

    def __init__(self, client: EngineClient, uids: list[int], worker: int = 0) -> None:
        self.client = client
        self.uids = uids
        self.worker = worker  # the tokenizer worker that owns the group
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.unfinished = set(uids)

    @property
    def finished(self) -> bool:
        return not self.unfinished

    async def next_event(self) -> Event:
        return self._taken(await self.queue.get())

    def _taken(self, event: Event) -> Event:
        """Note what a taken event ends: its request, or (an error) the whole group."""
        if isinstance(event, msg.RequestOutput) and event.finish_reason is not None:
            self.unfinished.discard(event.uid)
        elif not isinstance(event, msg.RequestOutput):
            self.unfinished.clear()
        return event

    async def outputs(self) -> AsyncIterator[msg.RequestOutput]:
        """Outputs until every request finished; raises EngineError for a refused group or a dead engine."""
        while self.unfinished:
            yield _output_or_raise(await self.next_event())

    async def output_batches(self) -> AsyncIterator[list[msg.RequestOutput]]:
        """Like outputs(), but each item is everything that arrived while the consumer was busy, with the
        outputs of one request merged (see coalesce). A stream that keeps up gets one token at a time; one
        that falls behind catches up in a few large pieces instead of many small ones."""
        while self.unfinished:
            batch = await self._events_waiting()
            outputs = [e for e in batch if isinstance(e, msg.RequestOutput)]
            if outputs:
                yield coalesce(outputs)
            _raise_any_error(batch)

    async def _events_waiting(self) -> list[Event]:
        """The next event, and every other one already queued while requests are unfinished."""
        batch = [await self.next_event()]
        while self.unfinished and not self.queue.empty():
            batch.append(self._taken(self.queue.get_nowait()))
        return batch

    def close(self) -> None:
        """Stop listening; abort the requests that have not finished (a client that went away)."""
        self.client._release(self.uids)
        if self.unfinished:
            self.client.abort(sorted(self.unfinished), self.worker)
            self.unfinished.clear()


def _raise_any_error(events: list[Event]) -> None:
    for event in events:
        _output_or_raise(event)


def _output_or_raise(event: Event) -> msg.RequestOutput:
    if isinstance(event, msg.RequestError):
        raise EngineError(event.status, event.message, event.param, event.code)
    if isinstance(event, EngineGone):
        raise EngineError(503, event.reason, None, "engine_unavailable")
    return event


def coalesce(outputs: list[msg.RequestOutput]) -> list[msg.RequestOutput]:
    """One output per request, in order of first appearance: the texts, token counts and logprobs of its
    outputs joined; the finish reason and final counts are the last output's."""
    merged: dict[int, msg.RequestOutput] = {}
    for output in outputs:
        seen = merged.get(output.uid)
        merged[output.uid] = output if seen is None else _joined(seen, output)
    return list(merged.values())


def _joined(earlier: msg.RequestOutput, later: msg.RequestOutput) -> msg.RequestOutput:
    logprobs = None
    if earlier.logprobs is not None or later.logprobs is not None:
        logprobs = (earlier.logprobs or []) + (later.logprobs or [])
    return dataclasses.replace(
        later,
        text=earlier.text + later.text,
        num_new_tokens=earlier.num_new_tokens + later.num_new_tokens,
        logprobs=logprobs,
    )


class EngineClient:
    def __init__(self, addresses: IpcAddresses) -> None:
        self.context = zmq.asyncio.Context()
        self.senders = []
        for address in addresses.tokenizers:
            sender = self.context.socket(zmq.PUSH)
            sender.setsockopt(zmq.LINGER, 0)
            sender.connect(address)
            self.senders.append(sender)
        self._next_worker = itertools.cycle(range(len(self.senders)))
        self.receiver = self.context.socket(zmq.PULL)
        self.receiver.setsockopt(zmq.LINGER, 0)
        self.receiver.bind(addresses.frontend)
        self._uids = itertools.count(1)
        self._query_ids = itertools.count(1)
        self._routes: dict[int, Generation] = {}
        # Stats and tokenizer queries waiting for their reply, by query id.
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._listener: asyncio.Task[None] | None = None
        self.gone: str | None = None
        self.last_message_at: float | None = None  # time.monotonic() of the engine's latest message

    def start(self) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for sender in self.senders:
            sender.close(0)
        self.receiver.close(0)
        self.context.term()

    def new_uid(self) -> int:
        return next(self._uids)

    @property
    def num_open(self) -> int:
        return len(self._routes)

    # ---- requests ---------------------------------------------------------------------------------

    def submit(self, requests: list[msg.GenerateRequest]) -> Generation:
        generation = Generation(self, [r.uid for r in requests], next(self._next_worker))
        if self.gone is not None:
            generation.queue.put_nowait(EngineGone(self.gone))
            return generation
        for uid in generation.uids:
            self._routes[uid] = generation
        self._send(msg.GenerateGroup(requests), generation.worker)
        return generation

    def abort(self, uids: list[int], worker: int = 0) -> None:
        """Abort requests of one group; `worker` is the tokenizer worker the group was sent to."""
        if uids and self.gone is None:
            self._send(msg.AbortRequests(uids), worker)

    def _release(self, uids: list[int]) -> None:
        for uid in uids:
            self._routes.pop(uid, None)

    async def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The scheduler's counters; raises TimeoutError when it does not answer in time."""
        reply = await self._query(msg.StatsQuery(0), timeout, worker=0)
        stats: dict[str, Any] = reply.stats
        return stats

    async def tokenizer_query(
        self, query: msg.TokenizeQuery | msg.DetokenizeQuery, timeout: float
    ) -> msg.TokenizerReply:
        """/tokenize or /detokenize, answered by a tokenizer worker; TimeoutError when it does not."""
        reply: msg.TokenizerReply = await self._query(query, timeout, next(self._next_worker))
        return reply

    async def _query(self, query: Any, timeout: float, worker: int) -> Any:
        """Send a query (its query_id is set here) and wait for the reply that carries the same id."""
        if self.gone is not None:
            raise EngineError(503, self.gone, None, "engine_unavailable")
        query.query_id = next(self._query_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[query.query_id] = future
        try:
            self._send(query, worker)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.pop(query.query_id, None)

    def _send(self, message: Any, worker: int = 0) -> None:
        # A PUSH socket with a connected peer queues without blocking; NOBLOCK turns a stuck engine into an
        # error instead of a frozen event loop.
        try:
            self.senders[worker].send(msg.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            raise EngineError(
                503, "the engine is not accepting requests", None, "engine_unavailable"
            ) from None

    def fail_all(self, reason: str) -> None:
        """The engine died: every open Generation and stats query gets an error now."""
        self.gone = reason
        for generation in set(self._routes.values()):
            generation.queue.put_nowait(EngineGone(reason))
        self._routes.clear()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(EngineError(503, reason, None, "engine_unavailable"))

    # ---- routing ----------------------------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            data = await self.receiver.recv()
            self.last_message_at = time.monotonic()
            try:
                self._route(msg.decode(data))
            except Exception:  # a malformed message must not stop every request's outputs
                logger.exception("could not route a message from the tokenizer worker")

    def _route(self, message: Any) -> None:
        if isinstance(message, msg.OutputBatch):
            self._route_outputs(message.outputs)
        elif isinstance(message, msg.RequestError):
            self._route_error(message)
        elif isinstance(message, (msg.StatsReply, msg.TokenizerReply)):
            self._answer(message)
        else:
            logger.error("frontend got an unexpected %s; ignored", type(message).__name__)

    def _route_outputs(self, outputs: list[msg.RequestOutput]) -> None:
        """Each output to its Generation; a request's last output ends its route."""
        for output in outputs:
            generation = self._routes.get(output.uid)
            if generation is None:
                continue  # nobody waits for it any more
            generation.queue.put_nowait(output)
            if output.finish_reason is not None:
                del self._routes[output.uid]

    def _route_error(self, error: msg.RequestError) -> None:
        """A refused group: its Generation gets the error once, and its routes end."""
        generations = {id(g): g for g in (self._routes.pop(uid, None) for uid in error.uids) if g is not None}
        for generation in generations.values():
            generation.queue.put_nowait(error)

    def _answer(self, reply: msg.StatsReply | msg.TokenizerReply) -> None:
        future = self._waiters.get(reply.query_id)
        if future is not None and not future.done():
            future.set_result(reply)

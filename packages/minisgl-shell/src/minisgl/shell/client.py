"""Where the shell's replies come from: a local engine (the server's own launch code and engine client,
no HTTP) or a running server's /v1/chat/completions stream. Both yield text pieces as they arrive;
closing the stream early (Ctrl-C) aborts the generation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from minisgl.core.request_error import InvalidRequestError
from minisgl.core.sampling_params import SamplingParams
from minisgl.server import messages as msg
from minisgl.server.engine_client import EngineClient, EngineError
from minisgl.server.launch import EngineProcesses


class ShellError(Exception):
    """A reply could not be generated; the message says why (printed, the shell goes on)."""


class EngineLost(ShellError):
    """The engine behind the shell is gone: the shell exits."""


@dataclass
class ChatSettings:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p)

    def check(self) -> None:
        """Raise ValueError naming the option that is out of range."""
        try:
            self.sampling_params()
        except InvalidRequestError as exc:
            flag = (exc.param or "").replace("_", "-")
            raise ValueError(f"argument --{flag}: {exc.message}") from None


class ChatBackend(Protocol):
    name: str

    async def start(self) -> None: ...

    def stream_chat(self, messages: list[dict[str, str]], settings: ChatSettings) -> AsyncIterator[str]: ...

    async def close(self) -> None: ...


class LocalBackend:
    """Talks to engine processes that this shell launched."""

    def __init__(self, engine: EngineProcesses, model_name: str) -> None:
        self.engine = engine
        self.name = model_name
        self.client: EngineClient | None = None

    async def start(self) -> None:
        self.client = EngineClient(self.engine.addresses)
        self.client.start()
        loop = asyncio.get_running_loop()
        for process in self.engine.processes:
            loop.add_reader(process.sentinel, self._child_died, process)

    def _child_died(self, process: Any) -> None:
        asyncio.get_running_loop().remove_reader(process.sentinel)
        if self.client is not None and self.client.gone is None:
            self.client.fail_all(f"{process.name} died (exit code {process.exitcode})")

    async def stream_chat(self, messages: list[dict[str, str]], settings: ChatSettings) -> AsyncIterator[str]:
        assert self.client is not None
        if self.client.gone is not None:
            raise EngineLost(self.client.gone)
        request = msg.GenerateRequest(
            uid=self.client.new_uid(), params=settings.sampling_params(), messages=messages
        )
        generation = self.client.submit([request])
        try:
            async for output in generation.outputs():
                if output.text:
                    yield output.text
        except EngineError as exc:
            raise self._failure(exc) from None
        finally:
            generation.close()

    def _failure(self, exc: EngineError) -> ShellError:
        """EngineLost when the engine is gone (the shell ends), else this reply's own error."""
        assert self.client is not None
        if self.client.gone is not None:
            return EngineLost(self.client.gone)
        return ShellError(exc.message)

    async def close(self) -> None:
        if self.client is not None:
            loop = asyncio.get_running_loop()
            for process in self.engine.processes:
                loop.remove_reader(process.sentinel)
            await self.client.stop()


class RemoteBackend:
    """Talks to a running minisgl (or any OpenAI-compatible) server. A lost connection fails only the
    current reply, so the shell survives a server restart with its conversation."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = model or ""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(None, connect=10.0), transport=transport
        )

    async def start(self) -> None:
        try:
            response = await self.http.get(f"{self.url}/v1/models")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise EngineLost(f"cannot reach {self.url}: {exc}") from None
        if not self.name:
            self.name = str(response.json()["data"][0]["id"])

    async def stream_chat(self, messages: list[dict[str, str]], settings: ChatSettings) -> AsyncIterator[str]:
        body = {
            "model": self.name,
            "messages": messages,
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "stream": True,
        }
        try:
            async with self.http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise ShellError(_error_message(await response.aread(), response.status_code))
                async for line in response.aiter_lines():
                    for text in _chunk_texts(line):
                        yield text
        except httpx.HTTPError as exc:
            # The server may be restarting: keep the shell and its conversation; the next message
            # connects afresh.
            raise ShellError(
                f"lost the connection to {self.url} ({exc or type(exc).__name__}); the conversation is "
                "kept: send the message again once the server is back"
            ) from None

    async def close(self) -> None:
        await self.http.aclose()


def _chunk_texts(line: str) -> list[str]:
    """The reply text one server-sent-events line of a chat stream carries (an error event raises)."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return []
    chunk = json.loads(line[len("data: ") :])
    if "error" in chunk:
        raise ShellError(str(chunk["error"].get("message")))
    texts = (choice.get("delta", {}).get("content") for choice in chunk.get("choices", []))
    return [text for text in texts if text]


def _error_message(body: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200]!r}"

"""Reading a request body: its size limit (413), the JSON parse, and what JSON allows but the engine cannot
carry (400 naming the field): integers beyond 64 bits, lone UTF-16 surrogates, deep nesting.

The size is checked from Content-Length before anything is read, and again while reading (a chunked body
has no length). Large bodies are parsed and checked in a thread, so one big request does not stall the
event loop every other request shares.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request

from minisgl.server.api.protocol import ApiError

MAX_DEPTH = 32  # nesting of arrays and objects; real requests use fewer than 8
INT_LIMIT = 2**63  # integers must fit a signed 64-bit field on their way to the engine
THREAD_PARSE_BYTES = 256 * 1024  # bodies larger than this are parsed off the event loop


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as checked JSON, or an ApiError (413 too large, 400 not usable JSON)."""
    data = await _read_at_most(request, max_bytes)
    if not data.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    if len(data) > THREAD_PARSE_BYTES:
        return await asyncio.to_thread(parse_json, data)
    return parse_json(data)


async def _read_at_most(request: Request, max_bytes: int) -> bytes:
    """The body's bytes; a 413 as soon as it (or its declared length) is over max_bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> ApiError:
    message = f"the request body is larger than {max_bytes:,} bytes, the most this server accepts"
    return ApiError(413, message + " (--max-request-bytes)", code="request_too_large")


def parse_json(data: bytes) -> Any:
    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(
            400, f"the request body is nested too deeply (at most {MAX_DEPTH} levels)", code="invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    check_values(body)
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_values(body: Any) -> None:
    """Raise a 400 naming the first field holding an integer out of 64-bit range, a string that is not
    valid Unicode (a lone surrogate such as "\\ud800"), or nesting deeper than MAX_DEPTH."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            stack.extend(_children(value, path, depth))
        elif isinstance(value, str):
            _check_string(value, path)
        elif _outside_int64(value):
            raise ApiError(400, f"'{path}' holds an integer outside the 64-bit range", path)


def _children(container: dict[str, Any] | list[Any], path: str, depth: int) -> list[tuple[Any, str, int]]:
    """The items of an object or array, each with its path, one level deeper (object keys are checked)."""
    if depth >= MAX_DEPTH:
        raise ApiError(400, f"'{path}' is nested too deeply (at most {MAX_DEPTH} levels)", path)
    if isinstance(container, list):
        return [(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(container)]
    for key in container:
        _check_string(key, path or "body")
    return [(item, _member_path(path, key), depth + 1) for key, item in container.items()]


def _member_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _outside_int64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT


def _check_string(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{path}' holds a lone UTF-16 surrogate (not valid Unicode)", path) from None

"""The messages minisgl's processes exchange, and their one wire format.

    API server --GenerateGroup/AbortRequests/StatsQuery--> tokenizer --TokenizedGroup/...--> scheduler
    API server <--OutputBatch/RequestError/StatsReply-- detokenizer <--StepOutputs/...-- scheduler

Every message is a dataclass listed in MESSAGE_TYPES, the one registry: a message travels as msgpack
[type id, field values...], with the type id its position in that tuple. Token arrays are numpy arrays
and travel as raw little-endian bytes. Nothing else can be sent (no pickle): an unregistered object is a
TypeError at the sender, an unknown type id a ValueError at the receiver. Only the server's own processes
are on these sockets, so received SamplingParams are not validated again: the API checked them once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from minisgl.core.sampling_params import SamplingParams

# ---- API server -> tokenizer --------------------------------------------------------------------------


@dataclass
class GenerateRequest:
    """One sequence to generate. Exactly one of prompt (text), messages (a chat) or prompt_ids is set."""

    uid: int
    params: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_ids: np.ndarray | None = None
    skip_special_tokens: bool = True
    # Chats: the tools and extra arguments the chat template is rendered with.
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # The prompt's text (and, with params.prompt_logprobs, its logprobs) comes before the output's.
    echo: bool = False
    # max_tokens 0: the one token the engine computes after the prompt is dropped, not reported.
    score_only: bool = False


@dataclass
class GenerateGroup:
    """Requests accepted or rejected together (the n samples and prompts of one HTTP request)."""

    requests: list[GenerateRequest]


@dataclass
class AbortRequests:
    """Stop these requests: "abort" (the client went away), or "stop" (the detokenizer found one of
    their stop strings: it owns them while serving, the scheduler decodes no text)."""

    uids: list[int]
    reason: str = "abort"


@dataclass
class StatsQuery:
    """Asks the scheduler for its counters; the reply proves every process on the path is alive."""

    query_id: int


@dataclass
class TokenizeQuery:
    """/tokenize: a text prompt, or a chat rendered with the chat template (and the generation prompt)."""

    query_id: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


@dataclass
class DetokenizeQuery:
    query_id: int
    token_ids: np.ndarray


@dataclass
class TokenizerReply:
    """The tokenizer worker's answer to a TokenizeQuery / DetokenizeQuery, or why it could not answer."""

    query_id: int
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---- tokenizer -> scheduler ---------------------------------------------------------------------------


@dataclass
class TokenizedRequest:
    uid: int
    prompt_ids: np.ndarray
    params: SamplingParams


@dataclass
class TokenizedGroup:
    requests: list[TokenizedRequest]
    # The tokenizer worker that owns these requests: their tokens go back to it.
    worker: int = 0


# ---- scheduler -> detokenizer -------------------------------------------------------------------------


@dataclass
class TokenLogprobs:
    uid: int
    logprob: float
    top_ids: np.ndarray
    top_logprobs: list[float]


@dataclass
class PromptLogprobs:
    """The logprobs of prompt tokens 1 .. n-1 (token 0 has none), and the top alternatives at each."""

    uid: int
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class FinishedRequest:
    uid: int
    reason: str  # "stop", "length" or "abort"
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    # The last token is the EOS or a stop token id: counted, but not part of the text.
    last_token_is_stop: bool = False


@dataclass
class StepOutputs:
    """What one scheduler step produced: one new token per request (column arrays), and the requests that
    finished in the step or were aborted since the last one."""

    uids: np.ndarray
    tokens: np.ndarray
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)
    # Sent with a request's first output token, when it asked for prompt logprobs.
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


@dataclass
class StatsReply:
    query_id: int
    stats: dict[str, Any]


# ---- detokenizer -> API server ------------------------------------------------------------------------


@dataclass
class RequestOutput:
    """New text of one request since its last output. logprobs: one [token text, logprob, [[alt text,
    alt logprob], ...]] per new token, when the request asked for them."""

    uid: int
    text: str
    num_new_tokens: int
    logprobs: list[list[Any]] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class OutputBatch:
    outputs: list[RequestOutput]


@dataclass
class RequestError:
    """A group the tokenizer or scheduler refused; status is the HTTP status the API answers with."""

    uids: list[int]
    status: int
    message: str
    param: str | None = None
    code: str | None = None


# ---- the registry and the codec -----------------------------------------------------------------------

MESSAGE_TYPES: tuple[type, ...] = (
    SamplingParams,
    GenerateRequest,
    GenerateGroup,
    AbortRequests,
    StatsQuery,
    TokenizedRequest,
    TokenizedGroup,
    TokenLogprobs,
    FinishedRequest,
    StepOutputs,
    StatsReply,
    RequestOutput,
    OutputBatch,
    RequestError,
    TokenizeQuery,
    DetokenizeQuery,
    TokenizerReply,
    PromptLogprobs,
)
_TYPE_IDS = {cls: index for index, cls in enumerate(MESSAGE_TYPES)}
_INIT_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls) if f.init) for cls in MESSAGE_TYPES}
# How a received message is built: SamplingParams were validated where the API or the offline entry
# point built them, and only our own processes are on these sockets, so they are not checked again.
_BUILDERS: dict[type, Callable[..., Any]] = {SamplingParams: SamplingParams.trusted}

_EXT_MESSAGE = 1
# Token arrays: extension code -> little-endian dtype, and numpy dtype -> extension code.
_EXT_DTYPES = {2: "<i4", 3: "<i8"}
_ARRAY_CODES = {np.dtype(np.int32): 2, np.dtype(np.int64): 3}


def int32_array(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def int64_array(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _pack_default(obj: Any) -> Any:
    """msgpack's hook for what it cannot pack itself: registered messages and token arrays."""
    type_id = _TYPE_IDS.get(type(obj))
    if type_id is not None:
        values = [getattr(obj, name) for name in _INIT_FIELDS[type(obj)]]
        return msgpack.ExtType(_EXT_MESSAGE, _pack([type_id, *values]))
    if isinstance(obj, np.ndarray):
        return _array_ext(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not a registered message type and cannot be sent")


def _array_ext(array: np.ndarray) -> msgpack.ExtType:
    if array.ndim != 1:
        raise TypeError(f"only 1-D token arrays can be sent, got shape {array.shape}")
    code = _ARRAY_CODES.get(array.dtype)
    if code is None:
        raise TypeError(f"arrays must be int32 or int64, got {array.dtype}")
    return msgpack.ExtType(code, array.astype(_EXT_DTYPES[code], copy=False).tobytes())


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_MESSAGE:
        return _message(_unpack(data))
    dtype = _EXT_DTYPES.get(code)
    if dtype is None:
        raise ValueError(f"unknown msgpack extension {code}")
    return np.frombuffer(data, dtype=dtype)


def _message(packed: list[Any]) -> Any:
    type_id, *values = packed
    if not isinstance(type_id, int) or not 0 <= type_id < len(MESSAGE_TYPES):
        raise ValueError(f"unknown message type id {type_id!r}")
    cls = MESSAGE_TYPES[type_id]
    names = _INIT_FIELDS[cls]
    if len(values) != len(names):
        raise ValueError(f"{cls.__name__} has {len(names)} fields, got {len(values)}")
    return _BUILDERS.get(cls, cls)(**dict(zip(names, values, strict=True)))


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, default=_pack_default, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def encode(message: Any) -> bytes:
    """The wire bytes of a registered message."""
    if type(message) not in _TYPE_IDS:
        raise TypeError(f"{type(message).__name__} is not a registered message type and cannot be sent")
    return _pack(message)


def decode(data: bytes) -> Any:
    """The message that encode() turned into these bytes."""
    message = _unpack(data)
    if type(message) not in _TYPE_IDS:
        raise ValueError(f"expected a message, got {type(message).__name__}")
    return message

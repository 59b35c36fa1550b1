"""OpenAI request bodies in, checked GenerationSpecs out; anything wrong is an ApiError (400/404).

Every field is checked here, before anything reaches the engine: a bad request never costs the engine
anything, and its error names the field (`param`), as OpenAI's errors do. This module checks JSON types
and the API's own limits; the sampling fields' ranges are SamplingParams' (declared once, in core), whose
InvalidRequestError names the field. The SamplingParams of a request is built once, from the body and
the model's generation_config.json values for the fields the body leaves out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from minisgl.core.request_error import InvalidRequestError
from minisgl.core.sampling_params import FLOAT_RANGES, MAX_TOP_LOGPROBS, SamplingParams
from minisgl.server.api.structured import (
    ChatExtras,
    FieldError,
    chat_extras,
    grammar_fields,
    history_tool_calls,
)
from minisgl.server.messages import DetokenizeQuery, TokenizeQuery, int32_array

MAX_N = 128
MAX_SEQUENCES = 1024  # prompts x n in one request
MAX_STOP_STRINGS = 16
MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
T = TypeVar("T")

# Every field each endpoint reads. Any other field is refused with a 400 naming it, never ignored.
# `user` and `metadata` are informational in OpenAI's API too: accepted, and they change nothing.
COMMON_FIELDS = frozenset(
    {
        "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop",
        "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "logprobs", "stream", "stream_options", "skip_special_tokens", "min_tokens", "logit_bias", "user",
        "metadata",
    }
)  # fmt: skip
# Fields of OpenAI's API this server does not implement: allowed only with a value that changes nothing.
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
COMPLETION_UNSUPPORTED: dict[str, tuple[Any, ...]] = {"suffix": (None, ""), "best_of": (None, 1)}
# Structured output (both endpoints) and tools / chat template arguments (chat): api/structured.py.
GRAMMAR_FIELDS = frozenset({"response_format", "regex", "ebnf"})
CHAT_FIELDS = (
    COMMON_FIELDS
    | GRAMMAR_FIELDS
    | {"messages", "max_completion_tokens", "top_logprobs"}
    | {"tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs"}
    | set(CHAT_UNSUPPORTED)
)
COMPLETION_FIELDS = COMMON_FIELDS | GRAMMAR_FIELDS | {"prompt", "echo"} | set(COMPLETION_UNSUPPORTED)
TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens"})
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _error_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


@dataclass
class Prompt:
    """One prompt: text (completions), a chat (messages), or token ids."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[int] | None = None


@dataclass
class GenerationSpec:
    """A checked request of either endpoint."""

    chat: bool
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    # None: no logprobs; k: the chosen token's logprob plus the k most likely alternatives.
    top_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Chat only: tools, output parsers and chat template arguments.
    extras: ChatExtras = field(default_factory=ChatExtras)
    # Completions: the prompt comes first in each choice's text (and logprobs, with `logprobs`).
    echo: bool = False
    # Completions with max_tokens 0: the prompt is only scored (and echoed); nothing is generated.
    score_only: bool = False

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


# ---- field readers --------------------------------------------------------------------------------------

_MISSING = object()


# JSON's names of Python's types, for error messages (bool before int: a bool is an int).
_JSON_TYPE_NAMES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (type(None), "null"),
    (bool, "boolean"),
    ((int, float), "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
)


def _type_name(value: Any) -> str:
    return next((name for kinds, name in _JSON_TYPE_NAMES if isinstance(value, kinds)), type(value).__name__)


def _absent(value: Any) -> bool:
    """A field left out, or sent as null (which OpenAI's API treats the same)."""
    return value is _MISSING or value is None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _every(values: list[Any], kind: type) -> bool:
    return all(isinstance(value, kind) for value in values)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(body: dict[str, Any], name: str) -> float | None:
    """A number field, or None when left out; its range is SamplingParams' to check."""
    value = body.get(name)
    if value is None:
        return None
    if not _is_finite_number(value):
        raise ApiError(400, f"'{name}' must be a number, got {_type_name(value)}", name)
    return float(value)


def _integer(
    body: dict[str, Any], name: str, default: int | None, low: int | None = None, high: int | None = None
) -> int | None:
    value = body.get(name, _MISSING)
    if _absent(value):
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise ApiError(400, f"'{name}' must be an integer, got {_type_name(value)}", name)
    _check_bounds(name, value, low, high)
    return value


def _check_bounds(name: str, value: int, low: int | None, high: int | None) -> None:
    if low is not None and value < low:
        raise ApiError(400, f"'{name}' must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise ApiError(400, f"'{name}' must be <= {high}, got {value}", name)


def _boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, _MISSING)
    if _absent(value):
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean, got {_type_name(value)}", name)
    return value


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(map(_is_int, value)):
        raise ApiError(400, f"'{name}' must be a list of integer token ids", name)
    if min(value, default=0) < 0:
        raise ApiError(400, f"'{name}' holds a negative token id", name)
    if max(value, default=0) > MAX_TOKEN_ID:
        raise ApiError(400, f"'{name}' holds a token id above {MAX_TOKEN_ID}", name)
    return value


def _optional_token_ids(body: dict[str, Any], name: str) -> list[int] | None:
    value = body.get(name)
    return None if value is None else _token_ids(value, name)


def _sampling_params(fields: dict[str, Any], defaults: dict[str, Any]) -> SamplingParams:
    """The request's SamplingParams, built (and so checked) once: the body's fields over the model's
    defaults; a value out of range is a 400 naming its field."""
    try:
        return SamplingParams(**{**defaults, **fields})
    except InvalidRequestError as exc:
        raise ApiError(400, exc.message, exc.param) from None


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string, got {_type_name(value)}", name)
    return value


def _logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} object (JSON keys are strings); the range is SamplingParams' check."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(
            400, f"'logit_bias' must be an object of token id -> bias, got {_type_name(value)}", "logit_bias"
        )
    return dict(_bias_entry(key, number) for key, number in value.items()) or None


def _bias_entry(key: str, number: Any) -> tuple[int, float]:
    try:
        token = int(key)
    except ValueError:
        raise ApiError(400, f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
    if not _is_finite_number(number):
        raise ApiError(400, f"'logit_bias' values must be numbers, got {_type_name(number)}", "logit_bias")
    return token, float(number)


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    value = _string_list(value)
    if len(value) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(value)}", "stop")
    if not all(value):
        raise ApiError(400, "'stop' strings must not be empty", "stop")
    return list(dict.fromkeys(value))


def _string_list(value: Any) -> list[str]:
    """'stop': a string stands for a list of one."""
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    return value


def _reject_unsupported(
    body: dict[str, Any], known: frozenset[str] | set[str], harmless: dict[str, tuple[Any, ...]]
) -> None:
    """Unknown fields, and fields this server does not implement unless they hold a value that changes
    nothing, are refused: a client must never believe a field took effect when it did not."""
    for name in body:
        if name not in known:
            raise ApiError(
                400, f"'{name}' is not a field this endpoint accepts", name, "unsupported_parameter"
            )
    for name, allowed in harmless.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")


def _as_api_error(check: Callable[..., T], *args: Any) -> T:
    """The checks of structured.py raise FieldError: a 400 naming the field."""
    try:
        return check(*args)
    except FieldError as exc:
        raise ApiError(400, exc.message, exc.param) from None


def _model(body: dict[str, Any], served: str) -> str:
    model = body.get("model", _MISSING)
    if _absent(model):
        return served
    if not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {_type_name(model)}", "model")
    if model != served:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; this server serves '{served}'",
            "model",
            "model_not_found",
        )
    return model


# ---- the two endpoints ----------------------------------------------------------------------------------


def parse_chat(
    body: Any,
    served_model: str,
    tool_parser: str | None = None,
    reasoning_parser: str | None = None,
    sampling_defaults: dict[str, Any] | None = None,
) -> GenerationSpec:
    body = _object(body)
    model = _model(body, served_model)
    messages = _messages(body.get("messages", _MISSING))
    _reject_unsupported(body, CHAT_FIELDS, CHAT_UNSUPPORTED)
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, 1)
    logprobs = _chat_logprobs(body)
    # A chat without max_tokens may answer up to the end of the context.
    fields = {**_sampling_fields(body), "max_tokens": max_tokens, "logprobs": logprobs}
    extras = _as_api_error(chat_extras, body, fields, tool_parser, reasoning_parser)
    spec = _spec(
        body, model, True, [Prompt(messages=messages)], _sampling_params(fields, sampling_defaults or {})
    )
    spec.extras = extras
    return spec


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """SamplingParams.logprobs of a chat: None without 'logprobs', else 'top_logprobs' (default 0)."""
    logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if logprobs else None


def parse_completion(
    body: Any, served_model: str, sampling_defaults: dict[str, Any] | None = None
) -> GenerationSpec:
    body = _object(body)
    model = _model(body, served_model)
    prompts = _prompts(body.get("prompt", _MISSING))
    _reject_unsupported(body, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED)
    max_tokens = _integer(body, "max_tokens", None, 0)
    top = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    echo = _boolean(body, "echo", False)
    fields = _sampling_fields(body)
    if max_tokens is not None:
        # max_tokens 0 runs one step (the engine always computes a token after the prompt) whose token
        # the tokenizer worker drops. Left out: SamplingParams' default, as OpenAI's 16.
        fields["max_tokens"] = max_tokens or 1
    fields.update(logprobs=top, prompt_logprobs=echo and top is not None)
    spec = _spec(body, model, False, prompts, _sampling_params(fields, sampling_defaults or {}))
    spec.echo = echo
    spec.score_only = max_tokens == 0
    if spec.score_only and spec.params.min_tokens:
        raise ApiError(400, "'min_tokens' must be 0 when 'max_tokens' is 0", "min_tokens")
    return spec


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def _sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams fields both endpoints read, type-checked; those the body leaves out are left out
    (the model's defaults, then SamplingParams', fill them in)."""
    top_k = _integer(body, "top_k", None, -1)
    fields: dict[str, Any] = {name: _number(body, name) for name in FLOAT_RANGES}
    fields.update(
        top_k=-1 if top_k == 0 else top_k,
        seed=_integer(body, "seed", None, -(2**63), 2**63 - MAX_N - 1),
        stop_token_ids=_optional_token_ids(body, "stop_token_ids"),
        stop=_stop(body) or None,
        ignore_eos=_boolean(body, "ignore_eos", False),
        min_tokens=_integer(body, "min_tokens", None, 0),
        logit_bias=_logit_bias(body.get("logit_bias")),
        **_as_api_error(grammar_fields, body),
    )
    return {name: value for name, value in fields.items() if value is not None}


def _spec(
    body: dict[str, Any], model: str, chat: bool, prompts: list[Prompt], params: SamplingParams
) -> GenerationSpec:
    n = _integer(body, "n", 1, 1, MAX_N)
    assert n is not None
    if n * len(prompts) > MAX_SEQUENCES:
        raise ApiError(400, f"n x prompts must be at most {MAX_SEQUENCES}, got {n * len(prompts)}", "n")
    stream = _boolean(body, "stream", False)
    include_usage = _include_usage(body.get("stream_options"), stream)
    _string(body, "user")
    if not isinstance(body.get("metadata", {}), (dict, type(None))):
        raise ApiError(400, "'metadata' must be an object", "metadata")
    return GenerationSpec(
        chat=chat,
        model=model,
        prompts=prompts,
        params=params,
        n=n,
        stream=stream,
        include_usage=include_usage,
        top_logprobs=params.logprobs,
        skip_special_tokens=_boolean(body, "skip_special_tokens", True),
    )


def _include_usage(options: Any, stream: bool) -> bool:
    """stream_options.include_usage: a final chunk with the usage (only a stream has options)."""
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    return _boolean(options, "include_usage", False)


def _messages(value: Any) -> list[dict[str, Any]]:
    if _absent(value):
        raise ApiError(400, "'messages' is required", "messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    return [_message(message, f"messages[{i}]") for i, message in enumerate(value)]


def _message(message: Any, where: str) -> dict[str, Any]:
    """One chat message, as the chat template gets it ("developer" is the template's "system")."""
    if not isinstance(message, dict):
        raise ApiError(400, f"'{where}' must be an object, got {_type_name(message)}", where)
    role = _role(message.get("role"), where)
    content = _content(message.get("content"), f"{where}.content", allow_none=role == "assistant")
    checked: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    return {**checked, **_message_extras(message, role, where)}


def _message_extras(message: dict[str, Any], role: str, where: str) -> dict[str, Any]:
    """An assistant's earlier tool calls, and the tool_call_id and name of a message that has them."""
    extras: dict[str, Any] = {}
    if role == "assistant" and message.get("tool_calls"):
        extras["tool_calls"] = _as_api_error(history_tool_calls, message["tool_calls"], f"{where}.tool_calls")
    names = [name for name in ("tool_call_id", "name") if isinstance(message.get(name), str)]
    return {**extras, **{name: message[name] for name in names}}


def _role(role: Any, where: str) -> str:
    if role not in CHAT_ROLES:
        raise ApiError(
            400, f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}", f"{where}.role"
        )
    return str(role)


def _content(value: Any, where: str, allow_none: bool) -> str:
    if isinstance(value, str):
        return value
    if value is None and allow_none:
        return ""
    if isinstance(value, list):
        return "".join(_text_part(part, where) for part in value)
    raise ApiError(
        400, f"'{where}' must be a string or an array of text parts, got {_type_name(value)}", where
    )


def _text_part(part: Any, where: str) -> str:
    text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
    if not isinstance(text, str):
        raise ApiError(400, f'\'{where}\' parts must be {{"type": "text", "text": ...}} objects', where)
    return text


_PROMPT_SHAPES = (
    "'prompt' must be a string, a non-empty array of strings, an array of token ids, "
    "or an array of token-id arrays"
)


def _prompts(value: Any) -> list[Prompt]:
    if _absent(value):
        raise ApiError(400, "'prompt' is required", "prompt")
    if isinstance(value, str):
        return [Prompt(text=value)]
    if not isinstance(value, list) or not value:
        raise ApiError(400, _PROMPT_SHAPES, "prompt")
    return _prompt_list(value)


def _prompt_list(value: list[Any]) -> list[Prompt]:
    """A non-empty array: of texts, of token ids (one prompt), or of token-id arrays (one prompt each)."""
    if _every(value, str):
        return [Prompt(text=p) for p in value]
    if all(map(_is_int, value)):
        return [Prompt(token_ids=_token_ids(value, "prompt"))]
    if not _every(value, list):
        raise ApiError(400, _PROMPT_SHAPES, "prompt")
    if not all(value):
        raise ApiError(400, "'prompt' token-id lists must not be empty", "prompt")
    return [Prompt(token_ids=_token_ids(p, "prompt")) for p in value]


# ---- /tokenize and /detokenize --------------------------------------------------------------------------


def parse_tokenize(body: Any, served_model: str) -> TokenizeQuery:
    """{"prompt": text} or {"messages": [...]} (rendered with the chat template and the generation
    prompt), with add_special_tokens (default true; a chat's template already holds its special tokens)."""
    body = _object(body)
    _model(body, served_model)
    _reject_unsupported(body, TOKENIZE_FIELDS, {})
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "send exactly one of 'prompt' (a string) or 'messages'", "prompt")
    add_special_tokens = _boolean(body, "add_special_tokens", True)
    if "messages" in body:
        return TokenizeQuery(0, messages=_messages(body["messages"]), add_special_tokens=add_special_tokens)
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise ApiError(400, f"'prompt' must be a string, got {_type_name(prompt)}", "prompt")
    return TokenizeQuery(0, prompt=prompt, add_special_tokens=add_special_tokens)


def parse_detokenize(body: Any, served_model: str) -> DetokenizeQuery:
    body = _object(body)
    _model(body, served_model)
    _reject_unsupported(body, DETOKENIZE_FIELDS, {})
    if body.get("tokens") is None:
        raise ApiError(400, "'tokens' is required", "tokens")
    return DetokenizeQuery(0, int32_array(_token_ids(body["tokens"], "tokens")))

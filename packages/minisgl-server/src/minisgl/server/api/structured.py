"""The request fields of structured output, tool calling and reasoning models: response_format, regex,
ebnf, tools, tool_choice, parallel_tool_calls and chat_template_kwargs, checked and turned into the
SamplingParams grammar fields and what the chat template and the output parsers need."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from minisgl.core.sampling.structured import check_grammar_source
from minisgl.core.sampling_params import GRAMMAR_FIELDS
from minisgl.server.api.parsers import REASONING_PARSERS, TOOL_PARSERS

# Keys of chat_template_kwargs that the server itself sets.
RESERVED_TEMPLATE_KEYS = ("conversation", "messages", "tools", "tokenize", "add_generation_prompt")


class FieldError(ValueError):
    """A bad request field: param names it, as OpenAI's errors do."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass
class ChatExtras:
    """What a chat request asks beyond plain sampling."""

    tools: list[dict[str, Any]] | None = None
    # None: tool calls are not parsed (no tools, or tool_choice "none").
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def _member(value: Any, key: str) -> Any:
    """value[key] when value is a JSON object, else None (a wrong shape is reported by the caller)."""
    return value.get(key) if isinstance(value, dict) else None


def grammar_fields(body: dict[str, Any]) -> dict[str, str]:
    """SamplingParams fields (json_schema / regex / ebnf) from response_format and the regex and ebnf
    extras; each is parsed now so that a bad one is a 400 naming its field."""
    found = _grammar_sources(body)  # SamplingParams field -> (request field, source)
    if len(found) > 1:
        names = " and ".join(source for source, _ in found.values())
        raise FieldError(
            next(iter(found.values()))[0], f"only one of response_format, regex and ebnf, got {names}"
        )
    for name, (source, value) in found.items():
        try:
            check_grammar_source(name, value)
        except ValueError as exc:
            raise FieldError(source, f"'{source}': {exc}") from None
    return {name: value for name, (_, value) in found.items()}


def _grammar_sources(body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    schema = _response_format(body.get("response_format"))
    if schema is not None:
        found["json_schema"] = ("response_format", schema)
    for name in ("regex", "ebnf"):
        value = body.get(name)
        if value is not None:
            found[name] = (name, _non_empty_string(value, name))
    return found


def _non_empty_string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError(name, f"'{name}' must be a non-empty string")
    return value


def _response_format(value: Any) -> str | None:
    kind = _member(value, "type")
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        return _json_schema(value.get("json_schema"))
    raise FieldError(
        "response_format", '\'response_format\' must be {"type": "text" | "json_object" | "json_schema"}'
    )


def _json_schema(spec: Any) -> str:
    schema = _member(spec, "schema")
    if not isinstance(schema, dict):
        raise FieldError("response_format", "'response_format.json_schema.schema' must be an object")
    return json.dumps(schema)


def chat_extras(
    body: dict[str, Any], fields: dict[str, Any], tool_parser: str | None, reasoning_parser: str | None
) -> ChatExtras:
    """Check the tool and template fields; a forced tool call (tool_choice "required" or a named
    function) becomes the request's grammar, and any grammar waits for the end of a think block (both
    added to `fields`, the request's SamplingParams fields before they are built)."""
    extras = ChatExtras(tools=_tools(body.get("tools")), reasoning_parser=reasoning_parser)
    extras.template_kwargs = _template_kwargs(body.get("chat_template_kwargs"))
    choice = _tool_choice(body.get("tool_choice"), extras.tools)
    parallel = _parallel_tool_calls(body)
    if extras.tools and choice != "none":
        extras.tool_parser = _tool_calling_on(tool_parser)
        if choice != "auto":
            fields["ebnf"] = _forced_call_grammar(extras.tools, choice, extras.tool_parser, parallel, fields)
    if _has_grammar(fields):
        _grammar_after_reasoning(fields, reasoning_parser, extras.template_kwargs)
    return extras


def _parallel_tool_calls(body: dict[str, Any]) -> bool:
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise FieldError("parallel_tool_calls", "'parallel_tool_calls' must be a boolean")
    return parallel


def _tool_calling_on(tool_parser: str | None) -> str:
    if tool_parser is None:
        raise FieldError("tools", "tool calling is off on this server (start it with --tool-call-parser)")
    return tool_parser


def _grammar_after_reasoning(
    fields: dict[str, Any], reasoning_parser: str | None, template_kwargs: dict[str, Any]
) -> None:
    """A reasoning model's grammar applies only after its think block (if the template opens one)."""
    if reasoning_parser is not None:
        fields["grammar_after"] = REASONING_PARSERS[reasoning_parser].grammar_after(template_kwargs)


def _has_grammar(fields: dict[str, Any]) -> bool:
    return any(fields.get(name) for name in GRAMMAR_FIELDS)


def _forced_call_grammar(
    tools: list[dict[str, Any]], choice: str, tool_parser: str, parallel: bool, fields: dict[str, Any]
) -> str:
    """The grammar of the calls tool_choice forces: of any tool ("required") or of the one it names."""
    if _has_grammar(fields):
        raise FieldError("tool_choice", f"tool_choice {choice!r} cannot be combined with a response_format")
    forced = [(i, t) for i, t in enumerate(tools) if choice == "required" or _name(t) == choice]
    for i, tool in forced:  # the call grammar is built from these: a bad one is the client's error
        _check_parameters(tool, f"tools[{i}].function.parameters")
    grammar: str = TOOL_PARSERS[tool_parser].call_grammar([_call_schema(t) for _, t in forced], parallel)
    return grammar


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise FieldError("tools", "'tools' must be an array")
    for i, tool in enumerate(value):
        _check_tool(tool, f"tools[{i}]")
    return value


def _check_tool(tool: Any, where: str) -> None:
    function = _member(tool, "function")
    if not isinstance(function, dict) or tool.get("type", "function") != "function":
        raise FieldError(where, f'\'{where}\' must be {{"type": "function", "function": {{...}}}}')
    _non_empty_string(function.get("name"), f"{where}.function.name")
    if not isinstance(function.get("parameters", {"type": "object"}), dict):
        raise FieldError(f"{where}.function.parameters", f"'{where}.function.parameters' must be an object")


def _name(tool: dict[str, Any]) -> str:
    name: str = tool["function"]["name"]
    return name


def _check_parameters(tool: dict[str, Any], where: str) -> None:
    parameters = tool["function"].get("parameters") or {"type": "object"}
    try:
        check_grammar_source("json_schema", json.dumps(parameters))
    except ValueError as exc:
        raise FieldError(where, f"'{where}' is not a usable JSON schema: {exc}") from None


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    parameters = tool["function"].get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": _name(tool)}, "arguments": parameters},
        "required": ["name", "arguments"],
    }


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str:
    """ "none", "auto", "required", or the name of the function that must be called."""
    if value is None:
        return "auto" if tools else "none"
    if value == "required" and not tools:
        raise FieldError("tool_choice", "tool_choice 'required' needs 'tools'")
    if value in ("none", "auto", "required"):
        return str(value)
    return _named_tool(value, tools or [])


def _named_tool(value: Any, tools: list[dict[str, Any]]) -> str:
    """The function a {"type": "function", "function": {"name": ...}} tool_choice names."""
    name = _member(_member(value, "function"), "name")
    if not isinstance(name, str):
        raise FieldError(
            "tool_choice",
            '\'tool_choice\' must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
        )
    if name not in [_name(t) for t in tools]:
        raise FieldError("tool_choice", f"tool_choice names {name!r}, which is not in 'tools'")
    return name


def _template_kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FieldError("chat_template_kwargs", "'chat_template_kwargs' must be an object")
    reserved = sorted(set(value) & set(RESERVED_TEMPLATE_KEYS))
    if reserved:
        raise FieldError("chat_template_kwargs", f"'chat_template_kwargs' may not set {', '.join(reserved)}")
    return value


def history_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls, with each call's JSON arguments text turned into the object
    that chat templates expect."""
    if not isinstance(value, list):
        raise FieldError(where, f"'{where}' must be an array")
    return [_history_call(call, f"{where}[{i}]") for i, call in enumerate(value)]


def _history_call(call: Any, where: str) -> dict[str, Any]:
    function = _member(call, "function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise FieldError(where, f"'{where}' must have a function with a name")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        arguments = _json_arguments(arguments, f"{where}.function.arguments")
    return {**call, "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _json_arguments(text: str, where: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        raise FieldError(where, f"'{where}' is not JSON") from None

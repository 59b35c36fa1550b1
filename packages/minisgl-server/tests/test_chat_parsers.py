"""The chat output parsers: Hermes tool calls and think blocks, whole and streamed a character at a time
(the pieces must join up to what the whole text gives)."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from minisgl.server.api.parsers import ChatOutputParser, ParsedDelta
from minisgl.server.api.parsers.hermes import HermesToolParser
from minisgl.server.api.protocol import parse_chat
from minisgl.server.api.responses import ResponseBuilder
from minisgl.server.messages import RequestOutput

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>'


def _run(text: str, reasoning: str | None, tools: str | None, piece: int) -> tuple[str, str, list[dict]]:
    parser = ChatOutputParser(reasoning, tools)
    total = ParsedDelta()
    for i in range(0, len(text), piece):
        total.extend(parser.feed(text[i : i + piece]))
    total.extend(parser.finish())
    calls: dict[int, dict] = {}
    for delta in total.tool_calls:
        call = calls.setdefault(delta.index, {"id": delta.id, "name": delta.name, "arguments": ""})
        assert delta.id is None or call["id"] == delta.id
        call["arguments"] += delta.arguments
    return (
        total.content,
        total.reasoning,
        [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls.values()],
    )


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_hermes_calls_and_text(piece: int) -> None:
    text = f"Let me check.\n{CALL}\n{CALL.replace('Paris', 'Rome')}"
    content, reasoning, calls = _run(text, None, "hermes", piece)
    assert content.strip() == "Let me check." and reasoning == ""
    assert calls == [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}},
        {"name": "get_weather", "arguments": {"city": "Rome", "days": [1, 2]}},
    ]


def test_hermes_streams_arguments_incrementally() -> None:
    parser = HermesToolParser()
    deltas = [parser.feed(c) for c in CALL]
    pieces = [d for delta in deltas for d in delta.tool_calls]
    assert pieces[0].name == "get_weather" and pieces[0].id is not None
    # The arguments arrive in many pieces before the call closes.
    assert sum(1 for p in pieces if p.arguments) > 10


@pytest.mark.parametrize(
    "text",
    ["plain text < with a tag-like <tool_ but no call", "<tool_call>not json</tool_call> tail", "a < b"],
)
def test_hermes_leaves_text_that_is_no_call(text: str) -> None:
    for piece in (1, 1000):
        content, _, calls = _run(text, None, "hermes", piece)
        assert content == text and calls == []


def test_unclosed_call_with_complete_json_counts() -> None:
    _, _, calls = _run(CALL.removesuffix("\n</tool_call>"), None, "hermes", 2)
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}]


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_qwen3_think_block_and_a_call(piece: int) -> None:
    text = f"<think>\nThe user wants weather.\n</think>\n\nSure.{CALL}"
    content, reasoning, calls = _run(text, "qwen3", "hermes", piece)
    assert reasoning.strip() == "The user wants weather."
    assert content == "Sure." and len(calls) == 1


@pytest.mark.parametrize("piece", [1, 1000])
def test_qwen3_without_think_is_content_and_deepseek_starts_thinking(piece: int) -> None:
    assert _run("Hello <think> there", "qwen3", None, piece)[:2] == ("Hello <think> there", "")
    assert _run("pondering</think>answer", "deepseek-r1", None, piece)[:2] == ("answer", "pondering")
    assert _run("still pondering", "deepseek-r1", None, piece)[:2] == ("", "still pondering")


def test_forced_call_grammar_accepts_only_hermes_calls() -> None:
    tool = {"type": "object", "properties": {"name": {"const": "f"}, "arguments": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
        "required": ["name", "arguments"]}  # fmt: skip
    for parallel in (False, True):
        grammar = xgr.Grammar.from_ebnf(HermesToolParser.call_grammar([tool], parallel))
        matcher = xgr.GrammarMatcher(
            xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_grammar(grammar),
            terminate_without_stop_token=True,
        )
        one = '<tool_call>\n{"name": "f", "arguments": {"x": 3}}\n</tool_call>'
        assert (matcher.accept_string(one) and matcher.is_terminated() != parallel) or parallel
        matcher.reset()
        assert not matcher.accept_string('<tool_call>\n{"name": "g"')
        matcher.reset()
        assert matcher.accept_string(one + "\n" + one) == parallel


def test_an_aborted_stream_sends_each_parsed_piece_once() -> None:
    """The abort chunk of a stream (engine gone, server stopping) flushes what the parser holds back and
    repeats nothing that was already sent."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    builder = ResponseBuilder(parse_chat(body, "m", reasoning_parser="qwen3"), [7])
    sent = []
    for text in ("<think>abc", "</thi"):  # the second piece is held back: it may start </think>
        output = RequestOutput(7, text, 1)
        sent += builder.output_chunks(output, builder.add(output, 0.0))
    sent += builder.abort_chunks()
    deltas = [json.loads(chunk[len("data: ") :])["choices"][0] for chunk in sent]
    reasoning = "".join(d["delta"].get("reasoning_content", "") for d in deltas)
    assert reasoning == "abc</thi"
    assert deltas[-1]["finish_reason"] == "abort"

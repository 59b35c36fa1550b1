"""The tokenizer worker renders chats with the model's own template: `tools` and chat_template_kwargs
reach it (a Qwen-style template that lists the tools and honours enable_thinking), and tool-call history
messages render as the template writes them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from minisgl.core.sampling_params import SamplingParams
from minisgl.server import messages as msg
from minisgl.server.tokenizer_worker import TokenizerWorker

QWEN_STYLE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}{{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}{% endif %}"
)


def _tokenizer() -> Any:
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.chat_template = QWEN_STYLE
    return tokenizer


def _render(request: msg.GenerateRequest) -> str:
    tokenizer = _tokenizer()
    worker = SimpleNamespace(tokenizer=tokenizer)
    ids = TokenizerWorker._encode(  # type: ignore[arg-type]
        worker, request.prompt, request.messages, True, request.tools, request.chat_template_kwargs
    )
    return str(tokenizer.decode(ids)).replace(" ", "")


def test_tools_and_template_kwargs_reach_the_template() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c"},
    ]  # fmt: skip
    request = msg.GenerateRequest(
        uid=1, params=SamplingParams(), messages=history, tools=[tool],
        chat_template_kwargs={"enable_thinking": False},
    )  # fmt: skip
    text = _render(request)
    assert text.startswith("<tools>get_weather;</tools>")
    assert '<tool_call>f{"x":1}</tool_call>' in text and "<tool>42" in text
    assert text.endswith("<assistant><think></think>")
    plain = msg.GenerateRequest(uid=2, params=SamplingParams(), messages=history[:1])
    assert _render(plain) == "<user>hi<assistant>"  # (newlines are not in this test vocabulary)

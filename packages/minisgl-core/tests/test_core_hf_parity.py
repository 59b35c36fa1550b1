"""Greedy outputs and teacher-forced logprobs of the engine against transformers, on CPU in float32.

Every architecture runs three engine layouts: page size 1 with one prefill chunk, page size 16, and a
prefill budget of 8 tokens that chunks every prompt longer than 8.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tiny_models
from tiny_models import GEN_LEN

LOGPROB_ATOL = 1e-4

LAYOUTS = {
    "page1": dict(page_size=1, max_prefill_tokens=8192),
    "page16": dict(page_size=16, max_prefill_tokens=8192),
    "chunk8": dict(page_size=1, max_prefill_tokens=8),
}

CASES = [(model, layout) for model in tiny_models.SPECS for layout in LAYOUTS]


# Module scoped and parametrized: pytest groups every test of one (model, layout) together, so each
# engine is built once.
@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{lay}" for m, lay in CASES])
def case(request: pytest.FixtureRequest, engines: Any) -> tuple[str, Any]:
    model, layout = request.param
    return model, engines.get(model, **LAYOUTS[layout])


def _first_mismatch(got: list[int], want: list[int]) -> str:
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return f"first mismatch at generated index {i}: engine {g}, transformers {w}"
    return f"lengths differ: engine {len(got)}, transformers {len(want)}"


def test_greedy_matches_transformers(
    case: tuple[str, Any], reference: Callable[[str], Any], standard_prompts: list[list[int]]
) -> None:
    from minisgl.core import SamplingParams

    name, llm = case
    _, refs = reference(name)
    params = SamplingParams(temperature=0.0, max_tokens=GEN_LEN, ignore_eos=True)
    results = llm.generate(standard_prompts, params)  # all prompts in one batch
    assert len(results) == len(standard_prompts)
    for i, (result, ref) in enumerate(zip(results, refs, strict=True)):
        assert result.num_prompt_tokens == len(ref.prompt)
        assert result.finish_reason == "length"
        assert result.logprobs is None  # not asked for
        assert result.token_ids == ref.output, (
            f"{name} prompt {i} (len {len(ref.prompt)}): {_first_mismatch(result.token_ids, ref.output)}"
        )


def test_decode_logprobs_match_transformers(
    case: tuple[str, Any], reference: Callable[[str], Any], standard_prompts: list[list[int]]
) -> None:
    from minisgl.core import SamplingParams

    name, llm = case
    _, refs = reference(name)
    params = SamplingParams(temperature=0.0, max_tokens=GEN_LEN, ignore_eos=True, logprobs=0)
    results = llm.generate(standard_prompts, params)
    for i, (result, ref) in enumerate(zip(results, refs, strict=True)):
        assert result.token_ids == ref.output, (
            f"{name} prompt {i}: {_first_mismatch(result.token_ids, ref.output)}"
        )
        assert result.logprobs is not None and len(result.logprobs) == len(ref.output)
        for j, (got, want) in enumerate(zip(result.logprobs, ref.output_logprobs, strict=True)):
            assert got == pytest.approx(want, abs=LOGPROB_ATOL), f"{name} prompt {i} generated token {j}"


def test_prompt_logprobs_match_transformers(case: tuple[str, Any], reference: Callable[[str], Any]) -> None:
    """Prefill path: score prompt + greedy continuation as a prompt (chunked in the chunk8 layout)."""
    from minisgl.core import SamplingParams

    name, llm = case
    _, refs = reference(name)
    sequences = [ref.prompt + ref.output for ref in refs]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=True)
    results = llm.generate(sequences, params)
    for i, (result, ref) in enumerate(zip(results, refs, strict=True)):
        got = result.prompt_logprobs
        assert got is not None and len(got) == len(sequences[i]), f"{name} sequence {i}"
        assert got[0] is None
        for p in range(1, len(got)):
            assert got[p] == pytest.approx(ref.prompt_logprobs[p], abs=LOGPROB_ATOL), (
                f"{name} sequence {i} position {p}: engine {got[p]}, transformers {ref.prompt_logprobs[p]}"
            )


def test_saved_configs_exercise_the_features(tiny_model_dir: Callable[[str], Path]) -> None:
    """Guards the test models themselves: each carries the feature it is meant to test."""
    llama3 = tiny_models.saved_config(tiny_model_dir("llama3-rope"))
    rope = llama3.get("rope_scaling") or llama3.get("rope_parameters") or {}
    # transformers 4.x writes `rope_scaling`, 5.x writes `rope_parameters`; either way it is llama3
    assert rope.get("rope_type", rope.get("type")) == "llama3"
    assert llama3["tie_word_embeddings"] is True
    qwen3 = tiny_models.saved_config(tiny_model_dir("qwen3"))
    assert qwen3["head_dim"] != qwen3["hidden_size"] // qwen3["num_attention_heads"]
    assert (tiny_model_dir("qwen2") / "model.safetensors.index.json").exists()
    assert len(list(tiny_model_dir("qwen2").glob("*.safetensors"))) > 1

"""Sampling: seeds, top-k / top-p / temperature against the transformers distribution, finish reasons."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
from tiny_models import GEN_LEN

MODEL = "llama"
LAYOUT = dict(page_size=1, max_prefill_tokens=8192)


@pytest.fixture()
def llm(engines: Any) -> Any:
    return engines.get(MODEL, **LAYOUT)


def _params(**kwargs: Any) -> Any:
    from minisgl.core import SamplingParams

    return SamplingParams(**kwargs)


def test_same_seed_same_tokens_across_calls_and_batches(llm: Any, standard_prompts: list[list[int]]) -> None:
    prompt = standard_prompts[3]
    seeded = _params(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].token_ids
    assert len(alone) == 24
    assert llm.generate([prompt], seeded)[0].token_ids == alone

    # The same request among others (greedy, unseeded, other seeds, other lengths), at another index,
    # and twice in one batch.
    prompts = [*standard_prompts[:3], prompt, *standard_prompts[4:], prompt]
    params = [
        _params(temperature=0.0, max_tokens=7, ignore_eos=True),
        _params(temperature=0.9, max_tokens=30, ignore_eos=True),
        _params(temperature=1.3, top_k=20, seed=7, max_tokens=3, ignore_eos=True),
        seeded,
        _params(temperature=0.5, top_p=0.8, seed=99, max_tokens=40, ignore_eos=True),
        _params(temperature=1.0, max_tokens=1, ignore_eos=True),
        _params(temperature=0.0, max_tokens=12, ignore_eos=True),
        _params(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True),
        seeded,
    ]
    results = llm.generate(prompts, params)
    assert results[3].token_ids == alone
    assert results[-1].token_ids == alone
    # A different seed gives a different sample (32 tokens from a spread distribution).
    other = llm.generate([prompt], _params(temperature=1.0, seed=4321, max_tokens=24, ignore_eos=True))
    assert other[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(
    llm: Any, reference: Callable[[str], Any], standard_prompts: list[list[int]]
) -> None:
    _, refs = reference(MODEL)
    want = [ref.output for ref in refs]
    top_k = llm.generate(
        standard_prompts, _params(temperature=1.0, top_k=1, seed=3, max_tokens=GEN_LEN, ignore_eos=True)
    )
    assert [r.token_ids for r in top_k] == want
    top_p = llm.generate(
        standard_prompts, _params(temperature=1.0, top_p=1e-6, seed=3, max_tokens=GEN_LEN, ignore_eos=True)
    )
    assert [r.token_ids for r in top_p] == want


def _sample_first_tokens(llm: Any, prompt: list[int], n: int, **kwargs: Any) -> Counter[int]:
    params = [_params(max_tokens=1, ignore_eos=True, seed=1000 + i, **kwargs) for i in range(n)]
    results = llm.generate([prompt] * n, params)
    assert all(len(r.token_ids) == 1 for r in results)
    return Counter(r.token_ids[0] for r in results)


def _assert_counts_follow(counts: Counter[int], probs: torch.Tensor, n: int, what: str) -> None:
    """Each of the 3 likeliest tokens, and the rest together, within 5 sigma of its expected count."""
    order = torch.argsort(probs, descending=True).tolist()
    bins = [[t] for t in order[:3]] + [order[3:]]
    for tokens in bins:
        p = float(probs[tokens].sum())
        observed = sum(counts[t] for t in tokens)
        sigma = math.sqrt(n * p * (1 - p)) + 1e-9
        assert abs(observed - n * p) <= 5 * sigma + 1, (
            f"{what}: tokens {tokens[:5]}{'...' if len(tokens) > 5 else ''} drawn {observed} times of {n}, "
            f"expected {n * p:.1f} (p={p:.3f})"
        )


def test_sampling_follows_transformers_distribution(
    llm: Any, reference: Callable[[str], Any], standard_prompts: list[list[int]]
) -> None:
    model, _ = reference(MODEL)
    prompt = standard_prompts[2]
    logits = model(torch.tensor([prompt])).logits[0, -1].detach().float()
    n = 300

    temperature = 0.7
    probs = torch.softmax(logits / temperature, dim=-1)
    counts = _sample_first_tokens(llm, prompt, n, temperature=temperature)
    assert len(counts) > 3, "temperature sampling drew almost one token: is it sampling at all?"
    _assert_counts_follow(counts, probs, n, f"temperature {temperature}")

    # top-k = 3: only the three likeliest tokens, in their renormalized proportions.
    top3 = torch.topk(logits, 4)
    assert float(top3.values[2] - top3.values[3]) > 1e-3, "reference has a tie at the top-k boundary"
    counts = _sample_first_tokens(llm, prompt, n, temperature=1.0, top_k=3)
    assert set(counts) <= set(top3.indices[:3].tolist())
    masked = torch.full_like(logits, float("-inf"))
    masked[top3.indices[:3]] = logits[top3.indices[:3]]
    _assert_counts_follow(counts, torch.softmax(masked, dim=-1), n, "top_k=3")

    # top-p = 0.5: only tokens of the nucleus (those whose preceding cumulative probability < p).
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, sorted_ids = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, 0) - sorted_probs
    nucleus = set(sorted_ids[before < 0.5 + 1e-4].tolist())
    counts = _sample_first_tokens(llm, prompt, n, temperature=1.0, top_p=0.5)
    assert set(counts) <= nucleus, f"tokens outside the top-p nucleus: {set(counts) - nucleus}"


def test_finish_reason_length(
    llm: Any, reference: Callable[[str], Any], standard_prompts: list[list[int]]
) -> None:
    _, refs = reference(MODEL)
    for max_tokens in (1, 5):
        result = llm.generate(
            [standard_prompts[4]], _params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        )[0]
        assert result.finish_reason == "length"
        assert result.token_ids == refs[4].output[:max_tokens]


def _first_new_token(output: list[int], start: int) -> int:
    """The first index >= start whose token has not appeared earlier in the output."""
    return next(j for j in range(start, len(output)) if output[j] not in output[:j])


def test_finish_reason_stop_token(
    llm: Any, reference: Callable[[str], Any], standard_prompts: list[list[int]]
) -> None:
    _, refs = reference(MODEL)
    ref = refs[5]
    j = _first_new_token(ref.output, 4)
    stop = _params(temperature=0.0, max_tokens=GEN_LEN, stop_token_ids=[ref.output[j]])
    plain = _params(temperature=0.0, max_tokens=GEN_LEN, ignore_eos=True)
    # The stopping request shares the batch with one that does not stop.
    results = llm.generate([ref.prompt, standard_prompts[6]], [stop, plain])
    got = results[0]
    assert got.finish_reason == "stop"
    assert got.token_ids[:j] == ref.output[:j]
    assert j <= len(got.token_ids) <= j + 1
    assert results[1].finish_reason == "length"
    assert results[1].token_ids == refs[6].output


def test_finish_reason_eos(
    tiny_model_dir: Callable[[str], Path], reference: Callable[[str], Any], tmp_path: Path
) -> None:
    """A copy of the model whose EOS id is a token greedy decoding emits: generation stops there."""
    from minisgl.core import LLM

    _, refs = reference(MODEL)
    ref = refs[1]
    j = _first_new_token(ref.output, 3)
    eos = ref.output[j]
    directory = tmp_path / "eos-model"
    shutil.copytree(tiny_model_dir(MODEL), directory)
    for file in ("config.json", "generation_config.json"):
        path = directory / file
        if path.exists():
            config = json.loads(path.read_text())
            config["eos_token_id"] = eos
            path.write_text(json.dumps(config))
    llm = LLM(str(directory), device="cpu", dtype="float32", seed=0)
    stopped, ignored = llm.generate(
        [ref.prompt, ref.prompt],
        [
            _params(temperature=0.0, max_tokens=GEN_LEN),
            _params(temperature=0.0, max_tokens=GEN_LEN, ignore_eos=True),
        ],
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids[:j] == ref.output[:j] and j <= len(stopped.token_ids) <= j + 1
    assert ignored.finish_reason == "length" and ignored.token_ids == ref.output
    del llm


def test_tiny_models_reference_is_not_degenerate(reference: Callable[[str], Any]) -> None:
    """Self-check of the reference outputs (not of the engine): outputs are not one repeated token."""
    for name in tiny_models.SPECS:
        _, refs = reference(name)
        assert all(len(set(ref.output)) > 3 for ref in refs), name


def test_sampling_defaults_come_from_generation_config(tmp_path: Path) -> None:
    from minisgl.core.loading.loader import load_sampling_defaults
    from minisgl.core.loading.model_source import ModelSource

    source = ModelSource("m", tmp_path)
    assert load_sampling_defaults(source) == {}
    config = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "eos_token_id": 2}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert load_sampling_defaults(source) == {"temperature": 0.6, "top_p": 0.95, "top_k": -1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -3}))
    assert load_sampling_defaults(source) == {}  # not usable: ignored with a warning

"""Tensor parallelism on the CPU: tp=2 and tp=3 ranks in separate processes (gloo), checked against the
transformers reference and against tp=1.

Each engine here starts tp-1 extra processes (about 5-10 s on a small machine), so one engine serves
several checks. MINISGL_DEBUG_CHECKS=1 is on for every TP engine: after each step all ranks compare the
batch they ran and the tokens they sampled, and a rank that drifted fails the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
from tiny_models import GEN_LEN

from minisgl.core import LLM, SamplingParams
from minisgl.core.config import ModelConfig
from minisgl.core.runtime.results import check_ranks_agree

LOGPROB_TOLERANCE = 1e-4
GREEDY = SamplingParams(max_tokens=GEN_LEN, temperature=0.0, logprobs=0, ignore_eos=True)


@pytest.fixture
def debug_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Spawned ranks inherit the environment, so they run the checks too.
    monkeypatch.setenv("MINISGL_DEBUG_CHECKS", "1")


@pytest.fixture
def tp_engine(tiny_model_dir: Callable[[str], Path], debug_checks: None) -> Iterator[Callable[..., LLM]]:
    """Builds TP engines on tiny models and shuts them all down at the end of the test."""
    started: list[LLM] = []

    def build(name: str, tp_size: int, **options: Any) -> LLM:
        llm = LLM(
            str(tiny_model_dir(name)),
            device="cpu",
            dtype="float32",
            seed=0,
            tp_size=tp_size,
            **options,
        )
        started.append(llm)
        return llm

    yield build
    for llm in started:
        llm.shutdown()


def assert_matches_reference(results: list[Any], references: list[tiny_models.GreedyReference]) -> None:
    for result, ref in zip(results, references, strict=True):
        assert result.token_ids == ref.output
        worst = max(abs(a - b) for a, b in zip(result.logprobs, ref.output_logprobs, strict=True))
        assert worst < LOGPROB_TOLERANCE, worst


@pytest.mark.parametrize(
    "name", ["llama", "llama3-rope", "qwen2", "qwen3", "mistral", "llama-mqa", "qwen3-moe", "qwen3-moe-step2"]
)
def test_tp2_greedy_matches_transformers(
    name: str, tp_engine: Callable[..., LLM], reference: Callable[[str], Any]
) -> None:
    _, refs = reference(name)
    llm = tp_engine(name, 2, page_size=16, max_prefill_tokens=32)  # chunked prefill as well
    results = llm.generate([r.prompt for r in refs], GREEDY, use_tqdm=False)
    assert_matches_reference(results, refs)


def test_tp3_with_one_kv_head_and_an_odd_vocab(
    tp_engine: Callable[..., LLM], reference: Callable[[str], Any], engines: Any
) -> None:
    """6 heads and 1 KV head over 3 ranks (the KV head replicated), vocab 512 (padded to 513), biases
    on row-parallel layers; greedy output token-identical to tp=1 and to transformers."""
    _, refs = reference("llama-mqa")
    prompts = [r.prompt for r in refs]
    single = engines.get("llama-mqa").generate(prompts, GREEDY, use_tqdm=False)
    llm = tp_engine("llama-mqa", 3)
    results = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [r.token_ids for r in results] == [r.token_ids for r in single]
    assert_matches_reference(results, refs)

    # The same engine keeps serving: a second turn reuses the radix cache on every rank alike.
    again = llm.generate(prompts[:2], GREEDY, use_tqdm=False)
    assert [r.token_ids for r in again] == [r.output for r in refs[:2]]
    assert all(r.num_cached_tokens > 0 for r in again)


def test_seeded_sampling_is_identical_on_every_rank_and_across_runs(
    tp_engine: Callable[..., LLM], standard_prompts: list[list[int]]
) -> None:
    """Temperature > 0, with and without per-request seeds: the debug checks compare every rank's tokens
    at every step; two engines started alike give the same tokens."""
    params = [
        SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7),
        SamplingParams(max_tokens=24, temperature=0.8),
        SamplingParams(max_tokens=24, temperature=1.2, top_k=20, seed=11),
    ]
    prompts = standard_prompts[:3]
    runs = []
    for _ in range(2):
        llm = tp_engine("qwen3", 2)
        runs.append([r.token_ids for r in llm.generate(prompts, params, use_tqdm=False)])
        llm.shutdown()
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0]}) == 3


def test_every_sampling_feature_matches_tp1(
    tp_engine: Callable[..., LLM], engines: Any, standard_prompts: list[list[int]]
) -> None:
    """Penalties (which wait for the tokens in flight), n samples sharing a prompt, stop tokens, logprobs
    with alternatives and prompt logprobs: at tp=2 the same tokens as tp=1, the same logprobs within
    1e-4, and (debug checks) the same on both ranks at every step."""
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(max_tokens=12, temperature=0.9, seed=3, n=3),
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, prompt_logprobs=True),
        SamplingParams(max_tokens=12, temperature=0.7, top_k=10, min_p=0.05, seed=9, frequency_penalty=0.4),
    ]
    prompts = standard_prompts[:4]
    single = engines.get("qwen2").generate(prompts, params, use_tqdm=False)
    sharded = tp_engine("qwen2", 2).generate(prompts, params, use_tqdm=False)
    for one, two in zip(single, sharded, strict=True):
        assert [s.token_ids for s in one.samples or [one]] == [s.token_ids for s in two.samples or [two]]
    logprobs_one, logprobs_two = single[2], sharded[2]
    assert logprobs_one.logprobs is not None and logprobs_two.logprobs is not None
    assert max(abs(a - b) for a, b in zip(logprobs_one.logprobs, logprobs_two.logprobs, strict=True)) < 1e-4
    for tops_one, tops_two in zip(
        logprobs_one.top_logprobs or [], logprobs_two.top_logprobs or [], strict=True
    ):
        assert list(tops_one) == list(tops_two)
    prompt_one, prompt_two = logprobs_one.prompt_logprobs or [], logprobs_two.prompt_logprobs or []
    assert len(prompt_one) == len(prompt_two) == len(prompts[2])
    assert max(abs(a - b) for a, b in zip(prompt_one[1:], prompt_two[1:], strict=True)) < 1e-4


def test_abort_reaches_every_rank(tp_engine: Callable[..., LLM], reference: Callable[[str], Any]) -> None:
    """An abort on rank 0 mid-decode frees the request on every rank; the others finish unchanged."""
    _, refs = reference("qwen2")
    llm = tp_engine("qwen2", 2)
    runtime = llm.runtime
    requests = [runtime.add_request(r.prompt, GREEDY) for r in refs[:3]]
    for _ in range(5):
        runtime.step()
    runtime.abort(requests[1].uid)
    while runtime.has_work():
        runtime.step()
    assert requests[1].finish_reason == "abort"
    assert requests[0].output_ids == refs[0].output
    assert requests[2].output_ids == refs[2].output
    runtime.check_integrity()
    assert runtime.stats()["pages_used"] == runtime.stats()["pages_cached"]


def test_dummy_weights_do_not_depend_on_the_tp_size(
    tp_engine: Callable[..., LLM], engines: Any, standard_prompts: list[list[int]]
) -> None:
    """Random weights are drawn per checkpoint tensor and then sliced, so tp=2 runs the model of tp=1."""
    params = SamplingParams(max_tokens=8, temperature=0.0)
    single = engines.get("llama-mqa", load_format="dummy").generate(standard_prompts, params, use_tqdm=False)
    sharded = tp_engine("llama-mqa", 2, load_format="dummy").generate(
        standard_prompts, params, use_tqdm=False
    )
    assert [r.token_ids for r in sharded] == [r.token_ids for r in single]


def test_a_model_that_does_not_split_is_refused(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(ValueError, match="attention heads"):
        LLM(str(tiny_model_dir("llama")), device="cpu", dtype="float32", tp_size=3)


def test_kv_heads_must_divide_or_be_divided_by_tp() -> None:
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        hidden_size=96,
        intermediate_size=192,
        num_layers=1,
        num_heads=6,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=100,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        qkv_bias=False,
        qk_norm=False,
        eos_token_ids=(2,),
        checkpoint_dtype=None,
    )
    config.check_tp(2)  # 2 KV heads over 2 ranks
    config.check_tp(6)  # each KV head replicated on 3 ranks
    with pytest.raises(ValueError, match="KV heads"):
        config.check_tp(3)
    with pytest.raises(ValueError, match="attention heads"):
        config.check_tp(4)


def test_tp_size_needs_a_meeting_address() -> None:
    from minisgl.core.config import EngineConfig
    from minisgl.core.runtime import Runtime

    with pytest.raises(ValueError, match="dist_init_address"):
        Runtime("smollm2-135m", EngineConfig(device="cpu", tp_size=2))
    with pytest.raises(ValueError, match="tp_size must be"):
        LLM("smollm2-135m", device="cpu", tp_size=0)
    with pytest.raises(ValueError, match="names one GPU"):
        LLM("smollm2-135m", device="cuda:1", tp_size=2)


def test_ranks_started_with_other_settings_are_refused(tiny_model_dir: Callable[[str], Path]) -> None:
    """A rank whose engine options differ would schedule other batches: start-up fails instead."""
    import dataclasses

    from minisgl.core import llm as llm_module
    from minisgl.core.config import EngineConfig
    from minisgl.core.runtime import Runtime

    model = str(tiny_model_dir("llama"))
    address = f"127.0.0.1:{llm_module._free_port()}"
    config = EngineConfig(device="cpu", dtype="float32", tp_size=2)
    other = dataclasses.replace(config, max_running_requests=8)
    follower, _ = llm_module._start_follower(model, other, 1, address)
    try:
        with pytest.raises(ValueError, match="other settings"):
            Runtime(model, config, tp_rank=0, dist_init_address=address)
    finally:
        follower.join(60)
    assert follower.exitcode != 0
    # This process left the group: a new TP engine starts here again.
    with LLM(model, device="cpu", dtype="float32", tp_size=2) as llm:
        assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids


def test_ranks_that_drift_apart_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The debug check itself: a rank reporting other tokens fails the step."""
    import minisgl.core.parallel.distributed as distributed_module
    from minisgl.core.scheduler.batch import Batch

    batch = Batch([], is_decode=True)
    monkeypatch.setattr(distributed_module, "gather_objects", lambda mine: [mine, ([], [5])])
    with pytest.raises(RuntimeError, match="TP ranks disagree"):
        check_ranks_agree(batch, [4])
    monkeypatch.setattr(distributed_module, "gather_objects", lambda mine: [mine, mine])
    check_ranks_agree(batch, [4])


def test_a_script_without_a_main_guard_fails_fast_with_a_hint(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """Spawned ranks re-import the main module; without `if __name__ == "__main__":` they die at once.
    Rank 0 notices within seconds instead of waiting for them in the rendezvous for ten minutes."""
    import subprocess
    import sys
    import time

    script = tmp_path / "no_guard.py"
    script.write_text(
        "from minisgl.core import LLM\n"
        f"LLM({str(tiny_model_dir('llama'))!r}, device='cpu', dtype='float32', tp_size=2)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - started < 120  # imports on a busy machine; not the 10-minute rendezvous

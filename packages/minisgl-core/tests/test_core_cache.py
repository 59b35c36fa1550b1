"""Issue 3: the prefix cache, KV page accounting, the scheduler (retraction, abort) and the sampling
options built on them (stop strings, n samples, penalties, logprobs).

Every engine here runs with MINISGL_DEBUG_CHECKS=1, so KV page ownership is checked after every step and
every abort. Greedy outputs are compared with transformers (full re-forward, no KV cache) on the tiny
models; the chat-level tests use the embedded SmolLM2-135M.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
from tiny_models import GEN_LEN

MODEL = "llama"
SHARED_GEN_LEN = 24


def _sp(**kwargs: Any) -> Any:
    from minisgl.core import SamplingParams

    return SamplingParams(**kwargs)


def _greedy(max_tokens: int = GEN_LEN, **kwargs: Any) -> Any:
    return _sp(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def _assert_all_pages_home(runtime: Any) -> None:
    """Nothing runs or waits: every page is free or held by the prefix cache, and ownership is consistent."""
    stats = runtime.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["pages_free"] + stats["pages_cached"] == stats["pages_total"], stats
    runtime.check_integrity()


@pytest.fixture()
def make_llm(
    engines: Any, tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Any]]:
    """Builds tiny-model engines with MINISGL_DEBUG_CHECKS=1 (the shared engine cache is closed first, so
    that at most one tiny engine is alive at a time)."""
    from minisgl.core import LLM

    engines.close()
    monkeypatch.setenv("MINISGL_DEBUG_CHECKS", "1")
    built: list[Any] = []

    def make(**options: Any) -> Any:
        built.clear()  # drop the previous engine of this test before building the next
        llm = LLM(str(tiny_model_dir(MODEL)), **{"device": "cpu", "dtype": "float32", "seed": 0, **options})
        assert llm.runtime.debug_checks
        built.append(llm)
        return llm

    yield make
    built.clear()


# ---- 1. radix == naive == transformers, at every page size and under retraction ----------------------


@pytest.fixture(scope="module")
def shared_workload(reference: Callable[[str], Any]) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """(warm-up prompt, prompts, transformers greedy outputs of the prompts).

    The prompts are the standard ones plus a group that shares prefixes of 64 to 100 tokens with the
    warm-up prompt (so that even 64-token pages hit), and a new prompt given twice."""
    model, refs = reference(MODEL)
    base = tiny_models.make_prompts(2024, [100])[0]
    suffixes = tiny_models.make_prompts(2025, [3, 9, 6, 11])
    twin = tiny_models.make_prompts(2026, [70])[0]
    group = [
        base[:70] + suffixes[0],
        base[:90] + suffixes[1],
        base[:100] + suffixes[2],
        base[:64],
        base[:77] + suffixes[3],
        twin,
        twin,  # the same (uncached) prompt twice in one call
    ]
    prompts = [ref.prompt for ref in refs] + group
    want = [ref.output[:SHARED_GEN_LEN] for ref in refs]
    for prompt in group:
        ref = tiny_models.greedy_reference(model, prompt, SHARED_GEN_LEN)
        assert ref.min_gap > 5e-4, f"reference top-1 gap {ref.min_gap:.2e} too small; pick other prompts"
        want.append(ref.output)
    return [*base, 5], prompts, want


def _run_shared_workload(llm: Any, workload: tuple[list[int], list[list[int]], list[list[int]]]) -> list[Any]:
    warm, prompts, want = workload
    llm.generate([warm], _greedy(4), use_tqdm=False)
    results = llm.generate(prompts, _greedy(SHARED_GEN_LEN), use_tqdm=False)
    for i, (result, expected) in enumerate(zip(results, want, strict=True)):
        assert result.finish_reason == "length", i
        assert result.token_ids == expected, f"prompt {i} (length {len(prompts[i])})"
    _assert_all_pages_home(llm.runtime)
    return results


@pytest.mark.parametrize("cache", ["radix", "naive"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_greedy_is_the_same_with_radix_and_naive_cache(
    make_llm: Callable[..., Any], shared_workload: Any, cache: str, page_size: int
) -> None:
    llm = make_llm(cache=cache, page_size=page_size, max_prefill_tokens=8192)
    results = _run_shared_workload(llm, shared_workload)
    cached = [r.num_cached_tokens for r in results]
    assert all(c % page_size == 0 and c < r.num_prompt_tokens for c, r in zip(cached, results, strict=True))
    if cache == "naive":
        assert not any(cached), cached
        assert llm.runtime.stats()["pages_cached"] == 0
    else:
        # The shared-prefix group hits the warm-up prompt's pages, at least to the last full page.
        _, prompts, _ = shared_workload
        group = range(8, len(prompts) - 2)
        for i in group:
            shared = min(len(prompts[i]) - 1, 70)  # each shares >= 70 tokens (the 64-token one: all but 1)
            assert cached[i] >= shared // page_size * page_size, (i, cached[i])
        assert sum(cached[i] for i in group) > 0


@pytest.mark.parametrize("cache", ["radix", "naive"])
@pytest.mark.parametrize(
    "layout",
    [
        dict(page_size=1, num_kv_pages=160),
        dict(page_size=16, num_kv_pages=10),
        dict(page_size=64, num_kv_pages=3),
    ],
    ids=["page1", "page16", "page64"],
)
def test_greedy_is_unchanged_by_retraction(
    make_llm: Callable[..., Any],
    shared_workload: Any,
    monkeypatch: pytest.MonkeyPatch,
    cache: str,
    layout: dict[str, int],
) -> None:
    """A KV pool far too small for the batch, and an admission that expects little more output: decode
    keeps running out of pages and retracts the newest requests, which later resume to the same tokens."""
    monkeypatch.setenv("MINISGL_INIT_NEW_TOKEN_RATIO", "0.2")
    llm = make_llm(cache=cache, max_prefill_tokens=8192, **layout)
    _run_shared_workload(llm, shared_workload)
    assert llm.runtime.scheduler.num_retractions > 0
    assert llm.runtime.stats()["num_retractions"] == llm.runtime.scheduler.num_retractions


# ---- 2. abort at any moment ---------------------------------------------------------------------------


def _drain(runtime: Any, limit: int = 10_000) -> int:
    steps = 0
    while runtime.has_work():
        runtime.step()
        steps += 1
        assert steps < limit, "the runtime does not make progress"
    return steps


def _abort(runtime: Any, req: Any) -> None:
    assert runtime.abort(req.uid) is req
    assert req.finish_reason == "abort"
    assert req.pages == [] and req.table_row == -1, "an aborted request still holds KV"
    assert req not in runtime.scheduler.running and req not in runtime.scheduler.waiting
    assert runtime.abort(req.uid) is None  # a second abort finds nothing
    runtime.check_integrity()


@pytest.mark.parametrize("cache", ["radix", "naive"])
def test_abort_waiting_mid_prefill_and_decoding(
    make_llm: Callable[..., Any],
    reference: Callable[[str], Any],
    standard_prompts: list[list[int]],
    cache: str,
) -> None:
    _, refs = reference(MODEL)
    layout = dict(cache=cache, page_size=4, max_prefill_tokens=16, max_running_requests=4)

    def scenario(do_abort: bool) -> dict[str, Any]:
        runtime = make_llm(**layout).runtime
        reqs = {
            "decoding": runtime.add_request(standard_prompts[2], _greedy()),
            "keep-a": runtime.add_request(standard_prompts[1], _greedy()),
        }
        for _ in range(3):
            runtime.step()
        # 60 prompt tokens: four prefill chunks of at most 16 tokens.
        reqs["prefilling"] = runtime.add_request(standard_prompts[7], _greedy())
        reqs["keep-b"] = runtime.add_request(standard_prompts[4], _greedy())
        reqs["waiting"] = runtime.add_request(standard_prompts[5], _greedy())
        runtime.step()

        decoding, prefilling, waiting = reqs["decoding"], reqs["prefilling"], reqs["waiting"]
        assert decoding in runtime.scheduler.running and len(decoding.output_ids) >= 2
        assert not decoding.is_prefilling
        assert prefilling in runtime.scheduler.running
        assert 0 < prefilling.num_computed < len(prefilling.prompt_ids) and not prefilling.output_ids
        assert waiting in runtime.scheduler.waiting and waiting.table_row == -1
        if do_abort:
            used_before = runtime.stats()["pages_used"]
            for name in ("waiting", "prefilling", "decoding"):
                _abort(runtime, reqs[name])
            if cache == "naive":  # nothing is cached, so the aborted requests' pages are free again
                assert runtime.stats()["pages_used"] < used_before
        _drain(runtime)
        _assert_all_pages_home(runtime)
        return reqs

    plain = scenario(do_abort=False)
    aborted = scenario(do_abort=True)
    want = {
        "decoding": refs[2],
        "keep-a": refs[1],
        "prefilling": refs[7],
        "keep-b": refs[4],
        "waiting": refs[5],
    }
    for name, req in plain.items():
        assert req.finish_reason == "length" and req.output_ids == want[name].output, name
    for name in ("keep-a", "keep-b"):
        assert aborted[name].finish_reason == "length"
        assert aborted[name].output_ids == plain[name].output_ids, name
    for name in ("waiting", "prefilling", "decoding"):
        req = aborted[name]
        assert req.finish_reason == "abort"
        assert req.output_ids == want[name].output[: len(req.output_ids)], name
    assert not aborted["waiting"].output_ids and not aborted["prefilling"].output_ids


def test_abort_at_every_step(
    make_llm: Callable[..., Any],
    reference: Callable[[str], Any],
    standard_prompts: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For every step k of a run (chunked prefill, a small pool that forces retractions), abort one live
    request after step k: waiting, retracted, mid-prefill or decoding. The others still decode exactly."""
    monkeypatch.setenv("MINISGL_INIT_NEW_TOKEN_RATIO", "0.2")
    _, refs = reference(MODEL)
    gen_len = 16
    want = [ref.output[:gen_len] for ref in refs]
    layout = dict(page_size=4, num_kv_pages=32, max_prefill_tokens=16, max_running_requests=6)

    def start() -> tuple[Any, list[Any]]:
        runtime = make_llm(**layout).runtime
        return runtime, [runtime.add_request(p, _greedy(gen_len)) for p in standard_prompts]

    runtime, reqs = start()
    total_steps = _drain(runtime)
    assert [r.output_ids for r in reqs] == want
    assert runtime.scheduler.num_retractions > 0, "the layout no longer forces retractions"

    states: set[str] = set()
    for k in range(total_steps):
        runtime, reqs = start()
        for _ in range(k):
            runtime.step()
        live = [r for r in reqs if r.finish_reason is None]
        if not live:
            continue
        victim = live[k % len(live)]
        if victim in runtime.scheduler.waiting:
            states.add("retracted" if victim.output_ids else "waiting")
        else:
            states.add("prefilling" if victim.is_prefilling else "decoding")
        _abort(runtime, victim)
        _drain(runtime)
        _assert_all_pages_home(runtime)
        for i, req in enumerate(reqs):
            if req is victim:
                assert req.finish_reason == "abort"
                assert req.output_ids == want[i][: len(req.output_ids)], f"step {k}: victim {i}"
            else:
                assert req.finish_reason == "length" and req.output_ids == want[i], f"step {k}: request {i}"
    assert states == {"waiting", "retracted", "prefilling", "decoding"}, states


# ---- 3. a two-turn conversation on the embedded SmolLM2 -------------------------------------------------

SMOLLM_PAGE_SIZE = 16


@pytest.fixture(scope="module")
def smollm() -> Iterator[Any]:
    """The embedded SmolLM2-135M with 16-token pages and the debug checks on."""
    from minisgl.core import LLM

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINISGL_DEBUG_CHECKS", "1")
        llm = LLM("smollm2-135m", device="cpu", dtype="float32", page_size=SMOLLM_PAGE_SIZE)
    assert llm.runtime.debug_checks
    yield llm
    del llm


def _chat_prompt_ids(llm: Any, conversation: list[dict[str, str]]) -> list[int]:
    """The prompt ids `LLM.chat` builds for a conversation."""
    text = llm.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return list(llm.tokenizer.encode(text, add_special_tokens=False))


def test_second_turn_reuses_the_first_turn_to_the_page(smollm: Any) -> None:
    page = SMOLLM_PAGE_SIZE
    turn1 = [{"role": "user", "content": "What is the capital of Italy? Answer in one sentence."}]
    first = smollm.chat(turn1, _sp(temperature=0.0, max_tokens=48), use_tqdm=False)[0]
    assert first.text.strip() and first.token_ids
    turn2 = [
        *turn1,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And what is the capital of Spain?"},
    ]
    prompt1 = _chat_prompt_ids(smollm, turn1)
    prompt2 = _chat_prompt_ids(smollm, turn2)
    assert first.num_prompt_tokens == len(prompt1)
    # Precondition: turn 2's prompt starts with exactly the tokens of turn 1 (prompt + generated answer,
    # whose last token is <|im_end|> when the answer stopped on EOS).
    history = prompt1 + first.token_ids
    assert prompt2[: len(history)] == history, "the chat template does not reproduce turn 1's tokens"

    second = smollm.chat(turn2, _sp(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    assert second.num_prompt_tokens == len(prompt2)
    # KV exists for every token of turn 1 but the last generated one (it was sampled, never fed back);
    # the cache holds whole pages of it.
    computed = len(history) - 1
    assert second.num_cached_tokens >= computed // page * page, (second.num_cached_tokens, computed)
    assert second.num_cached_tokens % page == 0 and second.num_cached_tokens < len(prompt2)
    _assert_all_pages_home(smollm.runtime)


# ---- 4. bad sampling values ---------------------------------------------------------------------------

BAD_SAMPLING = {
    "temperature-negative": dict(temperature=-0.1),
    "temperature-nan": dict(temperature=float("nan")),
    "top_p-zero": dict(top_p=0.0),
    "top_p-above-one": dict(top_p=1.01),
    "top_k-zero": dict(top_k=0),
    "top_k-minus-two": dict(top_k=-2),
    "logprobs-21": dict(logprobs=21),
    "logprobs-negative": dict(logprobs=-1),
    "n-zero": dict(n=0),
    "n-negative": dict(n=-2),
    "min_p-negative": dict(min_p=-0.01),
    "min_p-above-one": dict(min_p=1.5),
    "presence-above-2": dict(presence_penalty=2.5),
    "presence-below-minus-2": dict(presence_penalty=-2.01),
    "frequency-above-2": dict(frequency_penalty=3.0),
    "frequency-below-minus-2": dict(frequency_penalty=-2.5),
    "repetition-zero": dict(repetition_penalty=0.0),
    "repetition-negative": dict(repetition_penalty=-1.0),
    "repetition-above-2": dict(repetition_penalty=2.5),
    "stop-empty-string": dict(stop=[""]),
    "stop-bare-empty-string": dict(stop=""),
    "stop-among-good": dict(stop=["ok", ""]),
}


@pytest.mark.parametrize("bad", BAD_SAMPLING.values(), ids=BAD_SAMPLING.keys())
def test_bad_sampling_values_are_rejected(
    make_llm: Callable[..., Any],
    reference: Callable[[str], Any],
    standard_prompts: list[list[int]],
    bad: dict[str, Any],
) -> None:
    _, refs = reference(MODEL)
    llm = make_llm(page_size=1)
    with pytest.raises(ValueError) as info:
        _sp(max_tokens=4, **bad)
    assert str(info.value).strip()
    # The same values set after construction are caught by the engine before anything is queued.
    params = _sp(max_tokens=4)
    for name, value in bad.items():
        setattr(params, name, value)
    with pytest.raises(ValueError):
        llm.runtime.add_request(standard_prompts[0], params)
    with pytest.raises(ValueError):
        llm.generate([standard_prompts[1], standard_prompts[0]], [_greedy(4), params], use_tqdm=False)
    assert not llm.runtime.has_work()
    results = llm.generate(standard_prompts[:3], _greedy(8), use_tqdm=False)
    assert [r.token_ids for r in results] == [ref.output[:8] for ref in refs[:3]]
    _assert_all_pages_home(llm.runtime)


def test_edge_sampling_values_are_accepted(make_llm: Callable[..., Any]) -> None:
    llm = make_llm(page_size=1)
    edges = [
        dict(top_p=1.0),
        dict(min_p=0.0),
        dict(min_p=1.0),
        dict(logprobs=0),
        dict(logprobs=20),
        dict(presence_penalty=-2.0, frequency_penalty=2.0),
        dict(repetition_penalty=2.0),
        dict(n=1),
    ]
    for edge in edges:
        result = llm.generate([[5, 6, 7]], _sp(max_tokens=2, ignore_eos=True, seed=1, **edge), use_tqdm=False)
        assert len(result[0].token_ids) == 2, edge


# ---- 5. stop strings, n samples, penalties, logprobs ---------------------------------------------------


def test_stop_strings(smollm: Any) -> None:
    prompt = "Once upon a time, in a small village by the sea,"
    full = smollm.generate(prompt, _greedy(40), use_tqdm=False)[0]
    text = full.text
    assert len(text) > 60, text
    # Stop strings cut out of the middle and the end of the text, so that they may span tokens.
    middle = text[len(text) // 2 : len(text) // 2 + 6]
    late = text[len(text) * 3 // 4 : len(text) * 3 // 4 + 4]
    for stops in ([middle], [late, middle], [late]):
        cut = min(text.find(s) for s in stops)
        result = smollm.generate(prompt, _greedy(40, stop=stops), use_tqdm=False)[0]
        assert result.finish_reason == "stop", stops
        assert result.text == text[:cut], (stops, result.text)
        assert not any(s in result.text for s in stops)
        assert len(result.token_ids) < len(full.token_ids)
        assert result.token_ids == full.token_ids[: len(result.token_ids)]
    # A stop string that never appears changes nothing.
    unseen = smollm.generate(prompt, _greedy(40, stop=["\u00a7\u00a7never\u00a7\u00a7"]), use_tqdm=False)[0]
    assert unseen.finish_reason == "length" and unseen.token_ids == full.token_ids
    _assert_all_pages_home(smollm.runtime)


def test_the_runtime_decodes_no_text(smollm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop strings are the caller's (the LLM offline, the detokenizer when serving): driven directly,
    the runtime runs a request with stop strings to its length without decoding a token."""
    tokenizer = smollm.runtime.tokenizer
    for name in ("decode", "batch_decode"):
        monkeypatch.setattr(tokenizer, name, lambda *a, **k: pytest.fail("the runtime decoded text"))
    prompt = tokenizer.encode("Once upon a time, in a small village by the sea,")
    req = smollm.runtime.add_request(prompt, _greedy(12, stop=[" ", "e", "the"]))
    _drain(smollm.runtime)
    assert req.finish_reason == "length" and len(req.output_ids) == 12
    _assert_all_pages_home(smollm.runtime)


def test_a_stop_string_completed_by_the_last_token_still_cuts_the_text(smollm: Any) -> None:
    """One rule for the text, offline as served: it ends before the first stop string, finish "stop",
    even when max_tokens ended the request in the same step."""
    prompt = "Once upon a time, in a small village by the sea,"
    full = smollm.generate(prompt, _greedy(12), use_tqdm=False)[0]
    tokenizer = smollm.tokenizer
    last_piece = tokenizer.decode(full.token_ids, skip_special_tokens=True)[-3:]
    result = smollm.generate(prompt, _greedy(12, stop=[last_piece]), use_tqdm=False)[0]
    want = full.text[: full.text.find(last_piece)]
    assert (result.text, result.finish_reason) == (want, "stop")
    n_samples = smollm.generate(prompt, _greedy(12, stop=[last_piece], n=2), use_tqdm=False)[0]
    assert [(s.text, s.finish_reason) for s in n_samples.samples or ()] == [(want, "stop")] * 2
    _assert_all_pages_home(smollm.runtime)


def _repeats(prompt: list[int], output: list[int]) -> int:
    """Output tokens already seen in the prompt or earlier in the output."""
    seen, count = set(prompt), 0
    for token in output:
        count += token in seen
        seen.add(token)
    return count


def test_penalties_reduce_repetition(smollm: Any) -> None:
    prompt = smollm.tokenizer.encode("the the the the the the the the the the the the")
    variants = {
        "none": {},
        "repetition": dict(repetition_penalty=1.3),
        "presence": dict(presence_penalty=1.5),
        "frequency": dict(frequency_penalty=1.0),
    }
    results = smollm.generate(
        [prompt] * len(variants), [_greedy(24, **v) for v in variants.values()], use_tqdm=False
    )
    repeats = {name: _repeats(prompt, r.token_ids) for name, r in zip(variants, results, strict=True)}
    assert repeats["none"] >= 6, repeats  # the unpenalized model does repeat itself here
    for name in ("repetition", "presence", "frequency"):
        assert repeats[name] < repeats["none"], repeats
    assert repeats["repetition"] <= 2, repeats
    _assert_all_pages_home(smollm.runtime)


def test_penalties_change_greedy_output(
    make_llm: Callable[..., Any], reference: Callable[[str], Any], standard_prompts: list[list[int]]
) -> None:
    _, refs = reference(MODEL)
    llm = make_llm(page_size=16)
    penalties = [dict(presence_penalty=2.0), dict(frequency_penalty=2.0), dict(repetition_penalty=2.0)]
    prompts = [standard_prompts[7]] * len(penalties) + [standard_prompts[7]]
    params = [_greedy(GEN_LEN, **p) for p in penalties] + [_greedy(GEN_LEN)]
    results = llm.generate(prompts, params, use_tqdm=False)
    assert results[-1].token_ids == refs[7].output
    for penalty, result in zip(penalties, results, strict=False):
        assert len(result.token_ids) == GEN_LEN
        assert result.token_ids != refs[7].output, penalty
    _assert_all_pages_home(llm.runtime)


@pytest.mark.parametrize("disable_overlap", [False, True], ids=["overlap", "no-overlap"])
def test_n_samples_share_the_prompt_kv(
    make_llm: Callable[..., Any], standard_prompts: list[list[int]], disable_overlap: bool
) -> None:
    page = 16
    llm = make_llm(page_size=page, disable_overlap=disable_overlap)
    prompt = standard_prompts[6]  # 47 tokens: two full pages
    result = llm.generate([prompt], _sp(temperature=1.0, max_tokens=8, ignore_eos=True, n=2), use_tqdm=False)
    assert len(result) == 1
    samples = result[0].samples
    assert samples is not None and len(samples) == 2 and samples[0] is result[0]
    assert all(len(s.token_ids) == 8 for s in samples)
    assert samples[0].num_cached_tokens == 0
    assert samples[1].num_cached_tokens >= (len(prompt) - 1) // page * page > 0, samples[1].num_cached_tokens
    # The same holds for a prompt repeated in one call: the second copy waits a step and reuses the first.
    twin = standard_prompts[7]
    first, second = llm.generate([twin, twin], _greedy(4), use_tqdm=False)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= (len(twin) - 1) // page * page > 0, second.num_cached_tokens
    assert first.token_ids == second.token_ids
    _assert_all_pages_home(llm.runtime)


@pytest.mark.parametrize("page_size", [1, 16])
def test_a_prefix_shared_within_one_batch_is_computed_once(
    make_llm: Callable[..., Any], standard_prompts: list[list[int]], page_size: int
) -> None:
    """Prompts that arrive together and start alike (a shared system prompt): the first computes the
    shared part, the others wait one step and take it from the cache; the tokens are those of the naive
    cache, which computes every prompt in full."""
    shared = standard_prompts[7][:48]
    prompts = [[*shared, 100 + i, 200 + i, 300 + i] for i in range(6)]
    naive = [r.token_ids for r in make_llm(cache="naive").generate(prompts, _greedy(6), use_tqdm=False)]
    llm = make_llm(page_size=page_size)
    results = llm.generate(prompts, _greedy(6), use_tqdm=False)
    assert [r.token_ids for r in results] == naive
    assert results[0].num_cached_tokens == 0
    assert all(r.num_cached_tokens == len(shared) // page_size * page_size for r in results[1:]), [
        r.num_cached_tokens for r in results
    ]
    _assert_all_pages_home(llm.runtime)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_top_alternatives(
    make_llm: Callable[..., Any], standard_prompts: list[list[int]], temperature: float
) -> None:
    llm = make_llm(page_size=1)
    params = _sp(temperature=temperature, seed=11, max_tokens=12, ignore_eos=True, logprobs=5)
    results = llm.generate(standard_prompts[:4], params, use_tqdm=False)
    for result in results:
        assert result.logprobs is not None and result.top_logprobs is not None
        assert len(result.logprobs) == len(result.top_logprobs) == len(result.token_ids) == 12
        for token, chosen, top in zip(result.token_ids, result.logprobs, result.top_logprobs, strict=True):
            assert len(top) == 5
            assert all(value <= 0.0 for value in top.values())
            assert chosen <= max(top.values()) + 1e-5
            if temperature == 0.0:  # greedy picks the most likely token, which heads the alternatives
                assert top[token] == pytest.approx(chosen, abs=1e-5)
                assert chosen == pytest.approx(max(top.values()), abs=1e-5)
            elif token in top:
                assert top[token] == pytest.approx(chosen, abs=1e-5)

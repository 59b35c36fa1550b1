"""logit_bias, min_tokens and the prompt's top logprobs, checked against the transformers model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import tiny_models
import torch

MODEL = "llama"
LOGPROB_ATOL = 1e-4


@pytest.fixture()
def llm(engines: Any) -> Any:
    return engines.get(MODEL, page_size=1, max_prefill_tokens=8192)


def _params(**kwargs: Any) -> Any:
    from minisgl.core import SamplingParams

    return SamplingParams(**kwargs)


def test_logit_bias_moves_greedy_and_leaves_logprobs_alone(llm: Any, reference: Callable[[str], Any]) -> None:
    model, refs = reference(MODEL)
    ref = refs[0]
    first = ref.output[0]
    runner_up = int(tiny_models.full_logprobs(model, ref.prompt)[-1].topk(2).indices[1])
    banned, forced = llm.generate(
        [ref.prompt, ref.prompt],
        [
            _params(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=0, logit_bias={first: -100.0}),
            _params(temperature=0.0, max_tokens=3, ignore_eos=True, logit_bias={runner_up: 100.0}),
        ],
    )
    assert banned.token_ids == [runner_up]
    # Logprobs are the model's own, before the bias.
    want = float(tiny_models.full_logprobs(model, ref.prompt)[-1, runner_up])
    assert banned.logprobs is not None and banned.logprobs[0] == pytest.approx(want, abs=LOGPROB_ATOL)
    assert forced.token_ids == [runner_up] * 3


def test_logit_bias_applies_on_the_sampled_path(llm: Any, standard_prompts: list[list[int]]) -> None:
    token = 7
    params = _params(
        temperature=1.0, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True, logit_bias={token: 100.0}
    )
    assert llm.generate([standard_prompts[2]], params)[0].token_ids == [token] * 6


def test_min_tokens_masks_eos_and_stop_tokens(llm: Any, standard_prompts: list[list[int]]) -> None:
    eos = llm.model_config.eos_token_ids[0]
    stop = 11
    prompt = standard_prompts[1]
    # A large bias makes EOS (or the stop token) the greedy choice at every step it is allowed.
    eager, held, held_stop, ignoring = llm.generate(
        [prompt] * 4,
        [
            _params(temperature=0.0, max_tokens=20, logit_bias={eos: 100.0}),
            _params(temperature=0.0, max_tokens=20, min_tokens=5, logit_bias={eos: 100.0}),
            _params(
                temperature=0.0, max_tokens=20, min_tokens=3, stop_token_ids=[stop], logit_bias={stop: 100.0}
            ),
            _params(temperature=0.0, max_tokens=4, min_tokens=4, ignore_eos=True, logit_bias={eos: 100.0}),
        ],
    )
    assert eager.token_ids == [eos] and eager.finish_reason == "stop"
    assert len(held.token_ids) == 6 and held.token_ids[-1] == eos and eos not in held.token_ids[:5]
    assert held.finish_reason == "stop"
    assert (
        len(held_stop.token_ids) == 4
        and held_stop.token_ids[-1] == stop
        and stop not in held_stop.token_ids[:3]
    )
    # ignore_eos: EOS is an ordinary token, never masked.
    assert ignoring.token_ids == [eos] * 4 and ignoring.finish_reason == "length"


@pytest.mark.parametrize("max_prefill_tokens", [8192, 8], ids=["whole", "chunked"])
def test_prompt_top_logprobs_match_transformers(
    engines: Any, reference: Callable[[str], Any], max_prefill_tokens: int
) -> None:
    llm = engines.get(MODEL, page_size=1, max_prefill_tokens=max_prefill_tokens)
    model, refs = reference(MODEL)
    prompts = [ref.prompt for ref in refs[:3]]
    params = _params(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=3, prompt_logprobs=True)
    for prompt, result in zip(prompts, llm.generate(prompts, params), strict=True):
        want = tiny_models.full_logprobs(model, prompt)
        tops = result.prompt_top_logprobs
        assert tops is not None and len(tops) == len(prompt) and tops[0] is None
        for p in range(1, len(prompt)):
            values, ids = torch.topk(want[p - 1], 3)
            got = tops[p]
            assert got is not None and list(got) == ids.tolist(), f"position {p}"
            assert list(got.values()) == pytest.approx(values.tolist(), abs=LOGPROB_ATOL), f"position {p}"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys"),
        ({"logit_bias": {3: 100.5}}, "logit_bias values"),
        ({"logit_bias": {3: float("nan")}}, "logit_bias values"),
    ],
)
def test_bad_min_tokens_and_logit_bias(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _params(**fields)


def test_token_ids_outside_the_vocabulary_are_refused(llm: Any) -> None:
    vocab = llm.model_config.vocab_size
    for fields, name in (
        ({"logit_bias": {vocab: 1.0}}, "logit_bias"),
        ({"stop_token_ids": [vocab]}, "stop_token_ids"),
    ):
        with pytest.raises(ValueError, match=f"{name} holds token id {vocab}"):
            llm.runtime.check_request([1, 2], _params(**fields))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_biased_rows_keep_the_batch_on_the_fused_sampler(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch where some rows carry logit_bias or min_tokens takes the one-pass path (minisgl-kernels'
    Gumbel-max kernel on CUDA; on the CPU its torch reference): one draw for the whole batch, none of the
    general path's per-row sampling, and each row's tokens follow its own adjusted distribution (total
    variation < 0.04 on 20,000 draws of 40 tokens per kind: sampling noise stays under 0.02, a lost bias
    shows as 0.07)."""
    from minisgl.core.request import Request
    from minisgl.core.sampling import sampler
    from minisgl.kernels import reference

    fused_batches: list[int] = []
    fused_draw = sampler.gumbel_sample

    def counted_draw(
        logits: torch.Tensor, inv_temperature: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        fused_batches.append(logits.shape[0])
        assert logits.dtype == torch.float32
        if device == "cuda":
            return fused_draw(logits, inv_temperature, generator)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        return reference.gumbel_sample(logits, inv_temperature, seed)

    def general_path(*args: Any) -> torch.Tensor:
        raise AssertionError("a biased row sent the batch to the general sampler")

    if device == "cpu":
        monkeypatch.setattr(sampler, "_one_pass_sampler_runs", lambda logits: True)
    monkeypatch.setattr(sampler, "gumbel_sample", counted_draw)
    monkeypatch.setattr(sampler, "_sample_rows", general_path)
    eos, rows_each = 2, 20000
    torch.manual_seed(0)
    base = (torch.randn(40) * 1.5).to(torch.bfloat16)
    bias = {5: 1.0, 6: -0.3}  # small biases: rounding them (or the logits) to bf16 would show
    kinds = [
        _params(temperature=0.7),
        _params(temperature=0.7, logit_bias=bias),
        _params(temperature=0.7, min_tokens=4),
        _params(temperature=0.0, logit_bias={9: 100.0}),
    ]
    requests = [Request(i, [1], kinds[i % 4]) for i in range(4 * rows_each)]
    output = sampler.sample(
        base.to(device).repeat(len(requests), 1),
        requests,
        torch.Generator(device=device).manual_seed(1),
        frozenset({eos}),
        [0] * len(requests),
    )
    assert fused_batches == [len(requests)]
    tokens = output.tokens.view(rows_each, 4).cpu()
    assert tokens[:, 3].eq(9).all()  # greedy under a forcing bias
    assert not tokens[:, 2].eq(eos).any()  # EOS masked until min_tokens
    plain = base.float() / 0.7
    biased = base.float().index_add(0, torch.tensor(list(bias)), torch.tensor(list(bias.values()))) / 0.7
    masked = plain.clone()
    masked[eos] = float("-inf")
    for column, logits in enumerate((plain, biased, masked)):
        observed = torch.bincount(tokens[:, column], minlength=40).float() / rows_each
        assert (observed - logits.softmax(-1)).abs().sum() / 2 < 0.04, column

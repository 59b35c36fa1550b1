"""Bad input raises ValueError with a message, and the same engine keeps generating correctly after it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_models import MAX_POSITIONS, VOCAB_SIZE

MODEL = "llama"


@pytest.fixture()
def llm(engines: Any) -> Any:
    return engines.get(MODEL, page_size=1, max_prefill_tokens=8192)


@pytest.fixture()
def still_works(llm: Any, reference: Callable[[str], Any]) -> Callable[[], None]:
    """After an error the engine must still produce the exact greedy reference for a small batch."""
    _, refs = reference(MODEL)

    def check() -> None:
        from minisgl.core import SamplingParams

        results = llm.generate(
            [refs[0].prompt, refs[3].prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        )
        assert [r.token_ids for r in results] == [refs[0].output[:8], refs[3].output[:8]]

    return check


def _value_error(make_call: Callable[[], Any]) -> str:
    """Runs a call that must raise ValueError (at SamplingParams construction or in generate)."""
    with pytest.raises(ValueError) as info:
        make_call()
    assert str(info.value).strip(), "the ValueError carries no message"
    return str(info.value)


def _sp(**kwargs: Any) -> Any:
    from minisgl.core import SamplingParams

    return SamplingParams(**kwargs)


def test_empty_prompt(llm: Any, still_works: Callable[[], None]) -> None:
    _value_error(lambda: llm.generate([[]], _sp(max_tokens=4)))
    still_works()
    # one bad prompt among good ones rejects the call, and nothing of it leaks into the next one
    _value_error(lambda: llm.generate([[5, 6, 7], [], [8, 9]], _sp(max_tokens=4)))
    still_works()


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_max_tokens_below_one(llm: Any, still_works: Callable[[], None], max_tokens: int) -> None:
    _value_error(lambda: llm.generate([[5, 6, 7]], _sp(max_tokens=max_tokens)))
    still_works()


@pytest.mark.parametrize("length", [MAX_POSITIONS, MAX_POSITIONS + 50])
def test_prompt_longer_than_context(llm: Any, still_works: Callable[[], None], length: int) -> None:
    prompt = [3 + (i * 7) % (VOCAB_SIZE - 3) for i in range(length)]
    message = _value_error(lambda: llm.generate([prompt], _sp(max_tokens=4)))
    assert str(length) in message or "context" in message.lower() or "long" in message.lower(), message
    still_works()


def test_generation_stops_at_the_context_limit(llm: Any, reference: Callable[[str], Any]) -> None:
    """prompt + 1 == max_position_embeddings is accepted; decoding stops when the context is full."""
    import tiny_models

    model, _ = reference(MODEL)
    prompt = tiny_models.make_prompts(7, [MAX_POSITIONS - 6])[0]
    want = tiny_models.greedy_reference(model, prompt, 6).output
    result = llm.generate([prompt], _sp(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert result.finish_reason == "length"
    assert result.token_ids == want  # exactly 6 tokens: prompt + output fills the context
    longest = llm.generate(
        [prompt[:1] + prompt + prompt[:4]], _sp(temperature=0.0, max_tokens=16, ignore_eos=True)
    )[0]
    assert len(longest.token_ids) == 1 and longest.finish_reason == "length"


def test_token_id_out_of_vocabulary(llm: Any, still_works: Callable[[], None]) -> None:
    """Not in the written contract, but an id >= vocab_size must not reach the embedding."""
    _value_error(lambda: llm.generate([[5, VOCAB_SIZE, 7]], _sp(max_tokens=4)))
    still_works()
    _value_error(lambda: llm.generate([[5, -1, 7]], _sp(max_tokens=4)))
    still_works()


def test_unknown_model_path(llm: Any, still_works: Callable[[], None], tmp_path: Any) -> None:
    from minisgl.core import LLM

    _value_error(lambda: LLM(str(tmp_path / "does-not-exist"), device="cpu", dtype="float32"))
    _value_error(lambda: LLM("no-such-embedded-model-name", device="cpu", dtype="float32"))
    still_works()


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.5),
        dict(top_p=0.0),
        dict(top_p=-0.2),
        dict(top_p=1.5),
        dict(top_k=0),
        dict(top_k=-2),
    ],
    ids=[
        "temperature-negative",
        "top_p-zero",
        "top_p-negative",
        "top_p-above-one",
        "top_k-zero",
        "top_k-minus-two",
    ],
)
def test_bad_sampling_params(llm: Any, still_works: Callable[[], None], bad: dict[str, Any]) -> None:
    _value_error(lambda: llm.generate([[5, 6, 7]], _sp(max_tokens=4, **bad)))
    still_works()


def test_sampling_params_list_of_wrong_length(llm: Any, still_works: Callable[[], None]) -> None:
    _value_error(lambda: llm.generate([[5, 6, 7], [8, 9]], [_sp(max_tokens=4)]))
    still_works()


def test_valid_edge_sampling_params_are_accepted(llm: Any) -> None:
    for good in (dict(top_p=1.0), dict(top_k=-1), dict(top_k=1), dict(temperature=0.0), dict(top_p=1e-6)):
        result = llm.generate([[5, 6, 7]], _sp(max_tokens=2, ignore_eos=True, **good))[0]
        assert len(result.token_ids) == 2, good


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fi", "'fi' needs a CUDA device"),
        ("fa3", "'fa3' needs a CUDA device"),
        ("torch,fa3", "'fa3' needs a CUDA device"),
        ("flash", "'flash' is not one of: auto, torch, fi, fa3, xqa"),
        ("fi,xqa", "'fi' needs a CUDA device"),
        ("torch,xqa", "'xqa' needs a CUDA device"),
        ("xqa", "'xqa' needs a CUDA device"),
        ("fi,torch,fi", "PREFILL,DECODE"),
    ],
)
def test_attention_backend_that_cannot_run_here(spec: str, message: str) -> None:
    from minisgl.core.attention import resolve_attention

    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_attention(spec, torch.device("cpu"))


def test_attention_auto_on_the_cpu_is_torch() -> None:
    from minisgl.core.attention import resolve_attention

    assert resolve_attention("auto", torch.device("cpu")) == ("torch", "torch")
    assert resolve_attention("torch,auto", torch.device("cpu")) == ("torch", "torch")


def test_tensor_core_decode_rule() -> None:
    """The measured rule (tools/attn_bench.py on an H100): CUDA-core decode only for pages of one token
    and up to 4 query heads per KV head; FA3 always uses tensor cores."""
    from minisgl.core.attention.flashinfer_backend import use_tensor_core_decode

    assert not use_tensor_core_decode(group_size=4, page_size=1, kernels="fa2")
    assert not use_tensor_core_decode(group_size=2, page_size=8, kernels="fa2")
    assert use_tensor_core_decode(group_size=2, page_size=16, kernels="fa2")
    assert use_tensor_core_decode(group_size=8, page_size=1, kernels="fa2")
    assert use_tensor_core_decode(group_size=1, page_size=1, kernels="fa3")


def test_a_context_length_above_the_models_is_refused(tiny_model_dir: Callable[[str], Any]) -> None:
    from minisgl.core import LLM

    with pytest.raises(ValueError, match=f"--context-length.*maximum of {MAX_POSITIONS} tokens"):
        LLM(str(tiny_model_dir(MODEL)), device="cpu", max_seq_len=MAX_POSITIONS + 1)


def test_reading_a_config_without_a_dtype_does_not_touch_the_deprecated_torch_dtype() -> None:
    from transformers import LlamaConfig

    from minisgl.core.config import ModelConfig

    class Config(LlamaConfig):
        @property
        def torch_dtype(self) -> Any:  # transformers warns "`torch_dtype` is deprecated" here
            raise AssertionError("torch_dtype was read")

    config = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    assert config.dtype is None
    assert ModelConfig.from_hf(config).checkpoint_dtype is None

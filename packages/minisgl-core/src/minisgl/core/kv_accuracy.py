"""What a KV cache dtype costs in accuracy: one engine with the reference cache (the model's dtype) and one
with the cache under test, on the same weights and prompts (random ids; `load_format="dummy"` draws the
same random weights every time).

- teacher-forced logprobs: both engines score the reference's greedy continuation (prompt logprobs);
  the per-token |difference| (max, mean);
- teacher-forced greedy agreement: for every prefix of that continuation, whether the engine under test
  picks the reference's next token;
- free-running greedy: the share of generated tokens before the two engines' outputs first differ;
- decode logprobs: until the outputs first differ both engines have seen the same tokens, so there the
  logprobs the engine under test computed in its decode steps are compared with the reference's
  teacher-forced ones (the measures above run prefill kernels only; this one prices the decode kernel).

Both engines take the same engine flags, except that --reference-attn gives the reference its own
attention backends (to price a decode kernel that only runs over the cache under test, such as XQA's).

    python -m minisgl.core.kv_accuracy --model smollm2-135m --device cpu --kv-cache-dtype fp8_e4m3
    python -m minisgl.core.kv_accuracy --model qwen3-8b --load-format dummy --kv-cache-dtype fp8_e4m3
    python -m minisgl.core.kv_accuracy --model qwen3-8b --load-format dummy --kv-cache-dtype fp8_e4m3 \
        --attn fi,xqa --reference-attn fi
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

from minisgl.core.engine_config import KV_CACHE_DTYPES, attention_spec
from minisgl.core.engine_flags import add_engine_flags, value_parser
from minisgl.core.llm import LLM
from minisgl.core.loading.model_source import DEFAULT_MODEL
from minisgl.core.request import GenerationResult
from minisgl.core.sampling_params import SamplingParams


@dataclass
class KVAccuracy:
    kv_cache_dtype: str
    positions: int  # teacher-forced positions scored
    max_logprob_diff: float
    mean_logprob_diff: float
    greedy_agreement: float  # teacher-forced: the same next token as the reference
    free_running_prefix: float  # generated tokens before the first difference, over all generated
    decode_positions: int  # decode steps before the first difference, where decode logprobs are compared
    decode_max_logprob_diff: float  # nan without such positions
    decode_mean_logprob_diff: float


@dataclass
class _Scores:
    greedy: list[list[int]]  # free-running greedy continuation of each prompt
    greedy_logprobs: list[list[float]]  # and the logprob of each of its tokens (decode steps from the 2nd)
    scored: list[list[float]]  # teacher-forced logprobs of the reference continuation's tokens
    next_tokens: list[list[int]]  # greedy next token after each prefix of the reference continuation


def random_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, min(vocab, 10000)) for _ in range(length)] for _ in range(num)]


def _score(llm: LLM, prompts: list[list[int]], reference: list[list[int]] | None, gen_len: int) -> _Scores:
    greedy = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True, logprobs=0)
    results = llm.generate(prompts, greedy, use_tqdm=False)
    free = [r.token_ids for r in results]
    free_logprobs = [list(r.logprobs or []) for r in results]
    continuation = reference if reference is not None else free
    scored = _continuation_logprobs(llm, prompts, continuation)
    return _Scores(free, free_logprobs, scored, _greedy_next_tokens(llm, prompts, continuation, gen_len))


def _continuation_logprobs(
    llm: LLM, prompts: list[list[int]], continuation: list[list[int]]
) -> list[list[float]]:
    """Teacher-forced: each continuation token's logprob after its prompt and the continuation before it."""
    full = [p + c for p, c in zip(prompts, continuation, strict=True)]
    forced = llm.generate(full, SamplingParams(max_tokens=1, prompt_logprobs=True), use_tqdm=False)
    return [_logprobs_after(prompt, result) for prompt, result in zip(prompts, forced, strict=True)]


def _logprobs_after(prompt: list[int], result: GenerationResult) -> list[float]:
    assert result.prompt_logprobs is not None
    return [float(x) for x in result.prompt_logprobs[len(prompt) :] if x is not None]


def _greedy_next_tokens(
    llm: LLM, prompts: list[list[int]], continuation: list[list[int]], gen_len: int
) -> list[list[int]]:
    """Teacher-forced: the greedy token after every prefix of each prompt's continuation."""
    # One request per prefix; the prefix cache computes each shared prefix once.
    prefixes = [p + c[:t] for p, c in zip(prompts, continuation, strict=True) for t in range(len(c))]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    nexts = [r.token_ids[0] for r in llm.generate(prefixes, one, use_tqdm=False)]
    return [nexts[i * gen_len : (i + 1) * gen_len] for i in range(len(prompts))]


def _run(
    model: str,
    kv_cache_dtype: str,
    prompts: list[list[int]] | None,
    reference: list[list[int]] | None,
    shape: tuple[int, int, int],
    engine_options: dict[str, Any],
) -> tuple[list[list[int]], _Scores]:
    """One engine, released before returning so that two never share the GPU's memory. Without prompts,
    draws shape = (num_prompts, prompt_len, gen_len)'s prompts from the model's vocabulary."""
    num_prompts, prompt_len, gen_len = shape
    with LLM(model, kv_cache_dtype=kv_cache_dtype, **engine_options) as llm:
        if prompts is None:
            prompts = random_prompts(num_prompts, prompt_len, llm.model_config.vocab_size)
        scores = _score(llm, prompts, reference, gen_len)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return prompts, scores


def measure(
    model: str,
    kv_cache_dtype: str,
    num_prompts: int = 8,
    prompt_len: int = 64,
    gen_len: int = 32,
    reference_attn: str | None = None,
    **engine_options: Any,
) -> KVAccuracy:
    """Compare kv_cache_dtype with the model's own dtype ("auto") on the same prompts; the engines run one
    after the other (engine_options: the other EngineConfig fields, the same for both, except that
    reference_attn, when given, is the reference engine's attn)."""
    shape = (num_prompts, prompt_len, gen_len)
    reference_options = dict(engine_options)
    if reference_attn is not None:
        reference_options["attn"] = reference_attn
    prompts, reference = _run(model, "auto", None, None, shape, reference_options)
    _, tested = _run(model, kv_cache_dtype, prompts, reference.greedy, shape, engine_options)

    diffs = torch.tensor(
        [
            abs(a - b)
            for ref, got in zip(reference.scored, tested.scored, strict=True)
            for a, b in zip(ref, got, strict=True)
        ]
    )
    agree = _same_tokens(reference.greedy, tested.next_tokens)
    before_difference = sum(
        _common_prefix(ref, got) for ref, got in zip(reference.greedy, tested.greedy, strict=True)
    )
    decode = _decode_diffs(reference, tested)
    total = num_prompts * gen_len
    return KVAccuracy(
        kv_cache_dtype=kv_cache_dtype,
        positions=int(diffs.numel()),
        max_logprob_diff=float(diffs.max()),
        mean_logprob_diff=float(diffs.mean()),
        greedy_agreement=agree / total,
        free_running_prefix=before_difference / total,
        decode_positions=int(decode.numel()),
        decode_max_logprob_diff=float(decode.max()) if decode.numel() else math.nan,
        decode_mean_logprob_diff=float(decode.mean()) if decode.numel() else math.nan,
    )


def _decode_diffs(reference: _Scores, tested: _Scores) -> torch.Tensor:
    """|tested decode logprob - reference teacher-forced logprob| at every decode step (position >= 1)
    before the two greedy outputs first differ: the same token after the same tokens in both."""
    return torch.tensor(
        [
            abs(tested.greedy_logprobs[i][t] - reference.scored[i][t])
            for i, (ref, got) in enumerate(zip(reference.greedy, tested.greedy, strict=True))
            for t in range(1, _common_prefix(ref, got))
        ]
    )


def _same_tokens(reference: list[list[int]], tested: list[list[int]]) -> int:
    """How many positions hold the same token in both."""
    return sum(
        a == b for ref, got in zip(reference, tested, strict=True) for a, b in zip(ref, got, strict=True)
    )


def _common_prefix(ref: list[int], got: list[int]) -> int:
    """How many tokens two greedy outputs share before they first differ."""
    differs = [i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b]
    return differs[0] if differs else len(ref)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m minisgl.core.kv_accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--kv-cache-dtype", default="fp8_e4m3", choices=KV_CACHE_DTYPES, help="the cache dtype under test"
    )
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument(
        "--reference-attn",
        default=None,
        type=value_parser(str, attention_spec),
        help="the reference engine's attention backends (default: the same as --attn)",
    )
    # The engines' other options, the same for both (the context length follows from the lengths).
    shared = add_engine_flags(parser.add_argument_group("engine"), exclude=("kv_cache_dtype", "max_seq_len"))
    args = parser.parse_args(argv)
    result = measure(
        args.model,
        args.kv_cache_dtype,
        args.num_prompts,
        args.prompt_len,
        args.gen_len,
        args.reference_attn,
        max_seq_len=args.prompt_len + args.gen_len + 8,
        **{name: getattr(args, name) for name in shared},
    )
    attn = {"attn": args.attn, "reference_attn": args.reference_attn or args.attn}
    print(json.dumps({"model": args.model, **attn, **asdict(result)}))


if __name__ == "__main__":
    main()

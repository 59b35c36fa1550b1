#!/usr/bin/env python3
"""Offline benchmark of the prefix cache on a shared-prefix workload: every request is one shared prefix
(a long system prompt, say) followed by a few tokens of its own. The same workload runs once with
`cache="radix"` and once with `cache="naive"`; greedy decoding, so both must give the same tokens.

    uv run python tools/bench_shared_prefix.py                     # 64 x (512 shared + 16 own), 16 out, CPU
    uv run python tools/bench_shared_prefix.py --device cuda --dtype bfloat16 --num-requests 256

Reported per cache: wall time of the generate call (after a warm-up on an unrelated prompt), output and
total (prompt + output) tokens per second, and the prompt tokens served from the cache.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Any

from minisgl.core.engine_flags import add_engine_flags


def make_prompts(num_requests: int, prefix_len: int, unique_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randint(10, 10000) for _ in range(prefix_len)]
    return [prefix + [rng.randint(10, 10000) for _ in range(unique_len)] for _ in range(num_requests)]


def run(cache: str, args: argparse.Namespace, prompts: list[list[int]]) -> tuple[float, int, list[Any]]:
    from minisgl.core import LLM, SamplingParams

    llm = LLM(args.model, cache=cache, **{name: getattr(args, name) for name in args.engine_flags})
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up, shares nothing
    started = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    cached = sum(r.num_cached_tokens for r in results)
    del llm
    gc.collect()
    return elapsed, cached, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--shared-prefix-len", type=int, default=512)
    parser.add_argument("--unique-len", type=int, default=16, help="tokens of each request's own suffix")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cache", choices=["radix", "naive", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0, help="of the workload's token ids")
    # The engine's other flags (--seed above is the workload's; sampling is greedy).
    engine_flags = add_engine_flags(parser.add_argument_group("engine"), exclude=("cache", "seed"))
    parser.set_defaults(device="cpu", dtype="float32", page_size=1)
    args = parser.parse_args(argv)
    args.engine_flags = engine_flags

    prompts = make_prompts(args.num_requests, args.shared_prefix_len, args.unique_len, args.seed)
    prompt_tokens = sum(map(len, prompts))
    output_tokens = args.num_requests * args.max_tokens
    print(
        f"model={args.model} device={args.device} dtype={args.dtype} requests={args.num_requests} "
        f"prompt={args.shared_prefix_len} shared + {args.unique_len} own tokens, max_tokens={args.max_tokens}"
    )
    caches = ["radix", "naive"] if args.cache == "both" else [args.cache]
    timings: dict[str, float] = {}
    outputs: dict[str, list[list[int]]] = {}
    for cache in caches:
        elapsed, cached, results = run(cache, args, prompts)
        timings[cache] = elapsed
        outputs[cache] = [r.token_ids for r in results]
        print(
            f"cache={cache:5s} time={elapsed:7.2f}s output={output_tokens / elapsed:7.1f} tok/s "
            f"total={(prompt_tokens + output_tokens) / elapsed:8.1f} tok/s "
            f"cached_prompt_tokens={cached}/{prompt_tokens}"
        )
    if len(timings) == 2:
        same = outputs["radix"] == outputs["naive"]
        print(f"radix speedup over naive: {timings['naive'] / timings['radix']:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()

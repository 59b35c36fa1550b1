"""Offline throughput benchmark on nano-vllm's workload: random prompt ids, random prompt and output
lengths, temperature 0.6, ignore_eos. The defaults are the H100 workload of docs/benchmarks.md (256 requests, lengths
uniform in [100, 1024], 133,966 output tokens); scale it down on a CPU with the flags.

    python -m minisgl.core.bench --model smollm2-135m --num-prompts 32 --max-input-len 256 --max-output-len 128
    python -m minisgl.core.bench ... --engine hf     # the same workload through transformers' generate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, cast

from minisgl.core.engine_flags import add_engine_flags, engine_config_from
from minisgl.core.loading.model_source import BUNDLED_CONFIGS, DEFAULT_MODEL
from minisgl.core.runtime import StepTiming

# Prompt token ids are drawn from [0, PROMPT_ID_MAX], nano-vllm's range: every benchmarked vocabulary has them.
PROMPT_ID_MAX = 10000


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(
    num_prompts: int,
    max_input_len: int,
    max_output_len: int,
    seed: int = 0,
    min_input_len: int | None = None,
    min_output_len: int | None = None,
) -> Workload:
    """Prompts first, then output lengths, from one `random.seed(seed)` stream (nano-vllm's order).
    Lengths are uniform in [min, max]; the minimum defaults to nano-vllm's min(100, max lengths)."""
    random.seed(seed)
    default_min = min(100, max_input_len, max_output_len)
    min_input_len = default_min if min_input_len is None else min_input_len
    min_output_len = default_min if min_output_len is None else min_output_len
    prompts = [
        [random.randint(0, PROMPT_ID_MAX) for _ in range(random.randint(min_input_len, max_input_len))]
        for _ in range(num_prompts)
    ]
    output_lens = [random.randint(min_output_len, max_output_len) for _ in range(num_prompts)]
    return Workload(prompts, output_lens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="minisgl bench offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model name, HF directory or .gguf file; with --load-format dummy also a bundled config "
        f"({', '.join(BUNDLED_CONFIGS)})",
    )
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument(
        "--min-input-len", type=int, default=None, help="default: min(100, --max-input-len, --max-output-len)"
    )
    parser.add_argument("--min-output-len", type=int, default=None, help="default: as --min-input-len")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument(
        "--engine",
        default="minisgl",
        choices=["minisgl", "hf"],
        help="hf runs the same workload through transformers' generate, for comparison",
    )
    parser.add_argument(
        "--time-device",
        action="store_true",
        help="time every step on the device too (CUDA events; adds a little host work per step)",
    )
    parser.add_argument("--timeline", default=None, help="write every step's timing to this JSON file")
    parser.add_argument(
        "--json-schema-fraction",
        type=float,
        default=0.0,
        help="this fraction of the requests (every k-th) generate under BENCH_SCHEMA, a JSON schema (the "
        "model needs a tokenizer); throughput then counts the tokens actually generated, and a second, "
        "free run of new prompts of the same lengths, each request generating as many tokens as it did "
        "under the schema, prints the grammar's cost",
    )
    parser.add_argument("--hf-batch-size", type=int, default=32, help="batch size of the hf engine")
    add_engine_flags(parser.add_argument_group("engine (minisgl)"))
    args = parser.parse_args(argv)
    args.engine_config = engine_config_from(parser, args)
    _check_workload_args(parser, args)
    return args


def _check_workload_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts and lengths at least 1, each minimum at most its maximum, a fraction in [0, 1]."""
    counts = ("num_prompts", "max_input_len", "max_output_len", "min_input_len", "min_output_len")
    for flag in (*counts, "hf_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.json_schema_fraction <= 1.0:
        parser.error("--json-schema-fraction must be in [0, 1]")
    for kind in ("input", "output"):
        low, high = getattr(args, f"min_{kind}_len"), getattr(args, f"max_{kind}_len")
        if low is not None and low > high:
            parser.error(f"--min-{kind}-len {low} is above --max-{kind}-len {high}")


# Long outputs under a grammar: an object holding an array of short strings, as many as the model writes.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 16}}},
    "required": ["items"],
}


def run_minisgl(args: argparse.Namespace, workload: Workload) -> tuple[float, int]:
    from minisgl.core import LLM, SamplingParams

    llm = LLM(args.model, **dataclasses.asdict(args.engine_config))
    constrained = constrained_requests(len(workload.output_lens), args.json_schema_fraction)
    params = [
        SamplingParams(
            temperature=args.temperature,
            ignore_eos=True,
            max_tokens=n,
            json_schema=BENCH_SCHEMA if schema else None,
        )
        for n, schema in zip(workload.output_lens, constrained, strict=True)
    ]
    # Warm-up (with a grammar: the tokenizer's grammar tables and the schema are compiled here, untimed).
    warm_up = SamplingParams(max_tokens=4, json_schema=BENCH_SCHEMA if any(constrained) else None)
    llm.generate([[1, 2, 3]], warm_up, use_tqdm=False)
    elapsed, output_lens = _timed_generate(args, llm, workload.prompts, params, args.timeline)
    if any(constrained):
        _print_grammar_cost(args, llm, workload, output_lens, elapsed)
    llm.shutdown()
    return elapsed, sum(output_lens)


def _timed_generate(
    args: argparse.Namespace, llm: Any, prompts: list[list[int]], params: list[Any], timeline: str | None
) -> tuple[float, list[int]]:
    """Seconds and each request's output length of one timed `generate`; prints the step summary."""
    timing = llm.runtime.timing = StepTiming()
    llm.runtime.model_runner.time_device = args.time_device
    started = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    print(timing.summary())
    if timeline:
        with open(timeline, "w") as file:
            json.dump(timing.to_json(), file)
    return elapsed, [len(r.token_ids) for r in results]


def _print_grammar_cost(
    args: argparse.Namespace, llm: Any, workload: Workload, output_lens: list[int], constrained_s: float
) -> None:
    """Constrained requests stop where their JSON ends, so the constrained run's throughput is not
    comparable with a free run of the workload. Compare it instead with a free run that generates exactly
    as many tokens per request, on new prompts of the same lengths (the radix cache holds the first run's)."""
    from minisgl.core import SamplingParams

    params = [
        SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=n) for n in output_lens
    ]
    print("free run with the same output lengths:")
    free_s, _ = _timed_generate(args, llm, fresh_prompts(workload.prompts), params, None)
    print(
        f"grammar cost: {constrained_s:.2f} s with the schema, {free_s:.2f} s free for the same tokens "
        f"({(constrained_s / free_s - 1) * 100:+.1f}%)"
    )


def fresh_prompts(prompts: list[list[int]], seed: int = 1) -> list[list[int]]:
    """New random prompt ids with the lengths of `prompts`, from the same id range."""
    rng = random.Random(seed)
    return [[rng.randint(0, PROMPT_ID_MAX) for _ in prompt] for prompt in prompts]


def run_hf(args: argparse.Namespace, workload: Workload) -> tuple[float, int]:
    """transformers' generate in fixed-size batches (left padding), min_new_tokens = max_new_tokens per batch
    member's own length is not expressible, so each batch runs to its longest output; only each request's
    own output tokens are counted."""
    import torch
    from transformers import AutoModelForCausalLM

    from minisgl.core.config import parse_dtype, resolve_device
    from minisgl.core.loading.loader import load_hf_config, read_gguf_tensors
    from minisgl.core.loading.model_source import resolve_model

    source = resolve_model(args.model)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype, None, device)
    if source.is_gguf:
        # from_pretrained(gguf_file=...) needs `accelerate`; build the model from the GGUF's config and
        # fill it through transformers' GGUF reader instead (the same tensors minisgl loads).
        hf_config = load_hf_config(source)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        model.load_state_dict(dict(read_gguf_tensors(source, hf_config)), strict=False)
        model.tie_weights()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=dtype)
    model = cast(Any, model).to(device).eval()
    started = time.perf_counter()
    for i in range(0, len(workload.prompts), args.hf_batch_size):
        prompts = workload.prompts[i : i + args.hf_batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        new = max(workload.output_lens[i : i + args.hf_batch_size])
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                temperature=args.temperature,
                top_p=1.0,
                top_k=0,
                pad_token_id=0,
            )
    return time.perf_counter() - started, workload.num_output_tokens


def constrained_requests(num_requests: int, fraction: float) -> list[bool]:
    """Which requests run under the JSON schema: num_requests * fraction of them (rounded up), evenly
    spread, the first included (every k-th for a fraction of 1/k)."""
    return [math.floor(i * fraction) != math.floor((i - 1) * fraction) for i in range(num_requests)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = make_workload(
        args.num_prompts,
        args.max_input_len,
        args.max_output_len,
        min_input_len=args.min_input_len,
        min_output_len=args.min_output_len,
    )
    elapsed, tokens = (run_hf if args.engine == "hf" else run_minisgl)(args, workload)
    print(
        f"engine={args.engine} model={args.model} requests={args.num_prompts} "
        f"prompt_tokens={sum(map(len, workload.prompts))} output_tokens={tokens}"
    )
    print(f"time={elapsed:.2f}s throughput={tokens / elapsed:.1f} output tok/s")


if __name__ == "__main__":
    main()

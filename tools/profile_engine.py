"""Profile the engine's decode and prefill steps on a GPU (torch.profiler), for performance work.

    python tools/profile_engine.py --model qwen3-0.6b --batch 128 --context 800 [--page-size 16] [--no-graphs]

Prints the mean decode step time, the top kernels by device time and the top host-side ops.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from minisgl.core import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=800)
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    llm = LLM(
        args.model,
        load_format="dummy",
        max_seq_len=4096,
        page_size=args.page_size,
        cuda_graph_max_bs=0 if args.no_graphs else None,
    )
    runtime = llm.runtime
    rng = random.Random(0)
    for _ in range(args.batch):
        prompt = [rng.randrange(10000) for _ in range(args.context)]
        runtime.add_request(prompt, SamplingParams(temperature=0.6, max_tokens=1000, ignore_eos=True))
    while runtime.scheduler.waiting or any(r.is_prefilling for r in runtime.scheduler.running):
        runtime.step()
    for _ in range(5):
        runtime.step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        runtime.step()
    torch.cuda.synchronize()
    print(f"decode: {1000 * (time.perf_counter() - started) / args.steps:.2f} ms/step at batch {args.batch}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            runtime.step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
            break
        except Exception:  # the key's name differs between torch versions
            continue
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()

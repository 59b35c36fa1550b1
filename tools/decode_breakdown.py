"""Where a decode step's time goes, on a GPU (performance work, not a test).

    python tools/decode_breakdown.py --model qwen3-0.6b --batches 1,32,128,256 --context 800 [--profile 128]

For each batch size: B requests of `context` random prompt tokens are brought to decoding, then it times
(CUDA events, medians) the whole step as the runtime runs it, the decode CUDA graph's replay alone (the
model and the logits) and the sampler alone; the rest of the step is layout, planning and the token
table. --trace B profiles whole steps (host and device) and writes a Chrome trace. --profile B prints torch.profiler's kernel table of graph replays at batch B (after the timings,
so a profiler that hangs costs only that part). --prefill-profile N prints the kernel table of one
prefill step of N prompts of `context` tokens (at most --max-prefill-tokens of them).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from minisgl.core import LLM, SamplingParams
from minisgl.core.engine_flags import add_engine_flags
from minisgl.core.runtime import Runtime
from minisgl.core.sampling.sampler import sample


def device_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bring_to_decode(runtime: Runtime, batch: int, context: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(batch):
        prompt = [rng.randrange(10000) for _ in range(context)]
        runtime.add_request(prompt, SamplingParams(temperature=0.6, max_tokens=3000, ignore_eos=True))
    while runtime.scheduler.waiting or any(r.is_prefilling for r in runtime.scheduler.running):
        runtime.step()
    for _ in range(4):
        runtime.step()


def clear(runtime: Runtime) -> None:
    for req in list(runtime.scheduler.running):
        runtime.abort(req.uid)
    while runtime.has_work():
        runtime.step()


def measure(runtime: Runtime, batch: int) -> str:
    torch.cuda.synchronize()
    steps = 30
    started = time.perf_counter()
    for _ in range(steps):
        runtime.step()
    torch.cuda.synchronize()
    step_ms = 1000 * (time.perf_counter() - started) / steps
    engine = runtime.model_runner
    graphs = engine.graphs
    assert graphs is not None
    size = min(s for s in graphs.batch_sizes if s >= batch)
    graph_ms = device_ms(graphs.graphs[size].replay)
    logits = graphs.logits[size][:batch]
    requests = list(runtime.scheduler.running)[:batch]
    sample_ms = device_ms(lambda: sample(logits, requests, engine.generator))
    return (
        f"batch {batch:4d} (graph {size:4d}): step {step_ms:6.2f} ms wall | graph replay {graph_ms:6.2f} ms | "
        f"sampling {sample_ms:5.2f} ms | rest {step_ms - graph_ms - sample_ms:5.2f} ms"
    )


def profile_graph(runtime: Runtime, batch: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    graphs = runtime.model_runner.graphs
    assert graphs is not None
    size = min(s for s in graphs.batch_sizes if s >= batch)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graphs.graphs[size].replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=80))


def profile_prefill(runtime: Runtime, prompts: int, context: int, rows: int) -> None:
    """One warm-up prefill step, then one profiled: where a compute-bound prefill step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    def prefill_step(seed: int) -> float:
        rng = random.Random(seed)
        for _ in range(prompts):
            prompt = [rng.randrange(10000) for _ in range(context)]
            runtime.add_request(prompt, SamplingParams(temperature=0.6, max_tokens=4, ignore_eos=True))
        torch.cuda.synchronize()
        started = time.perf_counter()
        runtime.step()
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - started)

    print(f"warm-up prefill step: {prefill_step(0):.1f} ms wall", flush=True)
    clear(runtime)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        print(f"profiled prefill step: {prefill_step(1):.1f} ms wall", flush=True)
    clear(runtime)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=80))


def trace_steps(runtime: Runtime, batch: int, path: str, rows: int) -> None:
    """Profile a few whole steps (host and device) at this batch size: the host-side table shows any call
    that waits for the device, and the Chrome trace (gzipped) shows the device's idle gaps."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    bring_to_decode(runtime, batch, 800, seed=7)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            runtime.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    # The same steps by device time: everything the device ran, the graph's kernels and those outside it.
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    prof.export_chrome_trace(path)
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    clear(runtime)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--batches", default="1,32,128,256")
    parser.add_argument("--context", type=int, default=800)
    parser.add_argument("--profile", type=int, default=0, help="profile graph replays at this batch size")
    parser.add_argument(
        "--prefill-profile", type=int, default=0, help="profile one prefill step of N prompts"
    )
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", type=int, default=0, help="trace whole steps at this batch size")
    parser.add_argument("--trace-file", default="decode_trace.json")
    # The engine's flags, but for random weights and the context every batch here fits in.
    engine_flags = add_engine_flags(
        parser.add_argument_group("engine"), exclude=("load_format", "max_seq_len")
    )
    parser.set_defaults(page_size=1)
    args = parser.parse_args()
    options = {name: getattr(args, name) for name in engine_flags}
    llm = LLM(args.model, load_format="dummy", max_seq_len=4096, **options)
    runtime = llm.runtime
    if args.prefill_profile:
        profile_prefill(runtime, args.prefill_profile, args.context, args.rows)
    for i, batch in enumerate(int(b) for b in args.batches.split(",") if b):
        bring_to_decode(runtime, batch, args.context, seed=i)
        print(measure(runtime, batch), flush=True)
        clear(runtime)
    if args.trace:
        trace_steps(runtime, args.trace, args.trace_file, args.rows)
    if args.profile:
        bring_to_decode(runtime, args.profile, args.context, seed=99)
        profile_graph(runtime, args.profile, args.rows)


if __name__ == "__main__":
    main()

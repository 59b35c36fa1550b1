"""Micro-benchmark of the kernels on the GPU: `python -m minisgl.kernels.bench [--json PATH]`.

Reports the KV store and the row gather as bandwidth (bytes read + written per second), as a fraction of
the device's measured copy bandwidth (a plain device-to-device `copy_`, counted the same way), and as a
speedup over the plain torch equivalents (`index_put_` for the KV store, `F.embedding` for the gather).

Each op is captured `--reps` times into one CUDA graph and the graph replayed: the timings are GPU time
per call (CUDA events, median over `--iters` replays after warm-up) without Python's launch overhead,
which the `eager us` column shows separately (host time per call, synchronizing once at the end).
Shapes follow Qwen3-8B / Llama-3.1-8B in bf16: 8 KV heads of 128 (2 KiB per token for K and for V),
hidden 4096, vocab 151936; K and V are strided views of a fused qkv output, slots a random permutation.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from minisgl.kernels import device_info, gather_rows, reference, store_kv
from minisgl.kernels.prefix import first_mismatch

BATCHES = (1, 16, 128, 1024, 8192, 32768)
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
HIDDEN, VOCAB = 4096, 151936
NUM_SLOTS = 1 << 18  # 512 MiB per cache in bf16


@dataclass
class Row:
    op: str
    batch: int
    bytes: int
    kernel_us: float
    torch_us: float
    eager_us: float
    torch_eager_us: float

    def bandwidth(self) -> float:
        return self.bytes / (self.kernel_us * 1e-6)


def gpu_time_us(fn: Callable[[], object], reps: int, iters: int) -> float:
    """Median GPU time of one call, from a CUDA graph of `reps` calls replayed `iters` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside capture: builds, allocator, lazy init
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run: Callable[[], object] = graph.replay
    except RuntimeError as error:  # an op that cannot be captured: time back-to-back eager calls instead
        print(f"warning: timing {fn} without a CUDA graph: {error}", file=sys.stderr)
        torch.cuda.synchronize()

        def run() -> None:
            for _ in range(reps):
                fn()

    for _ in range(3):
        run()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del graph, run
    return statistics.median(times)


def eager_time_us(fn: Callable[[], object], calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / calls


def copy_bandwidths(iters: int) -> dict[str, float]:
    """Bytes read + written per second by large device-to-device copies (`copy_`, i.e. cudaMemcpyAsync).

    Several sizes, after a warm-up that brings the clocks up; the benchmark's reference is the best.
    """
    result = {}
    for mib in (256, 1024):
        src = torch.randn(mib << 19, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            dst.copy_(src)
        torch.cuda.synchronize()
        us = gpu_time_us(functools.partial(dst.copy_, src), reps=5, iters=iters)
        result[f"copy_ {mib} MiB"] = 2 * src.nbytes / (us * 1e-6)
        del src, dst
    return result


def bench_store_kv(batches: tuple[int, ...], reps: int, iters: int) -> list[Row]:
    k_cache = torch.randn(NUM_SLOTS, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    row_bytes = KV_HEADS * HEAD_DIM * k_cache.element_size()
    rows = []
    for batch in batches:
        qkv = torch.randn(batch, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = qkv[:, Q_HEADS * HEAD_DIM : (Q_HEADS + KV_HEADS) * HEAD_DIM].view(batch, KV_HEADS, HEAD_DIM)
        v = qkv[:, (Q_HEADS + KV_HEADS) * HEAD_DIM :].view(batch, KV_HEADS, HEAD_DIM)
        slots = torch.randperm(NUM_SLOTS, device="cuda")[:batch].to(torch.int32)
        slots_long = slots.long()

        def kernel(k: torch.Tensor = k, v: torch.Tensor = v, slots: torch.Tensor = slots) -> None:
            store_kv(k_cache, v_cache, k, v, slots)

        def plain(k: torch.Tensor = k, v: torch.Tensor = v, index: torch.Tensor = slots_long) -> None:
            k_cache[index] = k
            v_cache[index] = v

        moved = 2 * 2 * batch * row_bytes + slots.nbytes  # K and V rows, each read and written
        rows.append(
            Row(
                "store_kv",
                batch,
                moved,
                gpu_time_us(kernel, reps, iters),
                gpu_time_us(plain, reps, iters),
                eager_time_us(kernel),
                eager_time_us(plain),
            )
        )
    return rows


def bench_gather(batches: tuple[int, ...], reps: int, iters: int) -> list[Row]:
    table = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16)
    row_bytes = HIDDEN * table.element_size()
    rows = []
    for batch in batches:
        ids = torch.randint(0, VOCAB, (batch,), device="cuda", dtype=torch.int32)
        out = torch.empty(batch, HIDDEN, device="cuda", dtype=table.dtype)
        ids_long = ids.long()

        def kernel(ids: torch.Tensor = ids, out: torch.Tensor = out) -> None:
            gather_rows(table, ids, 0, VOCAB, out=out)

        def plain(ids: torch.Tensor = ids_long) -> None:
            F.embedding(ids, table)

        moved = 2 * batch * row_bytes + ids.nbytes
        rows.append(
            Row(
                "gather_rows",
                batch,
                moved,
                gpu_time_us(kernel, reps, iters),
                gpu_time_us(plain, reps, iters),
                eager_time_us(kernel),
                eager_time_us(plain),
            )
        )
    return rows


def sweep_lanes(batch: int, reps: int, iters: int) -> list[tuple[str, int, float]]:
    """GPU us per call of each kernel at one batch for each forced lanes_per_row (0: the automatic pick)."""
    from minisgl.kernels._dispatch import cuda_ops

    ops = cuda_ops(torch.cuda.current_device())
    k_cache = torch.randn(NUM_SLOTS, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    qkv = torch.randn(batch, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = qkv[:, Q_HEADS * HEAD_DIM : (Q_HEADS + KV_HEADS) * HEAD_DIM].view(batch, KV_HEADS, HEAD_DIM)
    v = qkv[:, (Q_HEADS + KV_HEADS) * HEAD_DIM :].view(batch, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(NUM_SLOTS, device="cuda")[:batch].to(torch.int32)
    results = []
    for lanes in (0, 4, 8, 16, 32, 64, 128, 256):
        us = gpu_time_us(functools.partial(ops.store_kv, k_cache, v_cache, k, v, slots, lanes), reps, iters)
        results.append(("store_kv", lanes, us))
    table = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (batch,), device="cuda", dtype=torch.int32)
    out = torch.empty(batch, HIDDEN, device="cuda", dtype=table.dtype)
    for lanes in (0, 16, 32, 64, 128, 256):
        us = gpu_time_us(functools.partial(ops.gather_rows, table, ids, out, 0, VOCAB, lanes), reps, iters)
        results.append(("gather_rows", lanes, us))
    return results


def bench_prefix(length: int = 1024, calls: int = 2000) -> dict[str, float]:
    """CPU: the C++ prefix compare against the torch reference, arrays equal but for the last token."""
    a = torch.arange(length, dtype=torch.int32)
    b = a.clone()
    b[-1] = -1
    result = {}
    for name, fn in (("cpp_us", first_mismatch), ("torch_us", reference.first_mismatch)):
        fn(a, b)
        start = time.perf_counter()
        for _ in range(calls):
            fn(a, b)
        result[name] = (time.perf_counter() - start) * 1e6 / calls
    return result


def render(rows: list[Row], copy_bw: float) -> str:
    lines = [
        "| op | batch | MB moved | kernel us | GB/s | % of copy | torch us | speedup | eager us | torch eager us |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.op} | {row.batch} | {row.bytes / 1e6:.2f} | {row.kernel_us:.2f} | "
            f"{row.bandwidth() / 1e9:.0f} | {100 * row.bandwidth() / copy_bw:.0f}% | {row.torch_us:.2f} | "
            f"{row.torch_us / row.kernel_us:.2f}x | {row.eager_us:.1f} | {row.torch_eager_us:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m minisgl.kernels.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="tokens per call")
    parser.add_argument("--reps", type=int, default=20, help="calls captured per CUDA graph")
    parser.add_argument("--iters", type=int, default=30, help="timed graph replays (median reported)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--sweep", action="store_true", help="also time each lanes-per-row choice")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmark needs a CUDA device")

    info = device_info()
    copies = copy_bandwidths(args.iters)
    batches = tuple(args.batches)
    rows = bench_store_kv(batches, args.reps, args.iters) + bench_gather(batches, args.reps, args.iters)
    sweep = sweep_lanes(max(batches), args.reps, args.iters) if args.sweep else []
    copies |= {f"{name} (again)": bw for name, bw in copy_bandwidths(args.iters).items()}
    copy_bw = max(copies.values())
    prefix = bench_prefix()
    print(f"device: {info.name} ({info.target}, {info.sm_count} SMs), torch {torch.__version__}")
    print(
        "copy bandwidth (read + write): " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in copies.items())
    )
    print(render(rows, copy_bw))
    if sweep:
        print(
            f"lanes per row at batch {max(batches)} (0 = automatic): "
            + ", ".join(f"{op} {lanes}: {us:.1f} us" for op, lanes, us in sweep)
        )
    print(
        f"prefix compare (CPU, 1024 tokens): C++ {prefix['cpp_us']:.2f} us, torch {prefix['torch_us']:.2f} us"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": asdict(info),
                    "torch": torch.__version__,
                    "copy_bandwidths": copies,
                    "copy_bandwidth": copy_bw,
                    "rows": [asdict(row) | {"bandwidth": row.bandwidth()} for row in rows],
                    "lanes_sweep": sweep,
                    "prefix": prefix,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()

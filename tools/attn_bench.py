"""Decode-attention kernels on the engine's shapes, on one GPU: read bandwidth and agreement with a float32
torch reference. For choosing the decode backend (performance work, not a test).

    python tools/attn_bench.py [--batch 128] [--min-len 400] [--max-len 1600] [--variants fi_p1,xqa_p16]
                               [--kv-dtype fp8_e4m3]

KV caches are one layer of the engine's pool layout (pages, page_size, kv_heads, head_dim), with each
request's pages scattered at random over the pool, as decode leaves them. Bandwidth counts the K and V
bytes each request reads once; times are medians of CUDA-graph replays (20 calls per graph).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

WORKSPACE = 256 << 20
Key = tuple[tuple[int, int], str]  # ((query heads, KV heads), variant name)


@dataclass
class Case:
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    kv_lens: list[int]
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor  # (batch, max_pages) int32

    @property
    def kv_bytes(self) -> int:
        return 2 * sum(self.kv_lens) * self.num_kv_heads * self.head_dim * self.k_cache.element_size()


def make_case(
    qo: int, kv: int, d: int, page_size: int, kv_lens: list[int], seed: int, kv_dtype: torch.dtype
) -> Case:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pages_per = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages_per) + 8
    order = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    table = torch.zeros(len(kv_lens), max(pages_per), dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(pages_per):
        table[i, :n] = order[start : start + n]
        start += n
    shape = (num_pages, page_size, kv, d)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(len(kv_lens), qo, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    return Case(qo, kv, d, page_size, kv_lens, q, k.to(kv_dtype), v.to(kv_dtype), table)


def reference(case: Case) -> torch.Tensor:
    out = torch.empty_like(case.q, dtype=torch.float32)
    group = case.num_qo_heads // case.num_kv_heads
    for i, n in enumerate(case.kv_lens):
        pages = case.page_table[i, : -(-n // case.page_size)].long()
        k = case.k_cache[pages].flatten(0, 1)[:n].float()  # (n, kv, d)
        v = case.v_cache[pages].flatten(0, 1)[:n].float()
        q = case.q[i].float().view(case.num_kv_heads, group, case.head_dim)
        scores = torch.einsum("hgd,nhd->hgn", q, k) / math.sqrt(case.head_dim)
        out[i] = torch.einsum("hgn,nhd->hgd", scores.softmax(-1), v).reshape(-1, case.head_dim)
    return out


def paged_index(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's page list of the case: page-count prefix sums (host), page ids, last-page lengths."""
    counts = [-(-n // case.page_size) for n in case.kv_lens]
    indptr = torch.tensor(list(itertools.accumulate(counts, initial=0)), dtype=torch.int32)
    indices = torch.cat([case.page_table[i, :c] for i, c in enumerate(counts)])
    last = torch.tensor([(n - 1) % case.page_size + 1 for n in case.kv_lens], dtype=torch.int32)
    return indptr, indices, last


def flashinfer_decode(case: Case, tensor_cores: bool, backend: str) -> Callable[[], torch.Tensor]:
    import flashinfer

    workspace = torch.zeros(WORKSPACE, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_tensor_cores=tensor_cores, backend=backend
    )
    indptr, indices, last = paged_index(case)
    wrapper.plan(
        indptr,
        indices,
        last,
        case.num_qo_heads,
        case.num_kv_heads,
        case.head_dim,
        case.page_size,
        q_data_type=torch.bfloat16,
        kv_data_type=case.k_cache.dtype,
    )
    return lambda: wrapper.run(case.q, (case.k_cache, case.v_cache))


def flashinfer_prefill(case: Case, backend: str) -> Callable[[], torch.Tensor]:
    """Whole prompts (queries = every token, causal), as a prefill batch of the workload."""
    import flashinfer

    workspace = torch.zeros(WORKSPACE, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    qo_indptr = torch.tensor(list(itertools.accumulate(case.kv_lens, initial=0)), dtype=torch.int32)
    indptr, indices, last = paged_index(case)
    wrapper.plan(
        qo_indptr,
        indptr,
        indices,
        last,
        case.num_qo_heads,
        case.num_kv_heads,
        case.head_dim,
        case.page_size,
        causal=True,
        q_data_type=torch.bfloat16,
        kv_data_type=case.k_cache.dtype,
    )
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(sum(case.kv_lens), case.num_qo_heads, case.head_dim, device="cuda", generator=gen)
    q = q.to(torch.bfloat16)
    return lambda: wrapper.run(q, (case.k_cache, case.v_cache))


def xqa_decode(case: Case) -> Callable[[], torch.Tensor]:
    from flashinfer.decode import trtllm_batch_decode_with_kv_cache

    workspace = torch.zeros(WORKSPACE, dtype=torch.uint8, device="cuda")
    seq_lens = torch.tensor(case.kv_lens, dtype=torch.int32, device="cuda").view(torch.uint32)
    max_len = case.page_table.shape[1] * case.page_size
    return lambda: trtllm_batch_decode_with_kv_cache(
        case.q,
        (case.k_cache, case.v_cache),
        workspace,
        case.page_table,
        seq_lens,
        max_len,
        bmm1_scale=1.0 / math.sqrt(case.head_dim),
        bmm2_scale=1.0,
        kv_layout="NHD",
        backend="xqa",
    )


VARIANTS: dict[str, tuple[int, Callable[[Case], Callable[[], torch.Tensor]]]] = {
    # name: (page size, builder)
    "fi_p1": (1, lambda c: flashinfer_decode(c, False, "auto")),
    "fi_p16": (16, lambda c: flashinfer_decode(c, False, "auto")),
    "fi_tc_p16": (16, lambda c: flashinfer_decode(c, True, "fa2")),
    "fa3_p1": (1, lambda c: flashinfer_decode(c, True, "fa3")),
    "fa3_p16": (16, lambda c: flashinfer_decode(c, True, "fa3")),
    "xqa_p16": (16, xqa_decode),
    "xqa_p64": (64, xqa_decode),
    "prefill_fa2_p1": (1, lambda c: flashinfer_prefill(c, "fa2")),
    "prefill_fa3_p1": (1, lambda c: flashinfer_prefill(c, "fa3")),
    "prefill_fa2_p16": (16, lambda c: flashinfer_prefill(c, "fa2")),
    "prefill_fa3_p16": (16, lambda c: flashinfer_prefill(c, "fa3")),
}


def time_graph(fn: Callable[[], torch.Tensor], calls: int = 20, replays: int = 15) -> float:
    """Median seconds per call over CUDA-graph replays of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=400)
    parser.add_argument("--max-len", type=int, default=1600)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shapes", default="16/8,32/8", help="query heads/KV heads, comma separated")
    parser.add_argument("--kv-dtype", choices=["bf16", "fp8_e4m3"], default="bf16")
    args = parser.parse_args()
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8_e4m3" else torch.bfloat16
    rng = torch.Generator().manual_seed(0)
    kv_lens = torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=rng).tolist()
    names = args.variants.split(",")
    shapes = [(int(s.split("/")[0]), int(s.split("/")[1])) for s in args.shapes.split(",")]
    cases: dict[Key, Case] = {
        (s, n): make_case(s[0], s[1], 128, VARIANTS[n][0], kv_lens, seed=1, kv_dtype=kv_dtype)
        for s in shapes
        for n in names
    }

    # Build (JIT-compile) every variant first, in parallel: compiling is most of a first call's cost.
    def build(key: Key) -> tuple[Key, Callable[[], torch.Tensor] | str, float]:
        started = time.perf_counter()
        try:
            fn = VARIANTS[key[1]][1](cases[key])
            fn()
            torch.cuda.synchronize()
            return key, fn, time.perf_counter() - started
        except Exception as exc:  # report and go on with the others
            return key, f"{type(exc).__name__}: {str(exc)[:200]}", time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=8) as pool:
        built = {key: (fn, secs) for key, fn, secs in pool.map(build, list(cases))}
    rows = []
    for key, (fn, build_seconds) in built.items():
        (qo, kv), name = key
        case = cases[key]
        if isinstance(fn, str):
            rows.append(f"{qo}/{kv} {name:10s} FAILED after {build_seconds:.0f} s: {fn}")
            continue
        seconds = time_graph(fn)
        if name.startswith("prefill"):
            flops = sum(2 * n * n * qo * case.head_dim for n in case.kv_lens)  # causal: half of 4 n^2 h d
            rows.append(
                f"{qo}/{kv} {name:16s} {1e6 * seconds:8.1f} us  {flops / seconds / 1e12:6.1f} TFLOP/s  "
                f"build {build_seconds:5.1f} s"
            )
            continue
        out = fn().float().reshape(case.q.shape)
        ref = reference(case)
        rel = ((out - ref).norm() / ref.norm()).item()
        rows.append(
            f"{qo}/{kv} {name:16s} {1e6 * seconds:8.1f} us  {case.kv_bytes / seconds / 1e12:5.2f} TB/s  "
            f"rel.err {rel:.1e}  build {build_seconds:5.1f} s"
        )
    print(
        f"batch {args.batch}, kv lens uniform in [{args.min_len}, {args.max_len}], head_dim 128, KV {args.kv_dtype}"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()

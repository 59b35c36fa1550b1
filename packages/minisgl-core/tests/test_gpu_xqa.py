"""The `xqa` decode backend (FlashInfer's XQA kernels) on a Hopper or Blackwell GPU (skipped elsewhere).

Kernel level: XQABackend over a paged pool with Qwen3-8B's attention (32 query / 8 KV heads, head_dim 128,
pages of 16, each request's pages scattered over the pool, stale page-table entries past each length)
against the torch backend in float32 over the same (dequantized) cache, eagerly and replayed from a CUDA
graph whose padding rows must read only the dummy page. FP8 layers use scales other than 1.0, so a scale
that is dropped or applied twice shows. Stated bounds, relative error |out - ref| / |ref|: bf16 cache
<= 0.01; FP8 cache <= 0.08 (XQA rounds the queries and softmax weights to FP8 too: 3.6e-2 measured by
tools/attn_bench.py on the H200).

Engine level: the Llama shape of test_gpu_engine.py (4 query heads per KV head, head_dim 128: the same
XQA kernels as Qwen3-8B) with attn="fi,xqa", overlap on, graphs on and off, against transformers in
float32 on the same bf16 weights. bf16 cache: test_gpu_engine.py's bf16 bounds, with greedy agreement
>= 0.9 (measured on the H200, 2026-12-03: max 0.24 / mean 0.051 / agreement 0.918). FP8 cache: max
|dlogprob| <= 2.5, mean <= 0.55, greedy agreement >= 0.5 (measured: max 1.91-1.92 / mean 0.38-0.44 /
agreement 0.59-0.65; FlashInfer's FA2 over the same FP8 cache: max 1.50-1.54 / mean 0.32-0.34 / agreement
0.62-0.70: XQA's FP8 queries and softmax weights add about a third to the cache's own rounding on this
shape, whose unnormalised keys make attention very peaked). And kv_accuracy's comparison of the same
engine pair the benchmarks use: fi,xqa over FP8 against fi over bf16: teacher-forced greedy agreement
>= 0.55 (measured 0.645); mean |dlogprob| <= 0.45 (measured 0.345), teacher-forced (prefill) and in the
decode steps before the greedy outputs first differ (XQA's part).
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_gpu_engine import _check_generated_logprobs, _configs, _engine, cuda_reference, save_random_bf16

from minisgl.core.attention import BatchLayout
from minisgl.core.attention.torch_backend import TorchAttentionBackend
from minisgl.core.attention.xqa_backend import XQA_GPU_MAJORS, XQABackend
from minisgl.core.kv.kv_pool import KVPool
from minisgl.kernels.reference import dequantize_kv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in XQA_GPU_MAJORS,
        reason="needs a Hopper or Blackwell GPU",
    ),
]

FP8 = torch.float8_e4m3fn
NUM_QO, NUM_KV, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
NUM_PAGES, MAX_PAGES, GRAPH_BS = 1024, 64, 16
K_SCALES, V_SCALES = [0.5, 0.0625], [2.0, 0.125]  # per layer, for the FP8 pool
KERNEL_BOUNDS = {torch.bfloat16: 0.01, FP8: 0.08}
XQA_FP8_BOUNDS = (2.5, 0.55, 0.5)
XQA_BF16_BOUNDS = (0.35, 0.06, 0.9)
ACCURACY_MIN_AGREEMENT, ACCURACY_MAX_MEAN = 0.55, 0.45


def _pool(kv_dtype: torch.dtype) -> KVPool:
    """Two layers of random K and V, through the engine's store (quantized in an FP8 pool); the last page
    is the dummy page."""
    pool = KVPool(2, NUM_PAGES + 1, PAGE_SIZE, NUM_KV, HEAD_DIM, kv_dtype, torch.device("cuda"))
    if kv_dtype == FP8:
        pool.set_scales(K_SCALES, V_SCALES)
    gen = torch.Generator(device="cuda").manual_seed(0)
    slots = torch.arange((NUM_PAGES + 1) * PAGE_SIZE, device="cuda")
    for layer in range(2):
        k, v = (
            torch.randn(len(slots), NUM_KV, HEAD_DIM, device="cuda", generator=gen).bfloat16()
            for _ in range(2)
        )
        pool.store(layer, slots, k, v)
    return pool


def _decode_layout(kv_lens: list[int], seed: int) -> BatchLayout:
    """A decode batch whose requests own distinct random pages; entries past each request's pages hold
    other (stale) pages, as rows reused by the engine do."""
    rng = random.Random(seed)
    free = rng.sample(range(NUM_PAGES), NUM_PAGES)
    rows = []
    for n in kv_lens:
        count = -(-n // PAGE_SIZE)
        own, free = free[:count], free[count:]
        rows.append(own + [rng.randrange(NUM_PAGES) for _ in range(MAX_PAGES - count)])
    batch = len(kv_lens)
    return BatchLayout(
        positions=torch.tensor([n - 1 for n in kv_lens], device="cuda"),
        out_slots=torch.zeros(batch, dtype=torch.int64, device="cuda"),
        query_starts=torch.arange(batch + 1, device="cuda"),
        kv_lens=torch.tensor(kv_lens, device="cuda"),
        page_table=torch.tensor(rows, dtype=torch.int32, device="cuda"),
        query_lens_host=[1] * batch,
        kv_lens_host=kv_lens,
        is_decode=True,
    )


def _queries(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(batch, NUM_QO, HEAD_DIM, device="cuda", generator=gen).bfloat16()


def _reference(q: torch.Tensor, layer: int, pool: KVPool, layout: BatchLayout) -> torch.Tensor:
    """The torch backend in float32 over the dequantized cache."""
    torch_backend = TorchAttentionBackend()
    return torch_backend.forward(q.float(), layer, pool, torch_backend.prepare(layout, pool))


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def _lengths(batch: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([1, 2, 15, 16, 17, 64, 65]) if i < 4 else rng.randint(1, 1000) for i in range(batch)]


@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16], ids=["fp8", "bf16"])
def test_xqa_matches_torch_attention_eagerly(kv_dtype: torch.dtype) -> None:
    pool = _pool(kv_dtype)
    backend = XQABackend(HEAD_DIM, torch.bfloat16, kv_dtype, torch.device("cuda"), PAGE_SIZE)
    layout = _decode_layout(_lengths(13, seed=1), seed=1)
    q = _queries(13, seed=1)
    for layer in range(2):
        out = backend.forward(q, layer, pool, backend.prepare(layout, pool))
        error = _relative_error(out, _reference(q, layer, pool, layout))
        print(f"xqa eager {kv_dtype} layer {layer}: relative error {error:.2e}")
        assert error <= KERNEL_BOUNDS[kv_dtype]


def _capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16], ids=["fp8", "bf16"])
def test_xqa_in_a_cuda_graph_with_padding_rows(kv_dtype: torch.dtype) -> None:
    """One graph of GRAPH_BS rows, loaded with batches of 13 and then 5 requests: the real rows match the
    reference, and each padding row attends to the one token of the dummy page (its output is that V)."""
    pool = _pool(kv_dtype)
    backend = XQABackend(HEAD_DIM, torch.bfloat16, kv_dtype, torch.device("cuda"), PAGE_SIZE)
    dummy = NUM_PAGES
    graph_attention = backend.graph_attention(pool, GRAPH_BS, MAX_PAGES, dummy)
    metadata = graph_attention.metadata(GRAPH_BS)
    q_static = torch.zeros(GRAPH_BS, NUM_QO, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    layer = 1
    graph, out = _capture(lambda: backend.forward(q_static, layer, pool, metadata))
    dummy_v = dequantize_kv(pool.v_cache(layer)[dummy, 0], torch.float32, pool.v_scales[layer])
    padding_out = dummy_v.repeat_interleave(NUM_QO // NUM_KV, dim=0).flatten()
    for real, seed in ((13, 2), (5, 3)):
        layout = _decode_layout(_lengths(real, seed), seed)
        q = _queries(real, seed)
        graph_attention.load(GRAPH_BS, layout)
        q_static[:real].copy_(q)
        q_static[real:].copy_(_queries(GRAPH_BS - real, seed + 100))
        graph.replay()
        error = _relative_error(out[:real], _reference(q, layer, pool, layout))
        padding_error = _relative_error(out[real:], padding_out.expand(GRAPH_BS - real, -1))
        print(
            f"xqa graph {kv_dtype} {real} rows: relative error {error:.2e}, padding rows {padding_error:.2e}"
        )
        assert error <= KERNEL_BOUNDS[kv_dtype] and padding_error <= KERNEL_BOUNDS[kv_dtype]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_bf16(_configs()["llama"], tmp_path_factory.mktemp("llama-xqa"))


@pytest.fixture(scope="module")
def float32_reference(llama_dir: Path) -> Iterator[object]:
    yield from cuda_reference(llama_dir, torch.float32)


ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "xqa-fp8+graphs": {"kv_cache_dtype": "fp8_e4m3"},
    "xqa-fp8-no-graphs": {"kv_cache_dtype": "fp8_e4m3", "cuda_graph_max_bs": 0},
    "xqa-fp8-chunked+graphs": {"kv_cache_dtype": "fp8_e4m3", "max_prefill_tokens": 64},
    "xqa-bf16+graphs": {"kv_cache_dtype": "auto"},
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_engine_with_xqa_decode_matches_transformers(
    llama_dir: Path, float32_reference: object, variant: str
) -> None:
    options = ENGINE_VARIANTS[variant]
    llm = _engine(llama_dir, attn="fi,xqa", page_size=PAGE_SIZE, **options)
    assert llm.runtime.max_in_flight == 2  # overlap scheduling on
    assert (llm.runtime.model_runner.graphs is not None) == (options.get("cuda_graph_max_bs") != 0)
    if options["kv_cache_dtype"] == "fp8_e4m3":
        _check_generated_logprobs(llm, float32_reference, variant, XQA_FP8_BOUNDS)
    else:
        _check_generated_logprobs(llm, float32_reference, variant, XQA_BF16_BOUNDS)
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def test_accuracy_tool_prices_xqa_fp8_against_the_bf16_cache(llama_dir: Path) -> None:
    from minisgl.core.kv_accuracy import measure

    result = measure(
        str(llama_dir),
        "fp8_e4m3",
        num_prompts=8,
        prompt_len=200,
        gen_len=32,
        reference_attn="fi",
        attn="fi,xqa",
        device="cuda",
        dtype="bfloat16",
        page_size=PAGE_SIZE,
        num_kv_pages=2048,
        max_seq_len=256,
        cuda_graph_max_bs=16,
    )
    print(f"kv_accuracy fi,xqa fp8 against fi bf16: {result}")
    assert result.decode_positions > 0 and not math.isnan(result.decode_mean_logprob_diff)
    assert result.greedy_agreement >= ACCURACY_MIN_AGREEMENT
    assert max(result.mean_logprob_diff, result.decode_mean_logprob_diff) <= ACCURACY_MAX_MEAN

"""The CUDA kernels against their torch references: fresh random inputs, poisoned outputs, many shapes.

Outputs start as NaN ("poison") so a byte the kernel forgets to write shows up, and results are compared
bit for bit with the reference run on a copy of the same poisoned buffers.
"""

from __future__ import annotations

import time

import pytest
import torch

from minisgl.kernels import device_info, gather_rows, jit, reference, rope_store, store_kv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nox -s gpu)"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(bits(actual), bits(expected)), (actual - expected).abs().nan_to_num(1e9).max()


def test_device_info_on_the_gpu() -> None:
    info = device_info()
    props = torch.cuda.get_device_properties(0)
    assert info.capability == (props.major, props.minor) and info.sm_count == props.multi_processor_count
    assert info.supports_kernels and "torch" in info.attention_backends
    if info.capability == (9, 0):
        assert info.target == "sm_90a" and info.attention_backends == ("torch", "fi", "fa3")


def test_kernels_build_for_the_device_arch() -> None:
    from minisgl.kernels._dispatch import CUDA_MODULE, cuda_ops

    start = time.perf_counter()
    cuda_ops(0)
    elapsed = time.perf_counter() - start
    target = device_info().target
    assert (jit.cache_dir(target) / CUDA_MODULE / f"{CUDA_MODULE}.so").is_file()
    print(f"cuda module ready for {target} in {elapsed:.1f} s")


def _kv(
    num_tokens: int, heads: int, head_dim: int, dtype: torch.dtype, fused: bool, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if not fused:
        k = torch.randn(num_tokens, heads, head_dim, device="cuda", generator=gen).to(dtype)
        v = torch.randn(num_tokens, heads, head_dim, device="cuda", generator=gen).to(dtype)
        return k, v
    # The K and V columns of a fused qkv projection output: strided along tokens.
    q_heads = 2 * heads + 1
    qkv = torch.randn(num_tokens, (q_heads + 2 * heads) * head_dim, device="cuda", generator=gen).to(dtype)
    k = qkv[:, q_heads * head_dim : (q_heads + heads) * head_dim].view(num_tokens, heads, head_dim)
    v = qkv[:, (q_heads + heads) * head_dim :].view(num_tokens, heads, head_dim)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "head_dim"), [(8, 128), (1, 64), (2, 80), (3, 7)])
@pytest.mark.parametrize("num_tokens", [1, 37, 1000])
@pytest.mark.parametrize("fused", [False, True])
def test_store_kv_matches_reference(
    dtype: torch.dtype, heads: int, head_dim: int, num_tokens: int, fused: bool
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(num_tokens * 1000 + heads * 100 + head_dim)
    num_pages, page_size = 80, 16
    k_pool = torch.full((num_pages, page_size, heads, head_dim), float("nan"), device="cuda", dtype=dtype)
    v_pool = torch.full_like(k_pool, float("nan"))
    k_cache, v_cache = k_pool.view(-1, heads, head_dim), v_pool.view(-1, heads, head_dim)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    k, v = _kv(num_tokens, heads, head_dim, dtype, fused, gen)
    slot_dtype = torch.int64 if num_tokens % 2 else torch.int32
    slots = torch.randperm(num_pages * page_size, device="cuda", generator=gen)[:num_tokens].to(slot_dtype)

    store_kv(k_cache, v_cache, k, v, slots)
    reference.store_kv(expected_k, expected_v, k, v, slots)
    assert_same_bits(k_pool.view(-1, heads, head_dim), expected_k)
    assert_same_bits(v_pool.view(-1, heads, head_dim), expected_v)


def test_store_kv_large_batch_int64_slots() -> None:
    gen = torch.Generator(device="cuda").manual_seed(7)
    heads, head_dim, num_tokens, num_slots = 8, 128, 16384, 65536
    k_cache = torch.full((num_slots, heads, head_dim), float("nan"), device="cuda", dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, float("nan"))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    k, v = _kv(num_tokens, heads, head_dim, torch.bfloat16, True, gen)
    slots = torch.randperm(num_slots, device="cuda", generator=gen)[:num_tokens]
    store_kv(k_cache, v_cache, k, v, slots)
    reference.store_kv(expected_k, expected_v, k, v, slots)
    assert_same_bits(k_cache, expected_k)
    assert_same_bits(v_cache, expected_v)


def test_store_kv_casts_to_the_cache_dtype() -> None:
    k_cache = torch.full((8, 2, 4), float("nan"), device="cuda", dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, float("nan"))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(3, 2, 4, device="cuda"), torch.randn(3, 2, 4, device="cuda")
    slots = torch.tensor([1, 5, 2], device="cuda")
    store_kv(k_cache, v_cache, k, v, slots)
    reference.store_kv(expected_k, expected_v, k, v, slots)
    assert_same_bits(k_cache, expected_k)
    assert_same_bits(v_cache, expected_v)


def test_store_kv_rejects_bad_arguments() -> None:
    cache = torch.zeros(8, 2, 4, device="cuda")
    k = torch.zeros(2, 2, 4, device="cuda")
    with pytest.raises(ValueError, match="slots"):
        store_kv(cache, cache.clone(), k, k.clone(), torch.tensor([0, 1, 2], device="cuda"))
    with pytest.raises(TypeError, match="slots"):
        store_kv(cache, cache.clone(), k, k.clone(), torch.tensor([0.0, 1.0], device="cuda"))
    with pytest.raises(ValueError, match="dense"):
        store_kv(
            cache,
            cache.clone(),
            k.transpose(1, 2).contiguous().transpose(1, 2),
            k,
            torch.tensor([0, 1], device="cuda"),
        )


def test_store_kv_in_a_cuda_graph_on_the_current_stream() -> None:
    heads, head_dim, num_tokens = 8, 128, 64
    k_cache = torch.zeros(1024, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k = torch.zeros(num_tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    slots = torch.arange(num_tokens, device="cuda", dtype=torch.int32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as torch's graph docs ask
        store_kv(k_cache, v_cache, k, v, slots)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_kv(k_cache, v_cache, k, v, slots)
    for step in range(3):
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        slots.copy_(torch.randperm(1024, device="cuda")[:num_tokens])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache[slots.long()], k), step
        assert torch.equal(v_cache[slots.long()], v), step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 896, 7])
@pytest.mark.parametrize("id_shape", [(1,), (2, 50), (3000,)])
@pytest.mark.parametrize(("vocab_start", "vocab_end"), [(0, None), (500, 1500), (1000, 1900)])
def test_gather_rows_matches_reference(
    dtype: torch.dtype, hidden: int, id_shape: tuple[int, ...], vocab_start: int, vocab_end: int | None
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(hidden + len(id_shape) + vocab_start)
    rows = 1000
    table = torch.randn(rows, hidden, device="cuda", generator=gen).to(dtype)
    id_dtype = torch.int32 if hidden % 2 else torch.int64
    ids = torch.randint(-5, 2 * rows + 5, id_shape, device="cuda", generator=gen, dtype=id_dtype)
    out = torch.full((*id_shape, hidden), float("nan"), device="cuda", dtype=dtype)
    result = gather_rows(table, ids, vocab_start, vocab_end, out=out)
    assert result is out
    assert_same_bits(out, reference.gather_rows(table, ids, vocab_start, vocab_end))
    assert_same_bits(gather_rows(table, ids, vocab_start, vocab_end), out)


def test_gather_rows_rejects_a_wrong_out() -> None:
    table = torch.zeros(10, 8, device="cuda")
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    with pytest.raises(ValueError, match="out must have shape"):
        gather_rows(table, ids, out=torch.zeros(3, 8, device="cuda"))
    with pytest.raises(ValueError, match="contiguous"):
        gather_rows(table, ids, out=torch.zeros(1, 3, 16, device="cuda")[:, :, :8])


def test_gather_rows_from_a_strided_table() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    wide = torch.randn(600, 1030, device="cuda", generator=gen).to(torch.bfloat16)
    table = wide[:, 3:1027]  # rows dense, misaligned by 6 bytes: a narrower vector path
    ids = torch.randint(0, 600, (257,), device="cuda", generator=gen)
    assert_same_bits(gather_rows(table, ids), reference.gather_rows(table, ids))


def test_gather_rows_inf_rows_are_zeroed_out_of_range() -> None:
    table = torch.tensor([[float("inf"), 1.0], [2.0, float("nan")]], device="cuda")
    ids = torch.tensor([5, 6, 7, 4], device="cuda", dtype=torch.int32)
    out = gather_rows(table, ids, vocab_start=5, vocab_end=7)
    assert_same_bits(out, reference.gather_rows(table, ids, 5, 7))
    assert torch.equal(bits(out[2:]), torch.zeros_like(bits(out[2:])))


@pytest.mark.parametrize("lanes", [1, 4, 32, 256])
def test_forced_lanes_per_row_give_the_same_result(lanes: int) -> None:
    from minisgl.kernels._dispatch import cuda_ops

    ops = cuda_ops(0)
    gen = torch.Generator(device="cuda").manual_seed(lanes)
    k_cache = torch.full((512, 8, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, float("nan"))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    k, v = _kv(100, 8, 128, torch.bfloat16, True, gen)
    slots = torch.randperm(512, device="cuda", generator=gen)[:100]
    ops.store_kv(k_cache, v_cache, k, v, slots, lanes)
    reference.store_kv(expected_k, expected_v, k, v, slots)
    assert_same_bits(k_cache, expected_k)
    assert_same_bits(v_cache, expected_v)

    table = torch.randn(300, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    ids = torch.randint(-10, 400, (77,), device="cuda", generator=gen)
    out = torch.full((77, 4096), float("nan"), device="cuda", dtype=torch.bfloat16)
    ops.gather_rows(table, ids, out, 50, 350, lanes)
    assert_same_bits(out, reference.gather_rows(table, ids, 50, 350))


def test_bad_lanes_per_row_is_refused() -> None:
    from minisgl.kernels._dispatch import cuda_ops

    table = torch.zeros(4, 8, device="cuda")
    out = torch.zeros(2, 8, device="cuda")
    with pytest.raises(ValueError, match="power of two"):
        cuda_ops(0).gather_rows(table, torch.tensor([0, 1], device="cuda"), out, 0, 4, 3)


def _rope_inputs(
    tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, row_pad: int = 0
) -> dict[str, object]:
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width + row_pad, device="cuda", dtype=dtype)[:, :width]  # strided rows
    slots = torch.randperm(4 * tokens + 8, device="cuda")[:tokens]
    freqs = torch.outer(torch.arange(4096.0), 1.0 / (1e6 ** (torch.arange(0, head_dim, 2) / head_dim)))
    return dict(
        qkv=qkv,
        positions=torch.randint(0, 4096, (tokens,), device="cuda"),
        slots=slots,
        cos_sin=torch.cat((freqs.cos(), freqs.sin()), dim=-1).cuda(),
        q_weight=torch.rand(head_dim, device="cuda", dtype=dtype) + 0.5,
        k_weight=torch.rand(head_dim, device="cuda", dtype=dtype) + 0.5,
        eps=1e-6,
        k_cache=torch.full((4 * tokens + 8, kv_heads, head_dim), float("nan"), device="cuda", dtype=dtype),
        v_cache=torch.full((4 * tokens + 8, kv_heads, head_dim), float("nan"), device="cuda", dtype=dtype),
        q_heads=q_heads,
        kv_heads=kv_heads,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"), [(16, 8, 128), (32, 8, 128), (8, 1, 64), (4, 2, 256)]
)
@pytest.mark.parametrize("norm", [True, False])
def test_rope_store_matches_reference(
    dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int, norm: bool
) -> None:
    for tokens in (1, 7, 300):
        args = _rope_inputs(tokens, q_heads, kv_heads, head_dim, dtype, row_pad=8)
        if not norm:
            args.update(q_weight=None, k_weight=None)
        expected_args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        q = rope_store(**args)  # type: ignore[arg-type]
        q_ref = reference.rope_store(**expected_args)  # type: ignore[arg-type]
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(q, q_ref, atol=tolerance, rtol=tolerance)
        for name in ("k_cache", "v_cache"):
            actual, expected = args[name], expected_args[name]
            assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)
            # Rows the kernel must not touch stay NaN in both; written rows agree.
            assert torch.equal(actual.isnan(), expected.isnan())
            torch.testing.assert_close(
                actual.nan_to_num(0.0), expected.nan_to_num(0.0), atol=tolerance, rtol=tolerance
            )


def test_rope_store_in_a_cuda_graph() -> None:
    args = _rope_inputs(32, 16, 8, 128, torch.bfloat16)
    expected_args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    q_ref = reference.rope_store(**expected_args)  # type: ignore[arg-type]
    rope_store(**args)  # type: ignore[arg-type]  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = rope_store(**args)  # type: ignore[arg-type]
    graph.replay()
    torch.testing.assert_close(q, q_ref, atol=2e-2, rtol=2e-2)


def test_rope_store_rejects_bad_arguments() -> None:
    args = _rope_inputs(4, 16, 8, 128, torch.bfloat16)
    with pytest.raises(TypeError, match="int64"):
        rope_store(**{**args, "positions": args["positions"].int()})  # type: ignore[arg-type, union-attr]
    with pytest.raises(ValueError, match="columns"):
        rope_store(**{**args, "q_heads": 8})  # type: ignore[arg-type]


FP8 = torch.float8_e4m3fn


def assert_fp8_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """FP8 caches written by the kernel and by the reference: the float32 math before the rounding may
    differ in the last bit (fused multiply-adds), which can move a value to the neighbouring FP8 number,
    so allow one E4M3 step (1/8 relative) on a few values and demand identity on nearly all."""
    assert actual.dtype == expected.dtype == FP8
    a, b = actual.float(), expected.float()
    assert torch.equal(a.isnan(), b.isnan())
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all(), (a - b).abs().max()
    assert (a == b).float().mean() >= 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(32, 8, 128), (8, 1, 64), (4, 2, 256)])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.02, 0.5)])
def test_rope_store_into_an_fp8_cache_matches_reference(
    dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int, scales: tuple[float, float]
) -> None:
    for tokens in (1, 7, 300):
        args = _rope_inputs(tokens, q_heads, kv_heads, head_dim, dtype, row_pad=8)
        for name in ("k_cache", "v_cache"):
            args[name] = torch.full_like(args[name], float("nan"), dtype=FP8)  # type: ignore[arg-type]
        args["k_scale"], args["v_scale"] = scales
        expected_args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        q = rope_store(**args)  # type: ignore[arg-type]
        q_ref = reference.rope_store(**expected_args)  # type: ignore[arg-type]
        torch.testing.assert_close(q, q_ref, atol=2e-2, rtol=2e-2)
        for name in ("k_cache", "v_cache"):
            assert_fp8_close(args[name], expected_args[name])  # type: ignore[arg-type]


def test_rope_store_into_an_fp8_cache_in_a_cuda_graph() -> None:
    args = _rope_inputs(32, 16, 8, 128, torch.bfloat16)
    for name in ("k_cache", "v_cache"):
        args[name] = torch.zeros_like(args[name], dtype=FP8)  # type: ignore[arg-type]
    args["k_scale"], args["v_scale"] = 0.25, 2.0
    expected_args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    reference.rope_store(**expected_args)  # type: ignore[arg-type]
    rope_store(**args)  # type: ignore[arg-type]  # warm-up outside the capture
    for name in ("k_cache", "v_cache"):
        args[name].zero_()  # type: ignore[union-attr]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope_store(**args)  # type: ignore[arg-type]
    graph.replay()
    for name in ("k_cache", "v_cache"):
        assert_fp8_close(args[name], expected_args[name])  # type: ignore[arg-type]


def test_rope_store_refuses_scales_on_a_half_cache_and_mixed_caches() -> None:
    args = _rope_inputs(4, 16, 8, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="scales"):
        rope_store(**{**args, "k_scale": 0.5})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        rope_store(**{**args, "v_cache": args["v_cache"].to(FP8)})  # type: ignore[arg-type, union-attr]


def test_store_kv_quantizes_into_an_fp8_cache() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    k_cache = torch.zeros(256, 8, 128, device="cuda", dtype=FP8)
    v_cache = torch.zeros_like(k_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    k, v = _kv(37, 8, 128, torch.bfloat16, True, gen)
    slots = torch.randperm(256, device="cuda", generator=gen)[:37]
    store_kv(k_cache, v_cache, k * 100, v, slots, 0.5, 2.0)  # some keys saturate at 448
    reference.store_kv(expected_k, expected_v, k * 100, v, slots, 0.5, 2.0)
    assert_same_bits(k_cache, expected_k)
    assert_same_bits(v_cache, expected_v)

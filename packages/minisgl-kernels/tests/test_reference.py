"""The torch references against plain Python loops."""

from __future__ import annotations

import pytest
import torch

import minisgl.kernels
from minisgl.kernels.reference import (
    FP8_KV_DTYPE,
    dequantize_kv,
    first_mismatch,
    gather_rows,
    quantize_kv,
    rope_store,
    store_kv,
)


def test_version() -> None:
    assert minisgl.kernels.__version__ == "0.1.0"


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_matches_loop(slot_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    num_pages, page_size, heads, head_dim, num_tokens = 6, 4, 2, 8, 9
    # The caches are views of a paged pool, as the engine passes them; writes must land in the pool.
    k_pool = torch.zeros(num_pages, page_size, heads, head_dim)
    v_pool = torch.zeros(num_pages, page_size, heads, head_dim)
    k = torch.randn(num_tokens, heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, heads, head_dim, generator=gen)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens].to(slot_dtype)

    store_kv(k_pool.view(-1, heads, head_dim), v_pool.view(-1, heads, head_dim), k, v, slots)

    k_expected = torch.zeros(num_pages * page_size, heads, head_dim)
    v_expected = torch.zeros(num_pages * page_size, heads, head_dim)
    for i, slot in enumerate(slots.tolist()):
        k_expected[slot] = k[i]
        v_expected[slot] = v[i]
    assert torch.equal(k_pool.view(-1, heads, head_dim), k_expected)
    assert torch.equal(v_pool.view(-1, heads, head_dim), v_expected)


def test_store_kv_casts_to_cache_dtype() -> None:
    k_cache = torch.zeros(4, 1, 2, dtype=torch.bfloat16)
    v_cache = torch.zeros(4, 1, 2, dtype=torch.bfloat16)
    k = torch.full((1, 1, 2), 1.5)
    store_kv(k_cache, v_cache, k, -k, torch.tensor([3]))
    assert k_cache[3].float().tolist() == [[1.5, 1.5]]
    assert v_cache[3].float().tolist() == [[-1.5, -1.5]]
    assert k_cache[:3].abs().sum().item() == 0


def test_store_kv_rejects_bad_shapes() -> None:
    cache = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="expected"):
        store_kv(cache, cache.clone(), torch.zeros(2, 2, 4), torch.zeros(2, 2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slots"):
        store_kv(cache, cache.clone(), torch.zeros(2, 2, 8), torch.zeros(2, 2, 8), torch.tensor([0.0, 1.0]))


def _gather_loop(table: torch.Tensor, ids: list[int], start: int, end: int) -> torch.Tensor:
    out = torch.zeros(len(ids), table.shape[1], dtype=table.dtype)
    for j, token in enumerate(ids):
        if start <= token < end:
            out[j] = table[token - start]
    return out


@pytest.mark.parametrize(("start", "end"), [(0, None), (10, 20), (10, 16), (25, None)])
def test_gather_rows_matches_loop(start: int, end: int | None) -> None:
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(10, 6, generator=gen)
    ids = torch.randint(0, 40, (32,), generator=gen, dtype=torch.int32)
    expected = _gather_loop(table, ids.tolist(), start, start + 10 if end is None else end)
    assert torch.equal(gather_rows(table, ids, start, end), expected)


def test_gather_rows_keeps_id_shape_and_ignores_nonfinite_rows() -> None:
    table = torch.tensor([[float("inf"), 1.0], [2.0, 3.0]])
    ids = torch.tensor([[5, 6], [7, 5]])
    out = gather_rows(table, ids, vocab_start=5, vocab_end=7)
    assert out.shape == (2, 2, 2)
    assert out.tolist() == [[[float("inf"), 1.0], [2.0, 3.0]], [[0.0, 0.0], [float("inf"), 1.0]]]


def test_gather_rows_rejects_range_larger_than_table() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        gather_rows(torch.zeros(4, 2), torch.tensor([0]), vocab_start=0, vocab_end=5)


def _first_mismatch_loop(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def test_first_mismatch_matches_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    for _ in range(200):
        n, m = torch.randint(0, 12, (2,), generator=gen).tolist()
        # A small alphabet makes long common prefixes likely.
        a = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int32)
        b = torch.randint(0, 2, (m,), generator=gen, dtype=torch.int32)
        assert first_mismatch(a, b) == _first_mismatch_loop(a.tolist(), b.tolist())


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([], [], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2], [1, 9, 3], 1), ([4], [5], 0)],
)
def test_first_mismatch_cases(a: list[int], b: list[int], expected: int) -> None:
    assert first_mismatch(torch.tensor(a, dtype=torch.int64), torch.tensor(b, dtype=torch.int64)) == expected


@pytest.mark.gpu
def test_references_agree_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(16, 8, generator=gen)
    ids = torch.randint(0, 24, (40,), generator=gen)
    assert torch.equal(gather_rows(table.cuda(), ids.cuda(), 4, 20).cpu(), gather_rows(table, ids, 4, 20))

    k_cache, v_cache = torch.zeros(32, 2, 4, device="cuda"), torch.zeros(32, 2, 4, device="cuda")
    k, v = torch.randn(5, 2, 4, generator=gen), torch.randn(5, 2, 4, generator=gen)
    slots = torch.tensor([7, 0, 31, 12, 3], dtype=torch.int32)
    store_kv(k_cache, v_cache, k.cuda(), v.cuda(), slots.cuda())
    assert torch.equal(k_cache[slots.long().cuda()].cpu(), k)
    assert torch.equal(v_cache[slots.long().cuda()].cpu(), v)

    a = torch.tensor([1, 2, 3, 4], device="cuda")
    assert first_mismatch(a, torch.tensor([1, 2, 0], device="cuda")) == 2


def test_rope_store_reference_rotates_normalized_heads_and_stores() -> None:
    """Checked against properties, not a second copy of the formula: at position 0 the rotation is the
    identity, so the queries are the RMS-normalized heads; at any position it keeps each (i, i + d/2)
    pair's length; V is stored as is; only the given slots are written."""
    torch.manual_seed(0)
    q_heads, kv_heads, d, tokens = 4, 2, 8, 3
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * d)
    freqs = torch.outer(torch.arange(16.0), 1.0 / (1e4 ** (torch.arange(0, d, 2) / d)))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    weight = torch.rand(d) + 0.5
    k_cache = torch.full((10, kv_heads, d), float("nan"))
    v_cache = torch.full((10, kv_heads, d), float("nan"))
    slots = torch.tensor([7, 2, 5])

    def run(positions: torch.Tensor) -> torch.Tensor:
        return rope_store(
            qkv, positions, slots, cos_sin, weight, weight, 1e-6, k_cache, v_cache, q_heads, kv_heads
        )

    q_heads_in = qkv[:, : q_heads * d].reshape(tokens, q_heads, d)
    normalized = q_heads_in * torch.rsqrt(q_heads_in.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(run(torch.zeros(tokens, dtype=torch.int64)), normalized)
    rotated = run(torch.tensor([3, 9, 15]))
    half = d // 2
    pair_length = lambda x: x[..., :half] ** 2 + x[..., half:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_length(rotated), pair_length(normalized))
    v = qkv[:, (q_heads + kv_heads) * d :].reshape(tokens, kv_heads, d)
    assert torch.equal(v_cache[slots], v)
    untouched = [s for s in range(10) if s not in slots.tolist()]
    assert k_cache[untouched].isnan().all() and not k_cache[slots].isnan().any()


def test_fp8_quantization_rounds_to_nearest_and_saturates() -> None:
    # E4M3: 3 mantissa bits, largest finite 448; 0.3 lies between 0.28125 and 0.3125 (nearer the latter).
    x = torch.tensor([1000.0, -1000.0, 0.3, 1.0, 449.0, 0.0])
    stored = quantize_kv(x, FP8_KV_DTYPE)
    assert stored.dtype == FP8_KV_DTYPE
    assert stored.float().tolist() == [448.0, -448.0, 0.3125, 1.0, 448.0, 0.0]
    # A scale stores x / scale and reads back x * scale: 3.0 at scale 2 is stored as 1.5.
    assert quantize_kv(torch.tensor([3.0]), FP8_KV_DTYPE, 2.0).float().tolist() == [1.5]
    assert (
        dequantize_kv(quantize_kv(torch.tensor([3.0]), FP8_KV_DTYPE, 2.0), torch.float32, 2.0).item() == 3.0
    )
    # Within range the round trip is off by at most half a unit in the last place: 2^-4 relative.
    y = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 50
    back = dequantize_kv(quantize_kv(y, FP8_KV_DTYPE, 0.5), torch.float32, 0.5)
    normal = y.abs() > 2**-6 * 0.5  # E4M3's smallest normal, scaled
    assert ((back - y).abs()[normal] <= y.abs()[normal] * 2**-4).all()


def test_kv_scales_apply_to_fp8_caches_only() -> None:
    with pytest.raises(ValueError, match="KV scale"):
        quantize_kv(torch.ones(2), torch.bfloat16, 0.5)
    assert torch.equal(quantize_kv(torch.ones(2), torch.bfloat16), torch.ones(2, dtype=torch.bfloat16))


def test_store_kv_and_rope_store_quantize_into_an_fp8_cache() -> None:
    """The FP8 cache holds what the float32 cache holds, quantized with the layer's scales."""
    torch.manual_seed(0)
    q_heads, kv_heads, d, tokens = 4, 2, 8, 3
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * d) * 8
    freqs = torch.outer(torch.arange(16.0), 1.0 / (1e4 ** (torch.arange(0, d, 2) / d)))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    slots, positions = torch.tensor([7, 2, 5]), torch.tensor([3, 9, 15])
    caches = {
        dtype: (torch.zeros(10, kv_heads, d, dtype=dtype), torch.zeros(10, kv_heads, d, dtype=dtype))
        for dtype in (torch.float32, FP8_KV_DTYPE)
    }
    outputs = {}
    for dtype, (k_cache, v_cache) in caches.items():
        scales = (0.5, 4.0) if dtype == FP8_KV_DTYPE else (1.0, 1.0)
        outputs[dtype] = rope_store(
            qkv, positions, slots, cos_sin, None, None, 0.0, k_cache, v_cache, q_heads, kv_heads, *scales
        )
    assert torch.equal(outputs[torch.float32], outputs[FP8_KV_DTYPE])  # queries are not quantized
    (k32, v32), (k8, v8) = caches[torch.float32], caches[FP8_KV_DTYPE]
    assert torch.equal(bits8(k8), bits8(quantize_kv(k32, FP8_KV_DTYPE, 0.5)))
    assert torch.equal(bits8(v8), bits8(quantize_kv(v32, FP8_KV_DTYPE, 4.0)))

    k8.zero_(), v8.zero_()
    store_kv(k8, v8, k32[slots], v32[slots], slots, 0.5, 4.0)
    assert torch.equal(bits8(k8), bits8(quantize_kv(k32, FP8_KV_DTYPE, 0.5)))
    assert torch.equal(bits8(v8), bits8(quantize_kv(v32, FP8_KV_DTYPE, 4.0)))


def bits8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)

"""Pure-torch reference implementations of minisgl's kernels.

Each function here defines what its fused kernel must compute. They run on any device, are used where no
compiled kernel is available (CPU, unsupported arch) and are what the kernel tests compare against.
"""

from __future__ import annotations

import torch

# The one quantized KV cache format: FP8 E4M3 (max 448), a per-layer float scale for K and one for V.
FP8_KV_DTYPE = torch.float8_e4m3fn


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """`x` as a cache of `cache_dtype` stores it. A float8 cache holds x / scale, rounded to nearest and
    saturated to the format's largest finite value (the CUDA kernels' conversion does the same; a plain
    cast of an out-of-range value is NaN on some torch versions). Other caches hold x cast, unscaled."""
    if cache_dtype != FP8_KV_DTYPE:
        if scale != 1.0:
            raise ValueError(f"a KV scale ({scale}) applies to {FP8_KV_DTYPE} caches only, not {cache_dtype}")
        return x.to(cache_dtype)
    limit = torch.finfo(cache_dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(cache_dtype)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """The inverse of quantize_kv: cached values as `dtype` (times scale for a float8 cache)."""
    if x.dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write `k[i]` and `v[i]` into row `slots[i]` of `k_cache` and `v_cache`, in place.

    The caches are (num_slots, kv_heads, head_dim) views of the KV pool; `k` and `v` are
    (num_tokens, kv_heads, head_dim); `slots` is a 1-D integer tensor of num_tokens distinct rows.
    Values are stored as `quantize_kv` gives them (k / k_scale and v / v_scale in a float8 cache).
    """
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be a 1-D int32/int64 tensor, got {tuple(slots.shape)} {slots.dtype}")
    for name, cache, new in (("k", k_cache, k), ("v", v_cache, v)):
        if new.shape != (slots.shape[0], *cache.shape[1:]):
            raise ValueError(
                f"{name} has shape {tuple(new.shape)}, expected {(slots.shape[0], *cache.shape[1:])}"
            )
    index = slots.long()
    k_cache[index] = quantize_kv(k, k_cache.dtype, k_scale)
    v_cache[index] = quantize_kv(v, v_cache.dtype, v_scale)


def gather_rows(
    table: torch.Tensor,
    ids: torch.Tensor,
    vocab_start: int = 0,
    vocab_end: int | None = None,
) -> torch.Tensor:
    """Embedding lookup on one vocab shard: row `ids[j] - vocab_start` of `table` for each id.

    `table` holds the rows of the vocab range [vocab_start, vocab_end) (vocab_end defaults to
    vocab_start + len(table)). Ids outside that range give zero rows, so that summing the shards of a
    vocab-parallel embedding over the TP ranks yields the full lookup. The result has shape
    ids.shape + (hidden,).
    """
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D (rows, hidden), got shape {tuple(table.shape)}")
    end = vocab_start + table.shape[0] if vocab_end is None else vocab_end
    if not 0 <= end - vocab_start <= table.shape[0]:
        raise ValueError(f"vocab range [{vocab_start}, {end}) does not fit a table of {table.shape[0]} rows")
    in_range = (ids >= vocab_start) & (ids < end)
    if table.shape[0] == 0:
        return table.new_zeros((*ids.shape, table.shape[1]))
    # Out-of-range ids read row 0 and are zeroed afterwards (masked_fill, not a multiply: inf * 0 is nan).
    local = torch.where(in_range, ids.long() - vocab_start, 0)
    return table[local].masked_fill_(~in_range.unsqueeze(-1), 0)


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    """Index of the first position where two 1-D integer tensors differ, over their common length.

    Returns the common length when the common prefix is identical (the radix cache's match length).
    """
    if a.dim() != 1 or b.dim() != 1:
        raise ValueError(f"expected 1-D tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    n = min(a.shape[0], b.shape[0])
    differs = torch.nonzero(a[:n] != b[:n].to(a.device))
    return int(differs[0, 0]) if differs.numel() else n


def rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Reference of `minisgl.kernels.rope_store`, in float32 and rounded once at the end (K and V as
    `quantize_kv` stores them)."""
    head_dim = k_cache.shape[-1]
    tokens = qkv.shape[0]
    q, k, v = qkv.float().split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(tokens, q_heads, head_dim)
    k = k.reshape(tokens, kv_heads, head_dim)
    if q_weight is not None and k_weight is not None:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * q_weight.float()
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_weight.float()
    cos, sin = cos_sin[positions.long()].float().chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    k_cache[slots.long()] = quantize_kv(rotate(k), k_cache.dtype, k_scale)
    v_cache[slots.long()] = quantize_kv(v.reshape(tokens, kv_heads, head_dim), v_cache.dtype, v_scale)
    return rotate(q).to(qkv.dtype)


_U32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The kernels' 32-bit integer hash ("lowbias32" constants) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x * constant mod 2^32, in two halves so that no int64 product overflows."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _U32


def gumbel_scores(logits: torch.Tensor, inv_temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """The float32 score of every (row, id) that `gumbel_sample` maximizes: logit * inv_temperature -
    log(E) with E = -log(u) (an Exp(1) draw), u a hash of (seed, row, id) on a 2^-23 grid centred in
    (0, 1); rows with inv_temperature <= 0 score their plain logits (greedy)."""
    rows, vocab = logits.shape
    device = logits.device
    seed &= (1 << 64) - 1
    row_ids = torch.arange(rows, dtype=torch.int64, device=device)
    key_a = _mix32((seed & _U32) ^ _mix32(row_ids)).unsqueeze(1)
    key_b = _mix32((seed >> 32) ^ key_a)
    ids = torch.arange(vocab, dtype=torch.int64, device=device).unsqueeze(0)
    hashed = _mix32((_mix32(ids ^ key_a) + key_b) & _U32)
    u = ((hashed >> 9).float() + 0.5) * 2.0**-23
    inv_t = inv_temperature.float().unsqueeze(1)
    sampled = logits.float() * inv_t - torch.log(-torch.log(u))
    return torch.where(inv_t > 0, sampled, logits.float())


def gumbel_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """One id per row of `logits` (rows, vocab), drawn from softmax(logits * inv_temperature) by the
    exponential race over `gumbel_scores` (the argmax for rows with inv_temperature <= 0); ties go to the
    lowest id. The same seed gives the same ids. int64 (rows,)."""
    if logits.dim() != 2 or inv_temperature.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits (rows, vocab) and inv_temperature (rows,), got {tuple(logits.shape)} and "
            f"{tuple(inv_temperature.shape)}"
        )
    return gumbel_scores(logits, inv_temperature, seed).argmax(dim=-1)

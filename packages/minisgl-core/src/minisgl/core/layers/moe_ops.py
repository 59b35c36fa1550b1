"""Mixture-of-experts compute: routing (softmax, top-k, optional renormalisation) and the expert SwiGLU
MLPs over stacked expert weights, in two backends.

- "torch": tokens sorted by expert, both expert GEMMs as one grouped GEMM each
  (`torch.nn.functional.grouped_mm`, or `torch._grouped_mm` on older torch, or a per-expert loop where
  neither exists). The CPU path and the reference.
- "flashinfer": FlashInfer's CUTLASS fused MoE (CUDA only), which does the sort, both GEMMs, the
  activation and the weighted sum itself.

Everything on the CUDA paths keeps fixed shapes and never reads a device value on the host (no `.item()`,
`nonzero` or `bincount`), so a decode step with experts can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from minisgl.core.engine_config import MOE_BACKENDS
from minisgl.core.layers import fused_ops

# Row order of the stacked first expert projection (gate and up, each `intermediate` rows) per backend.
# The torch path applies silu to the first half; FlashInfer's CUTLASS kernel (from TensorRT-LLM) applies
# it to the second half, so it takes up first.
GATE_FIRST = "gate,up"
UP_FIRST = "up,gate"
W13_ORDER = {"torch": GATE_FIRST, "flashinfer": UP_FIRST}


def resolve_moe_backend(name: str, device: torch.device) -> str:
    """The backend `name` (one of MOE_BACKENDS) runs as on `device`. auto is torch (grouped GEMMs)
    everywhere; flashinfer needs CUDA and FlashInfer's fused MoE module."""
    assert name in MOE_BACKENDS, f"EngineConfig lets only {MOE_BACKENDS} through, got {name!r}"
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("moe_backend 'flashinfer' needs a CUDA device; use moe_backend='torch'")
        if _cutlass_fused_moe() is None:
            raise ValueError("moe_backend 'flashinfer' needs flashinfer.fused_moe (flashinfer-python)")
        return name
    return "torch"


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), both (tokens, top_k): the top_k experts by softmax probability (computed in
    float32), their probabilities renormalised to sum to one when `renormalize`. Weights are float32."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _grouped_mm_function() -> Callable[..., torch.Tensor] | None:
    found: Any = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return found


def grouped_mm(
    x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor, use_library: bool = True
) -> torch.Tensor:
    """Rows offsets[e-1]:offsets[e] of x (sorted by group) times weights[e], for every group e.
    x: (rows, k); weights: (groups, k, n); offsets: (groups,) int32 cumulative row counts."""
    library = _grouped_mm_function() if use_library else None
    if library is not None:
        return library(x, weights, offs=offsets)
    # The fallback reads the offsets on the host: fine on the CPU, not inside a CUDA graph.
    out = x.new_empty(x.shape[0], weights.shape[-1])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weights[group]
        start = end
    return out


def torch_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    use_library: bool = True,
) -> torch.Tensor:
    """sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]), expert e being
    down(silu(gate(x)) * up(x)) with w13[e] = [gate; up] (2 * inter, hidden) and w2[e] (hidden, inter)."""
    tokens, top_k = ids.shape
    num_experts = w13.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # the (token, k) slots grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # bincount would sync
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    sorted_x = x.index_select(0, order // top_k)
    hidden = grouped_mm(sorted_x, w13.transpose(1, 2), offsets, use_library)
    out_sorted = grouped_mm(fused_ops.silu_and_mul(hidden), w2.transpose(1, 2), offsets, use_library)
    per_slot = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)
    scaled = per_slot.view(tokens, top_k, -1) * weights.to(x.dtype).unsqueeze(-1)
    return scaled.sum(dim=1)


@functools.cache
def _cutlass_fused_moe() -> Callable[..., Any] | None:
    try:
        from flashinfer.fused_moe import cutlass_fused_moe
    except ImportError:
        return None
    found: Callable[..., Any] = cutlass_fused_moe
    return found


def flashinfer_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """torch_experts' result through FlashInfer's CUTLASS fused MoE; w13[e] = [up; gate] (UP_FIRST).
    The weights are this rank's intermediate slice, so the kernel sees a whole MoE of that size (tp 1):
    the block's all-reduce sums the ranks' partial outputs."""
    fused = _cutlass_fused_moe()
    assert fused is not None, "resolve_moe_backend checks that FlashInfer's fused MoE is there"
    result = fused(
        x.contiguous(), ids.to(torch.int32), weights.float().contiguous(), w13, w2, x.dtype, quant_scales=[]
    )
    out: torch.Tensor = result[0] if isinstance(result, (list, tuple)) else result
    return out


EXPERT_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "torch": torch_experts,
    "flashinfer": flashinfer_experts,
}

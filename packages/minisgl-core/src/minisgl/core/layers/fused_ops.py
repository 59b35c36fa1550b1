"""Fused kernels for CUDA tensors (FlashInfer's RMSNorm, add+RMSNorm, SiLU-and-mul and RoPE),
with the plain torch code as the CPU path and reference. A decode step of a small model is otherwise
dozens of tiny elementwise kernels per layer. MINISGL_DISABLE_FUSED_OPS=1 keeps the torch code on the GPU
too."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from minisgl.core import env


@functools.cache
def _flashinfer() -> Any | None:
    if env.DISABLE_FUSED_OPS.get():
        return None
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer


def _fused(x: torch.Tensor) -> Any | None:
    return _flashinfer() if x.is_cuda else None


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernels run for this tensor (a CUDA tensor, FlashInfer installed, not disabled)."""
    return _fused(x) is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dimension, computed in float32."""
    fi = _fused(x)
    if fi is not None:
        shape = x.shape
        return fi.rmsnorm(x.reshape(-1, shape[-1]), weight, eps).view(shape)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual). On CUDA both inputs are overwritten with the results."""
    fi = _fused(x)
    if fi is not None:
        fi.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up, where gate and up are the two halves of the last dimension."""
    fi = _fused(gate_up)
    if fi is not None:
        return fi.activation.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half_rope(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in the rotate-half (NeoX) form. q: (tokens, heads, d), k: (tokens, kv_heads, d);
    cos_sin: (max_positions, d) float32, cos of the d/2 frequencies then their sin."""
    head_dim = q.shape[-1]
    fi = _fused(q)
    if fi is not None:
        q2 = q.reshape(q.shape[0], -1).contiguous()
        k2 = k.reshape(k.shape[0], -1).contiguous()
        fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, q2, k2, head_dim, cos_sin, is_neox=True)
        return q2.view(q.shape), k2.view(k.shape)
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)

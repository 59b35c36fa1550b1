"""Attention backends behind one interface.

- `torch`: the portable reference (CPU and any GPU); the CPU default.
- `fi`: FlashInfer's FlashAttention-2 kernels for paged prefill and decode (Turing and newer).
- `fa3`: FlashInfer's FlashAttention-3 kernels (Hopper only).
- `xqa`: FlashInfer's XQA decode kernels (Hopper, Blackwell); decode only, so named as the decode half
  (`fi,xqa`). Over an FP8 KV cache it reads the cache at about the copy rate, where FA2 converts it to
  bf16 on the way in and gains nothing from the halved bytes.
`attn="p,d"` picks one backend for prefill batches and one for decode batches. `auto` is `fa3,fi` on
Hopper (FA3 prefill; FA3's decode reads the KV cache at half the bandwidth of FA2's, tools/attn_bench.py),
`fi` on other CUDA GPUs and `torch` on the CPU. With an FP8 KV cache `auto` is `fi,xqa` on Hopper
where XQA runs the model's shapes and page size, else `fi`: FlashInfer's FA3 kernels read FP8 keys and
values only with FP8 queries, so `fa3` is refused there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisgl.core.attention.base import AttentionBackend, AttentionMetadata, BatchLayout
from minisgl.core.attention.torch_backend import TorchAttentionBackend
from minisgl.core.attention.xqa_backend import XQA_GPU_MAJORS, XQABackend, xqa_support_problem
from minisgl.core.engine_config import ATTENTION_BACKENDS, prefill_backend_problem
from minisgl.core.kv.kv_pool import KVPool
from minisgl.kernels.reference import FP8_KV_DTYPE

BACKEND_NAMES = ATTENTION_BACKENDS
# `auto` with an FP8 KV cache on Hopper, where XQA runs the model's shapes: decode with XQA, which reads
# the FP8 cache at about the copy rate where FA2 converts it to bf16 first. Measured on the H200
# (Qwen3-8B offline workload, docs/benchmarks.md): 10,677 output tok/s against 9,061 with the bf16 cache
# and 8,810 with FA2 over FP8, at a larger accuracy cost (XQA rounds queries and softmax weights to FP8
# too; kv_accuracy figures there). An FP8 cache is opted into for speed, so auto takes the fast path.
FP8_HOPPER_AUTO = ("fi", "xqa")


@dataclass
class SplitMetadata(AttentionMetadata):
    backend: AttentionBackend
    inner: AttentionMetadata


class SplitBackend(AttentionBackend):
    """One backend for prefill batches, another for decode batches."""

    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend) -> None:
        self.prefill = prefill
        self.decode = decode

    def prepare(self, layout: BatchLayout, kv_pool: KVPool) -> AttentionMetadata:
        backend = self.decode if layout.is_decode else self.prefill
        return SplitMetadata(backend, backend.prepare(layout, kv_pool))

    def forward(
        self,
        q: torch.Tensor,
        layer: int,
        kv_pool: KVPool,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        assert isinstance(metadata, SplitMetadata)
        return metadata.backend.forward(q, layer, kv_pool, metadata.inner)


def resolve_attention(
    spec: str, device: torch.device, fp8_kv: bool = False, xqa_fits: bool = False
) -> tuple[str, str]:
    """Parse "auto", "name" or "prefill,decode" into (prefill, decode) backend names, and check that this
    device runs them (over an FP8 KV cache when fp8_kv). xqa_fits: XQA runs the model's attention shapes
    and page size (xqa_support_problem), so auto may pick it."""
    auto = _auto(device, fp8_kv, xqa_fits)
    resolved = [auto[i] if name == "auto" else name for i, name in enumerate(_split_spec(spec))]
    for name in resolved:
        _check_runs_here(name, device)
        _check_reads_kv_cache(name, fp8_kv)
    problem = prefill_backend_problem(resolved[0])
    if problem is not None:
        raise ValueError(f"attention backend {problem}")
    return resolved[0], resolved[1]


def _split_spec(spec: str) -> list[str]:
    """ "name" or "prefill,decode" as [prefill, decode]."""
    names = [part.strip() for part in spec.split(",")]
    if len(names) == 1:
        names *= 2
    if len(names) != 2:
        raise ValueError(f"attn must be NAME or PREFILL,DECODE, got {spec!r}")
    return names


def _check_reads_kv_cache(name: str, fp8_kv: bool) -> None:
    if name == "fa3" and fp8_kv:
        raise ValueError(
            "attention backend 'fa3' cannot read an FP8 KV cache (FlashInfer's FA3 kernels need FP8 "
            "queries for it): use attn='fi' with kv_cache_dtype='fp8_e4m3', or another kv_cache_dtype"
        )


def _auto(device: torch.device, fp8_kv: bool, xqa_fits: bool) -> tuple[str, str]:
    if device.type != "cuda":
        return "torch", "torch"
    if torch.cuda.get_device_capability(device)[0] == 9:
        if fp8_kv:
            return FP8_HOPPER_AUTO if xqa_fits else ("fi", "fi")
        return "fa3", "fi"
    return "fi", "fi"


def _check_runs_here(name: str, device: torch.device) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention backend {name!r} is not one of: auto, {', '.join(BACKEND_NAMES)}")
    if name == "torch":
        return
    if device.type != "cuda":
        raise ValueError(f"attention backend {name!r} needs a CUDA device; use attn='torch' on the CPU")
    _check_gpu_generation(name, *torch.cuda.get_device_capability(device))


def _check_gpu_generation(name: str, major: int, minor: int) -> None:
    if name == "fa3" and major != 9:
        raise ValueError(
            f"attention backend 'fa3' (FlashAttention-3) runs on Hopper GPUs (sm_90) only; this GPU is "
            f"sm_{major}{minor}: use attn='fi'"
        )
    if name == "xqa" and major not in XQA_GPU_MAJORS:
        raise ValueError(
            f"attention backend 'xqa' (FlashInfer's XQA) runs on Hopper (sm_90) and Blackwell (sm_100, "
            f"sm_120) GPUs only; this GPU is sm_{major}{minor}: use attn='fi'"
        )
    if name == "fi" and (major, minor) < (7, 5):
        raise ValueError(
            f"attention backend 'fi' needs a Turing or newer GPU (sm_75+); this is sm_{major}{minor}"
        )


def create_backend(
    spec: str,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    device: torch.device,
    page_size: int,
) -> AttentionBackend:
    """dtype: the queries'; kv_dtype: the KV pool's."""
    xqa_fits = xqa_support_problem(head_dim, page_size, dtype, kv_dtype) is None
    prefill_name, decode_name = resolve_attention(spec, device, kv_dtype == FP8_KV_DTYPE, xqa_fits)
    built: dict[str, AttentionBackend] = {}
    for name in {prefill_name, decode_name}:
        if name == "torch":
            built[name] = TorchAttentionBackend()
        elif name == "xqa":
            built[name] = XQABackend(head_dim, dtype, kv_dtype, device, page_size)
        else:
            from minisgl.core.attention.flashinfer_backend import FlashInferBackend

            kernels = "fa3" if name == "fa3" else "fa2"
            built[name] = FlashInferBackend(
                num_qo_heads, num_kv_heads, head_dim, dtype, kv_dtype, device, page_size, kernels
            )
    if prefill_name == decode_name:
        return built[prefill_name]
    return SplitBackend(built[prefill_name], built[decode_name])


__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "AttentionMetadata",
    "BatchLayout",
    "SplitBackend",
    "create_backend",
]

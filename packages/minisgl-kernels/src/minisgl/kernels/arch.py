"""What the current GPU is and what it can run: compute capability, SM count, attention paths."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from minisgl.kernels import jit


@dataclass(frozen=True)
class DeviceInfo:
    """One CUDA device as the kernels and the attention backends see it."""

    index: int
    name: str
    capability: tuple[int, int]
    sm_count: int
    total_memory: int  # bytes

    @property
    def target(self) -> str:
        """The build target of minisgl's kernels on this device (`sm_90a` on Hopper)."""
        return jit.cuda_target(self.capability)[0]

    @property
    def supports_kernels(self) -> bool:
        """Whether minisgl's CUDA kernels build for this device."""
        return self.capability >= jit.MIN_CAPABILITY

    @property
    def attention_backends(self) -> tuple[str, ...]:
        """The attention backends this device can run, in minisgl's names (`--attn`).

        `torch` runs anywhere; `fi` (FlashInfer) needs Turing (sm_75) or newer; `fa3`
        (FlashInfer's FlashAttention-3 kernels) is written for Hopper (sm_90) only.
        """
        backends = ["torch"]
        if self.capability >= (7, 5):
            backends.append("fi")
        if self.capability[0] == 9:
            backends.append("fa3")
        return tuple(backends)


def _index(device: torch.device | int | str | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device_info needs a CUDA device, got {device}")
    return torch.cuda.current_device() if device.index is None else device.index


def device_info(device: torch.device | int | str | None = None) -> DeviceInfo:
    """Describe a CUDA device (the current one by default); raises RuntimeError without CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available: device_info describes CUDA devices only")
    return _describe(_index(device))


@functools.cache
def _describe(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(
        index=index,
        name=props.name,
        capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
        total_memory=props.total_memory,
    )

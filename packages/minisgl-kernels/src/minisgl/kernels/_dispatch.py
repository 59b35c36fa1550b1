"""Which implementation a wrapper runs: the JIT-built kernels on CUDA tensors, the references elsewhere."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from minisgl.kernels import arch, jit

DISABLE_ENV = "MINISGL_DISABLE_KERNELS"  # "1": run the torch references on CUDA too (to rule kernels out)
CUDA_MODULE = "minisgl_cuda_ops"
CUDA_SOURCES = ("kv_store.cu", "gather.cu", "rope_store.cu", "gumbel_sample.cu")
CPU_MODULE = "minisgl_cpu_ops"
CPU_SOURCES = ("prefix.cpp",)
AUTO_LANES = 0  # the kernels' lanes_per_row argument: 0 lets them size it from the row length


def use_cuda_kernels(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and not kernels_disabled()


@functools.cache
def kernels_disabled() -> bool:
    """MINISGL_DISABLE_KERNELS, read once per process (a wrapper runs per layer per step)."""
    return os.environ.get(DISABLE_ENV, "").lower() in ("1", "true", "yes")


@functools.cache
def cuda_ops(device_index: int) -> Any:
    """The CUDA module built for this device's architecture (built on first use, then cached)."""
    info = arch.device_info(device_index)
    jit.check_capability(info.capability, f"GPU {device_index} ({info.name})")
    target, arch_list = jit.cuda_target(info.capability)
    return jit.load(CUDA_MODULE, CUDA_SOURCES, target, arch_list)


def cpu_ops() -> Any:
    """The C++ module for the CPU (built with the host compiler on first use)."""
    return jit.load(CPU_MODULE, CPU_SOURCES, jit.CPU_TARGET)


def device_index(tensor: torch.Tensor) -> int:
    index = tensor.device.index
    return torch.cuda.current_device() if index is None else index

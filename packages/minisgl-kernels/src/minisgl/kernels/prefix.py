"""Prefix compare: the radix cache's match length, in C++ on the CPU."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from minisgl.kernels import reference
from minisgl.kernels._dispatch import cpu_ops
from minisgl.kernels.jit import KernelBuildError


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    """Index of the first position where two 1-D integer tensors differ, over their common length.

    Returns the common length when one is a prefix of the other. CPU tensors of int32/int64 go to a
    C++ loop that stops at the first difference (about 1-3 us a call, whatever the length); anything else
    (GPU tensors, other dtypes) runs `reference.first_mismatch`. Where the C++ module cannot be built (no
    compiler), it warns once and uses the reference.
    """
    if not _cpu_integers(a, b):
        return reference.first_mismatch(a, b)
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    ops = _cpu_ops_or_error()
    if isinstance(ops, KernelBuildError):
        warnings.warn(f"using the torch prefix compare: {ops}", RuntimeWarning, stacklevel=2)
        return reference.first_mismatch(a, b)
    result: int = ops.first_mismatch(a, b)
    return result


def _cpu_integers(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the C++ loop takes these: both on the CPU, the first of int32/int64."""
    return a.device.type == "cpu" and b.device.type == "cpu" and a.dtype in (torch.int32, torch.int64)


@functools.cache
def _cpu_ops_or_error() -> Any:
    # A failed build is remembered too: the radix cache calls this per node and must not rebuild each time.
    try:
        return cpu_ops()
    except KernelBuildError as error:
        return error

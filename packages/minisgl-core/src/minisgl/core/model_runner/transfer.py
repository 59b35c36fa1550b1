"""Host-to-device copies that never stall the stream.

PyTorch copies from ordinary (pageable) host memory to the GPU synchronously with the stream: every
`torch.tensor(list, device="cuda")` waits for all the work already queued, which would undo overlap
scheduling. Staging the values in pinned memory makes the copy a true asynchronous one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pinned(values: Sequence[int] | Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """A host tensor in pinned memory (plain memory when there is no CUDA)."""
    return torch.tensor(values, dtype=dtype, pin_memory=torch.cuda.is_available())


def to_device(
    values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return pinned(values, dtype).to(device, non_blocking=True)

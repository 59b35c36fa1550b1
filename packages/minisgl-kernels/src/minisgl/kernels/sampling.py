"""Sampling a token per row from softmax(logits / temperature) in one pass over the logits."""

from __future__ import annotations

import torch

from minisgl.kernels import reference
from minisgl.kernels._dispatch import cuda_ops, device_index, use_cuda_kernels

# Seeds are drawn from the whole int64 range; the kernel hashes their 64 bits.
_SEED_RANGE = (-(2**63), 2**63 - 1)


def gumbel_sample(
    logits: torch.Tensor, inv_temperature: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One id per row of `logits` (rows, vocab; float32, bfloat16 or float16, last dim dense), drawn from
    softmax(logits * inv_temperature) (float32 (rows,) on logits' device); a row whose inv_temperature is
    <= 0 takes its argmax. int64 (rows,).

    The noise comes from a hash of a seed drawn from `generator` (on logits' device; the default one when
    None), so seeding the generator repeats the draws. CUDA tensors run one pass of a kernel that reads
    each logit once and writes no noise (no host sync: the seed stays on the device); other devices, and
    CUDA under MINISGL_DISABLE_KERNELS, run `reference.gumbel_sample`, which hashes the same way (ids agree
    up to float rounding near ties) and reads the seed on the host.
    """
    seed = torch.randint(*_SEED_RANGE, (1,), dtype=torch.int64, device=logits.device, generator=generator)
    if not use_cuda_kernels(logits):
        return reference.gumbel_sample(logits, inv_temperature, int(seed))
    rows = logits.shape[0]
    workspace = torch.empty(rows, dtype=torch.int64, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    cuda_ops(device_index(logits)).gumbel_sample(logits, inv_temperature.contiguous(), seed, workspace, out)
    return out

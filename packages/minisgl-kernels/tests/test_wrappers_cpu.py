"""The public wrappers on CPU tensors run the references; arch detection needs CUDA."""

from __future__ import annotations

import pytest
import torch

import minisgl.kernels as kernels
from minisgl.kernels import reference


def test_store_kv_on_cpu_is_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(16, 2, 8, generator=gen), torch.randn(16, 2, 8, generator=gen)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    slots = torch.tensor([4, 0, 15], dtype=torch.int32)
    kernels.store_kv(k_cache, v_cache, k, v, slots)
    reference.store_kv(expected_k, expected_v, k, v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_gather_rows_on_cpu_is_the_reference_and_fills_out() -> None:
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(10, 4, generator=gen)
    ids = torch.tensor([[3, 12], [15, 19]])
    expected = reference.gather_rows(table, ids, 10, 20)
    assert torch.equal(kernels.gather_rows(table, ids, 10, 20), expected)
    out = torch.full((2, 2, 4), float("nan"))
    assert kernels.gather_rows(table, ids, 10, 20, out=out) is out
    assert torch.equal(out, expected)


def test_device_info_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; covered by the GPU tests")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        kernels.device_info()


def test_public_api() -> None:
    for name in kernels.__all__:
        assert hasattr(kernels, name), name

"""The C++ prefix compare (JIT-built with the host compiler) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from minisgl.kernels import first_mismatch, reference
from minisgl.kernels._dispatch import cpu_ops


def test_cpp_module_builds() -> None:
    assert cpu_ops().first_mismatch(torch.tensor([1, 2]), torch.tensor([1, 3])) == 1


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_matches_reference_on_random_inputs(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(10)
    for _ in range(300):
        n, m = torch.randint(0, 40, (2,), generator=gen).tolist()
        alphabet = int(torch.randint(1, 4, (1,), generator=gen))  # small alphabets: long common prefixes
        a = torch.randint(0, alphabet, (n,), generator=gen, dtype=dtype)
        b = torch.randint(0, alphabet, (m,), generator=gen, dtype=dtype)
        assert first_mismatch(a, b) == reference.first_mismatch(a, b)


def test_long_and_equal_arrays() -> None:
    a = torch.arange(1_000_000, dtype=torch.int32)
    assert first_mismatch(a, a.clone()) == 1_000_000
    b = a.clone()
    b[999_999] = -1
    assert first_mismatch(a, b) == 999_999
    assert first_mismatch(a[:10], a) == 10


def test_strided_views_and_large_ids() -> None:
    a = torch.tensor([2**40, 1, 2**40 + 1, 1, 7], dtype=torch.int64)
    b = torch.tensor([2**40, 2**40 + 1, 9], dtype=torch.int64)
    assert first_mismatch(a[::2], b) == 2
    assert first_mismatch(a[::2], b) == reference.first_mismatch(a[::2], b)


def test_mixed_dtypes_and_empty() -> None:
    assert first_mismatch(torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1, 2, 9])) == 2
    empty = torch.empty(0, dtype=torch.int64)
    assert first_mismatch(empty, torch.tensor([1])) == 0
    assert first_mismatch(empty, empty) == 0


def test_rejects_non_vectors() -> None:
    with pytest.raises(ValueError, match="1-D"):
        first_mismatch(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))


def test_other_dtypes_use_the_reference() -> None:
    assert first_mismatch(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])) == 1

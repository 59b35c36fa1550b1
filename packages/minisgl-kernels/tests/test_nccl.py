"""Communicators: the torch.distributed fallback on CPU, NCCL at world size 1 on a GPU."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minisgl.kernels import nccl

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nox -s gpu)")


@pytest.fixture
def gloo_group() -> Iterator[None]:
    with tempfile.TemporaryDirectory() as directory:
        dist.init_process_group(
            "gloo", init_method=f"file://{Path(directory) / 'store'}", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_torch_fallback_at_world_size_1(gloo_group: None) -> None:
    comm = nccl.create_communicator(rank=0, world_size=1, device="cpu", unique_id=None)
    assert isinstance(comm, nccl.TorchCommunicator)
    assert (comm.rank, comm.world_size) == (0, 1)
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    y = x.clone()
    comm.all_reduce(y)
    assert torch.equal(y, x)
    comm.all_reduce(y, op="avg")
    assert torch.equal(y, x)
    out = torch.full((2, 3), float("nan"))
    comm.all_gather(out, x)
    assert torch.equal(out, x)


def test_torch_fallback_needs_a_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        nccl.TorchCommunicator()


def test_library_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nccl.LIBRARY_ENV, "/opt/nccl/libnccl.so.2")
    assert nccl.nccl_library() == "/opt/nccl/libnccl.so.2"


def test_unique_id_is_128_bytes() -> None:
    if not nccl.nccl_available():
        pytest.skip(f"NCCL does not load here ({nccl.nccl_library()})")
    assert nccl.nccl_version() >= 21800
    first, second = nccl.nccl_unique_id(), nccl.nccl_unique_id()
    assert isinstance(first, bytes) and len(first) == 128 and first != second


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_nccl_world_size_1(dtype: torch.dtype) -> None:
    assert nccl.nccl_available(), "NCCL should load on a GPU machine"
    comm = nccl.create_communicator(rank=0, world_size=1, device="cuda:0", unique_id=nccl.nccl_unique_id())
    assert isinstance(comm, nccl.NcclCommunicator)
    x = (torch.randn(1000, device="cuda") * 100).to(dtype)
    y = x.clone()
    comm.all_reduce(y)
    comm.all_reduce(y, op="max")
    torch.cuda.synchronize()
    assert torch.equal(y, x)
    out = torch.full((1000,), 7, device="cuda").to(dtype)
    comm.all_gather(out, x)
    torch.cuda.synchronize()
    assert torch.equal(out, x)
    comm.close()
    with pytest.raises(RuntimeError, match="destroyed"):
        comm.all_reduce(y)


@pytest.mark.gpu
@needs_cuda
def test_nccl_inside_cuda_graph() -> None:
    comm = nccl.NcclCommunicator(nccl.nccl_unique_id(), 0, 1, torch.device("cuda", 0))
    buffer = torch.zeros(4096, device="cuda", dtype=torch.bfloat16)
    gathered = torch.zeros(4096, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as torch's graph docs ask
        comm.all_reduce(buffer)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        comm.all_reduce(buffer)
        comm.all_gather(gathered, buffer)
    for step in range(3):
        buffer.copy_(torch.full_like(buffer, step + 1))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(buffer, torch.full_like(buffer, step + 1))
        assert torch.equal(gathered, buffer)


def test_comm_bench_checks_and_times_two_cpu_ranks() -> None:
    """The multi-rank harness on the CPU (gloo, torch.distributed only): both collectives are checked for
    exact results on each rank, then timed."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the multi-GPU test below runs instead")
    from minisgl.kernels import comm_bench

    results = comm_bench.run(world_size=2, sizes_mib=[0.0625], iters=2)
    assert {(r.communicator, r.collective) for r in results} == {
        ("torch.distributed", "all_reduce"),
        ("torch.distributed", "all_gather"),
    }
    assert all(r.time_us > 0 and r.bus_gb_s > 0 for r in results)
    assert "bus GB/s" in comm_bench.render(results, 2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_two_gpus_exact_and_timed() -> None:
    """NCCL communicator at world size 2: exact all-reduce and all-gather (bf16, 1 and 64 MiB), timed next
    to torch.distributed's NCCL group."""
    from minisgl.kernels import comm_bench

    results = comm_bench.run(world_size=2, sizes_mib=[1, 64], iters=10)
    print(comm_bench.render(results, 2))
    assert {r.communicator for r in results} == {"torch.distributed", "minisgl NCCL"}

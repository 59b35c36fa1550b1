"""All-reduce and all-gather over N local ranks: exactness, then time and bus bandwidth, for the NCCL
communicator of this package next to torch.distributed.

    python -m minisgl.kernels.comm_bench --world-size 2 [--sizes-mib 1 16 64 256] [--iters 20]

One process per rank (spawned), one GPU each. Without CUDA the ranks run on the CPU over gloo and only
torch.distributed is measured (a check of the harness, not a benchmark). Bus bandwidth follows
nccl-tests: all-reduce moves 2(n-1)/n of the buffer per rank, all-gather (n-1)/n of the gathered output.
Every rank's input holds small integers scaled by (rank + 1), so the reduced and gathered results are
exact in bf16 and are compared for equality before anything is timed.
"""

from __future__ import annotations

import argparse
import socket
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minisgl.kernels.nccl import Communicator, NcclCommunicator, TorchCommunicator, nccl_unique_id


@dataclass
class Result:
    communicator: str
    collective: str
    size_mib: float
    time_us: float
    bus_gb_s: float


def _inputs(rank: int, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    base = (torch.arange(numel, device=device) % 7).to(dtype)
    return base * (rank + 1)


def _check(comm: Communicator, numel: int, device: torch.device, dtype: torch.dtype) -> None:
    world = comm.world_size
    x = _inputs(comm.rank, numel, device, dtype)
    reduced = x.clone()
    comm.all_reduce(reduced)
    expected = _inputs(0, numel, device, dtype) * (world * (world + 1) // 2)
    if not torch.equal(reduced, expected):
        raise AssertionError(f"{type(comm).__name__}: all_reduce of {numel} elements is wrong")
    gathered = torch.empty(world * numel, device=device, dtype=dtype)
    comm.all_gather(gathered, x)
    for rank in range(world):
        if not torch.equal(gathered[rank * numel : (rank + 1) * numel], _inputs(rank, numel, device, dtype)):
            raise AssertionError(f"{type(comm).__name__}: all_gather slice of rank {rank} is wrong")


def _time_us(fn: Any, device: torch.device, iters: int) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / iters * 1e6


def _rank_main(rank: int, world: int, port: int, sizes_mib: list[float], iters: int, out: Queue) -> None:
    device, dtype, backend = _rank_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comms = _communicators(rank, world, device)
    results = [r for size in sizes_mib for r in _measure(comms, size, rank, world, device, dtype, iters)]
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _rank_device(rank: int) -> tuple[torch.device, torch.dtype, str]:
    """Rank r on GPU r in bf16 over NCCL; on a machine without CUDA, the CPU in float32 over gloo."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32, "gloo"
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    return device, torch.bfloat16, "nccl"


def _communicators(rank: int, world: int, device: torch.device) -> dict[str, Communicator]:
    """torch.distributed, and on CUDA minisgl's own NCCL communicator (rank 0's unique id broadcast)."""
    comms: dict[str, Communicator] = {"torch.distributed": TorchCommunicator()}
    if device.type == "cuda":
        holder: list[Any] = [nccl_unique_id() if rank == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        comms["minisgl NCCL"] = NcclCommunicator(holder[0], rank, world, device)
    return comms


def _measure(
    comms: dict[str, Communicator],
    size: float,
    rank: int,
    world: int,
    device: torch.device,
    dtype: torch.dtype,
    iters: int,
) -> list[Result]:
    """All-reduce and all-gather of `size` MiB per rank with every communicator (checked first)."""
    numel = int(size * (1 << 20)) // torch.empty(0, dtype=dtype).element_size()
    x = _inputs(rank, numel, device, dtype)
    gathered = torch.empty(world * numel, device=device, dtype=dtype)
    nbytes = x.numel() * x.element_size()
    factor = (world - 1) / world
    results: list[Result] = []
    for name, comm in comms.items():
        _check(comm, numel, device, dtype)
        reduce_us = _time_us(lambda comm=comm, x=x: comm.all_reduce(x), device, iters)
        gather_us = _time_us(lambda comm=comm, x=x, out=gathered: comm.all_gather(out, x), device, iters)
        results.append(Result(name, "all_reduce", size, reduce_us, 2 * factor * nbytes / reduce_us / 1e3))
        results.append(Result(name, "all_gather", size, gather_us, factor * world * nbytes / gather_us / 1e3))
    return results


def run(world_size: int, sizes_mib: list[float], iters: int) -> list[Result]:
    """Spawn world_size ranks; return rank 0's measurements (raises if any rank fails a check)."""
    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        raise ValueError(f"--world-size {world_size} needs that many GPUs; {torch.cuda.device_count()} here")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    context = mp.get_context("spawn")
    out: Queue = context.Queue()
    mp.start_processes(
        _rank_main, args=(world_size, port, sizes_mib, iters, out), nprocs=world_size, start_method="spawn"
    )
    results: list[Result] = out.get(timeout=60)
    return results


def render(results: list[Result], world_size: int) -> str:
    lines = [
        f"world size {world_size}; bus bandwidth as in nccl-tests",
        f"{'communicator':<18} {'collective':<11} {'MiB':>7} {'time us':>10} {'bus GB/s':>9}",
    ]
    for r in results:
        lines.append(
            f"{r.communicator:<18} {r.collective:<11} {r.size_mib:>7g} {r.time_us:>10.1f} {r.bus_gb_s:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    print(render(run(args.world_size, args.sizes_mib, args.iters), args.world_size))


if __name__ == "__main__":
    main()

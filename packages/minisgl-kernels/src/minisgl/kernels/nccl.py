"""Collectives for tensor parallelism: NCCL through a tvm-ffi object, or torch.distributed as fallback.

NCCL is opened at run time from the nvidia-nccl wheel that CUDA builds of torch install (or the system's
libnccl.so.2, or $MINISGL_NCCL_LIBRARY). Its collectives run on the current CUDA stream, without host
synchronization or allocation, so they can be captured into CUDA graphs.

Setup over N ranks: rank 0 calls `nccl_unique_id()` and sends the 128 bytes to the others by any channel
(a zmq message, a torch.distributed broadcast, a file); each rank then calls
`NcclCommunicator(unique_id, rank, world_size, device)`. `create_communicator` does this with a
torch.distributed fallback when NCCL cannot be loaded.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from minisgl.kernels import jit

LIBRARY_ENV = "MINISGL_NCCL_LIBRARY"
NCCL_MODULE = "minisgl_nccl"
NCCL_SOURCES = ("nccl.cpp",)
REDUCE_OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}


class Communicator(Protocol):
    """What the engine needs from a TP group; every call is collective over the group's ranks."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce `tensor` over the ranks, in place."""

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """Fill `output` (world_size * input.numel() elements) with every rank's `input`, rank 0 first."""


def nccl_library() -> str:
    """The libnccl to open: $MINISGL_NCCL_LIBRARY, the nvidia-nccl wheel's, else the loader's search."""
    configured = os.environ.get(LIBRARY_ENV, "")
    if configured:
        return configured
    for entry in sys.path:
        candidate = Path(entry or ".") / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
        if candidate.is_file():
            return str(candidate)
    return "libnccl.so.2"


@functools.cache
def _ops() -> Any:
    return jit.load(NCCL_MODULE, NCCL_SOURCES, jit.CPU_TARGET)


def nccl_version() -> int:
    """NCCL's version code (e.g. 23007 for 2.30.7); raises RuntimeError when NCCL cannot be loaded."""
    return int(_ops().nccl_version(nccl_library()))


@functools.cache
def nccl_available() -> bool:
    """Whether NCCL loads here (the module builds and libnccl opens)."""
    try:
        nccl_version()
    except (RuntimeError, OSError):
        return False
    return True


def nccl_unique_id() -> bytes:
    """A fresh NCCL unique id (128 bytes); rank 0 makes it and sends it to the other ranks."""
    return bytes(_ops().nccl_unique_id(nccl_library()))


def _device(device: torch.device | int | str) -> torch.device:
    resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if resolved.type != "cuda":
        raise ValueError(f"NCCL needs a CUDA device, got {resolved}")
    return resolved


class NcclCommunicator:
    """One rank of an NCCL communicator; collectives run on the current CUDA stream."""

    def __init__(
        self, unique_id: bytes, rank: int, world_size: int, device: torch.device | int | str
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = _device(device)
        ops = _ops()
        # ncclCommInitRank binds the communicator to the current device.
        with torch.cuda.device(self.device):
            self._comm = ops.nccl_init_rank(nccl_library(), unique_id, world_size, rank)
        self._all_reduce = ops.nccl_all_reduce
        self._all_gather = ops.nccl_all_gather
        self._destroy = ops.nccl_destroy

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        self._all_reduce(self._comm, tensor, REDUCE_OPS[op])

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        self._all_gather(self._comm, output, input)

    def close(self) -> None:
        """Destroy the NCCL communicator now (otherwise it goes with the last reference)."""
        self._destroy(self._comm)


class TorchCommunicator:
    """The same collectives through an initialized torch.distributed process group."""

    _OPS: ClassVar[dict[str, Any]] = {
        "sum": torch.distributed.ReduceOp.SUM,
        "prod": torch.distributed.ReduceOp.PRODUCT,
        "max": torch.distributed.ReduceOp.MAX,
        "min": torch.distributed.ReduceOp.MIN,
        "avg": torch.distributed.ReduceOp.AVG,
    }

    def __init__(self, group: Any = None) -> None:
        if not torch.distributed.is_initialized():
            raise RuntimeError(
                "TorchCommunicator needs torch.distributed.init_process_group(...) to have been called"
            )
        self.group = group
        self.rank = torch.distributed.get_rank(group)
        self.world_size = torch.distributed.get_world_size(group)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        if op == "avg" and torch.distributed.get_backend(self.group) != "nccl":
            # gloo has no AVG: sum, then divide.
            torch.distributed.all_reduce(tensor, group=self.group)
            tensor.div_(self.world_size)
            return
        torch.distributed.all_reduce(tensor, op=self._OPS[op], group=self.group)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        torch.distributed.all_gather_into_tensor(output.view(-1), input.reshape(-1), group=self.group)


def create_communicator(
    rank: int,
    world_size: int,
    device: torch.device | int | str,
    unique_id: bytes | None = None,
    group: Any = None,
) -> Communicator:
    """NCCL when it loads and a unique id was shared; otherwise torch.distributed over `group`."""
    if unique_id is not None and nccl_available():
        return NcclCommunicator(unique_id, rank, world_size, device)
    return TorchCommunicator(group)

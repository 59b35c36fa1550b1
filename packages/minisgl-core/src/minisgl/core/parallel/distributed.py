"""Tensor parallelism: which rank this process is, the collectives the layers call, and the control
channel that gives every rank the same scheduler messages.

At tp=1 every collective is the identity, so the TP-ready layers run unchanged on a single device.
At tp>1 `init_distributed` joins a torch.distributed group:
- a gloo group over all ranks carries control messages (rank 0's requests and aborts, once per step) and,
  on the CPU, the model's tensors as well;
- on CUDA the model's all-reduce and all-gather go through minisgl-kernels' NCCL communicator (no host
  synchronization, safe inside CUDA graphs; its unique id travels over the gloo group), or through a
  torch.distributed NCCL group when NCCL cannot be loaded by the kernels package.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from minisgl.kernels.nccl import (
    Communicator,
    TorchCommunicator,
    create_communicator,
    nccl_available,
    nccl_unique_id,
)

logger = logging.getLogger("minisgl")

# How long ranks wait for each other to join, and for any one tensor collective.
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)
# Followers wait in the control broadcast while the server is idle, for as long as it stays idle; a dead
# peer still ends the wait at once (gloo sees the connection close).
CONTROL_TIMEOUT = datetime.timedelta(days=30)
_JOINED_KEY = "minisgl/joined"  # counts the ranks > 0 that reached the store
_PEER_POLL_S = 0.2


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def shard(self, total: int) -> tuple[int, int]:
        """The [start, end) slice of `total` items that this rank owns (the last shard may be shorter)."""
        per_rank = -(-total // self.size)
        start = min(self.rank * per_rank, total)
        return start, min(start + per_rank, total)


@dataclass
class TPGroup:
    """This process's place in the TP group: with the forward context, the engine's only process-wide
    state (layers read it when they are built and when they communicate)."""

    info: TPInfo = field(default_factory=TPInfo)
    comm: Communicator | None = None  # the model's collectives
    control: Any = None  # the gloo group of control messages


_GROUP = TPGroup()


def get_tp() -> TPInfo:
    return _GROUP.info


def set_tp(info: TPInfo) -> None:
    _GROUP.info = info


def init_distributed(
    rank: int,
    size: int,
    init_address: str,
    device: torch.device,
    check_peers: Callable[[], None] | None = None,
) -> None:
    """Join the TP group of `size` ranks that meet at init_address ("host:port", rank 0 listens there).
    Every rank calls this before building its model. Rank 0 waits for the others in Python, calling
    `check_peers` (which raises when a rank it started has died) between waits, instead of blocking in
    the rendezvous for RENDEZVOUS_TIMEOUT."""
    if size == 1:
        set_tp(TPInfo())
        return
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process")
    host, port = init_address.rsplit(":", 1)
    store = dist.TCPStore(
        host, int(port), size, is_master=rank == 0, timeout=RENDEZVOUS_TIMEOUT, wait_for_workers=False
    )
    if rank == 0:
        _wait_for_peers(store, size, check_peers)
    else:
        store.add(_JOINED_KEY, 1)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=RENDEZVOUS_TIMEOUT)
    _GROUP.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    set_tp(TPInfo(rank, size))
    # On the CPU the tensors go over gloo too; on CUDA over NCCL.
    comm = _cuda_communicator(rank, size, device) if device.type == "cuda" else TorchCommunicator()
    _GROUP.comm = comm
    logger.info("joined the TP group as rank %d of %d (%s)", rank, size, type(comm).__name__)


def _wait_for_peers(store: Any, size: int, check_peers: Callable[[], None] | None) -> None:
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT.total_seconds()
    while int(store.add(_JOINED_KEY, 0)) < size - 1:
        if check_peers is not None:
            check_peers()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other TP ranks did not join within {RENDEZVOUS_TIMEOUT}")
        time.sleep(_PEER_POLL_S)


def _cuda_communicator(rank: int, size: int, device: torch.device) -> Communicator:
    if nccl_available():
        unique_id = broadcast_from_leader(nccl_unique_id() if rank == 0 else None)
        return create_communicator(rank, size, device, unique_id=unique_id)
    logger.warning("minisgl-kernels could not load NCCL; using torch.distributed's NCCL group")
    return TorchCommunicator(dist.new_group(backend="nccl"))


def shutdown_distributed() -> None:
    """Leave the TP group (every rank calls it); tp=1 is a no-op."""
    close = getattr(_GROUP.comm, "close", None)
    if close is not None:
        close()
    _GROUP.comm = _GROUP.control = None
    if dist.is_initialized():
        dist.destroy_process_group()
    set_tp(TPInfo())


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place; returns x."""
    size, comm = _GROUP.info.size, _GROUP.comm
    if size == 1:
        return x
    assert comm is not None, "init_distributed() was not called"
    comm.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension, rank 0 first."""
    size, comm = _GROUP.info.size, _GROUP.comm
    if size == 1:
        return x
    assert comm is not None, "init_distributed() was not called"
    gathered = torch.empty((size, *x.shape), dtype=x.dtype, device=x.device)
    comm.all_gather(gathered, x.contiguous())
    # (ranks, ..., per_rank) -> (..., ranks * per_rank)
    return gathered.movedim(0, -2).reshape(*x.shape[:-1], size * x.shape[-1])


# ---- control channel (CPU, gloo) --------------------------------------------------------------------


def broadcast_from_leader(payload: Any) -> Any:
    """Rank 0's payload, on every rank (the others pass anything, usually None)."""
    if _GROUP.info.size == 1:
        return payload
    holder = [payload if _GROUP.info.is_leader else None]
    dist.broadcast_object_list(holder, src=0, group=_GROUP.control)
    return holder[0]


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's value (e.g. KV pages, which must agree across ranks)."""
    if _GROUP.info.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_GROUP.control)
    return int(tensor.item())


def gather_objects(value: Any) -> list[Any]:
    """Every rank's value, indexed by rank (for consistency checks)."""
    if _GROUP.info.size == 1:
        return [value]
    gathered: list[Any] = [None] * _GROUP.info.size
    dist.all_gather_object(gathered, value, group=_GROUP.control)
    return gathered


def disagreeing_rank(value: Any) -> tuple[int, Any] | None:
    """(rank, its value) of the first rank whose value differs from this rank's; None when all agree."""
    for rank, theirs in enumerate(gather_objects(value)):
        if theirs != value:
            return rank, theirs
    return None

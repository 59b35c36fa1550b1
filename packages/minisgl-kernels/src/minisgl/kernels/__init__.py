"""minisgl's kernels: small JIT-built CUDA/C++ ops, each with a pure-torch reference.

    from minisgl.kernels import store_kv, gather_rows, rope_store, gumbel_sample, first_mismatch

The wrappers take torch tensors and dispatch on the device: CUDA tensors run kernels compiled on first
use for the GPU's architecture (through apache-tvm-ffi, cached on disk, see `minisgl.kernels.jit`),
CPU tensors run the references in `minisgl.kernels.reference` (the prefix compare runs C++ on the CPU).
"""

from minisgl.kernels._version import __version__
from minisgl.kernels.arch import DeviceInfo, device_info
from minisgl.kernels.gather import gather_rows
from minisgl.kernels.jit import KernelBuildError
from minisgl.kernels.kv_store import store_kv
from minisgl.kernels.nccl import (
    Communicator,
    NcclCommunicator,
    TorchCommunicator,
    create_communicator,
    nccl_available,
    nccl_unique_id,
)
from minisgl.kernels.prefix import first_mismatch
from minisgl.kernels.rope_store import ROPE_STORE_HEAD_DIMS, rope_store
from minisgl.kernels.sampling import gumbel_sample

__all__ = [
    "ROPE_STORE_HEAD_DIMS",
    "Communicator",
    "DeviceInfo",
    "KernelBuildError",
    "NcclCommunicator",
    "TorchCommunicator",
    "__version__",
    "create_communicator",
    "device_info",
    "first_mismatch",
    "gather_rows",
    "gumbel_sample",
    "nccl_available",
    "nccl_unique_id",
    "rope_store",
    "store_kv",
]

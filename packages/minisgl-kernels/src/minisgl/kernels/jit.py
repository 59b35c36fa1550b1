"""Build the package's C++/CUDA sources (`csrc/`) with apache-tvm-ffi and load them, once per process.

Builds land in a disk cache, one directory per package version and target:

    $MINISGL_KERNEL_CACHE/<version>/<target>/<module>/      (MINISGL_KERNEL_CACHE set)
    ~/.cache/minisgl/kernels/<version>/<target>/<module>/    (default)

where <target> is the GPU's architecture (`sm_90a` on Hopper) or `cpu`. ninja rebuilds only what changed
and a file lock keeps concurrent processes (TP ranks starting together) from building over each other.
Problems a user can fix (no nvcc, no C++ compiler, a compiler error, a GPU too old) raise
`KernelBuildError` with what to install or set; docs/troubleshooting.md has the same steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from minisgl.kernels._version import __version__

CSRC = Path(__file__).resolve().parent / "csrc"
CACHE_ENV = "MINISGL_KERNEL_CACHE"
ARCH_ENV = "TVM_FFI_CUDA_ARCH_LIST"  # tvm-ffi's own override of the CUDA target, honoured as is
CPU_TARGET = "cpu"
MIN_CAPABILITY = (7, 5)  # the oldest GPU that CUDA 13's nvcc still builds for (Turing)
TROUBLESHOOTING = "see 'A JIT kernel build fails' in docs/troubleshooting.md"

_build_lock = threading.Lock()  # the file lock orders processes; this orders threads of one process


class KernelBuildError(RuntimeError):
    """A kernel could not be built or loaded; the message says what to install or set."""


def cache_root() -> Path:
    """The directory holding every version's builds: $MINISGL_KERNEL_CACHE or ~/.cache/minisgl/kernels."""
    configured = os.environ.get(CACHE_ENV, "")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "minisgl" / "kernels"


def cache_dir(target: str) -> Path:
    """Where this version's modules for `target` (`sm_90a`, `cpu`, ...) are built."""
    return cache_root() / __version__ / target


def check_capability(capability: tuple[int, int], name: str = "this GPU") -> None:
    """Raise KernelBuildError for a GPU older than the toolkit supports."""
    if capability < MIN_CAPABILITY:
        major, minor = capability
        raise KernelBuildError(
            f"{name} has compute capability {major}.{minor}; minisgl's CUDA kernels need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (CUDA 13 builds nothing older). "
            "Run on the CPU (--device cpu) or set MINISGL_DISABLE_KERNELS=1 to use the torch references; "
            + TROUBLESHOOTING
        )


def cuda_target(capability: tuple[int, int]) -> tuple[str, str]:
    """(cache directory name, TVM_FFI_CUDA_ARCH_LIST entry) for a compute capability.

    Hopper and newer get their arch-specific target (sm_90a, sm_100a, ...), which unlocks instructions
    that the portable sm_90 leaves out. A user's TVM_FFI_CUDA_ARCH_LIST wins over detection.
    """
    configured = os.environ.get(ARCH_ENV, "").strip()
    if configured:
        return "sm_" + "-".join(entry.replace(".", "") for entry in configured.split()), configured
    major, minor = capability
    suffix = "a" if major >= 9 else ""
    return f"sm_{major}{minor}{suffix}", f"{major}.{minor}{suffix}"


def _find_nvcc() -> str | None:
    # Where tvm-ffi will look: $CUDA_HOME/bin (or $CUDA_PATH), else nvcc on PATH, else /usr/local/cuda.
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidate = Path(home) / "bin" / "nvcc"
        return str(candidate) if candidate.exists() else None
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").exists():
        found = "/usr/local/cuda/bin/nvcc"  # tvm-ffi's last guess too
    return found


def _ninja_dir() -> str | None:
    """The directory of a ninja binary when none is on PATH (the `ninja` wheel's, inside a venv)."""
    if shutil.which("ninja"):
        return None
    try:
        import ninja  # the PyPI package: its binary sits in the venv's bin, which may be off PATH
    except ImportError:
        return None
    return str(getattr(ninja, "BIN_DIR", "")) or None


def check_toolchain(sources: Sequence[Path]) -> list[str]:
    """Raise KernelBuildError when a tool the sources need is missing; return extra linker flags."""
    _check_host_toolchain()
    if not any(source.suffix == ".cu" for source in sources):
        return []
    nvcc = _find_nvcc()
    if nvcc is None:
        raise KernelBuildError(
            "nvcc was not found: install a CUDA toolkit whose major version matches torch.version.cuda "
            "and put its bin/ on PATH, or set CUDA_HOME (e.g. CUDA_HOME=/usr/local/cuda-13.0); the driver "
            f"alone has no compiler. To run without the kernels set MINISGL_DISABLE_KERNELS=1; {TROUBLESHOOTING}"
        )
    return _cudart_flags(Path(nvcc))


def _check_host_toolchain() -> None:
    """ninja and a C++ compiler, which every build needs."""
    if shutil.which("ninja") is None and _ninja_dir() is None:
        raise KernelBuildError(f"ninja was not found: pip install ninja; {TROUBLESHOOTING}")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(
            f"no C++ compiler: '{compiler}' is not on PATH. Install one (apt install g++) or set CXX; "
            + TROUBLESHOOTING
        )


def _cudart_flags(nvcc: Path) -> list[str]:
    """Link flags that find the toolkit's libcudart, at link and at load time.

    tvm-ffi links with -L$CUDA_HOME/lib64 only; toolkits also keep it in lib/ or targets/<arch>/lib, and
    nvcc on PATH may be a wrapper script outside the toolkit, so look in each likely home.
    """
    homes = [nvcc.parent.parent, nvcc.resolve().parent.parent, Path("/usr/local/cuda")]
    subdirs = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    for home in homes:
        for subdir in subdirs:
            directory = home / subdir
            if (directory / "libcudart.so").exists():
                return [f"-L{directory}", f"-Wl,-rpath,{directory}"]
    return []


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on path (created with its directory) across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _build_environment(arch_list: str | None) -> Iterator[None]:
    """Point tvm-ffi at our CUDA target and a ninja binary for the duration of one build."""
    saved = {key: os.environ.get(key) for key in (ARCH_ENV, "PATH")}
    try:
        if arch_list is not None:
            os.environ[ARCH_ENV] = arch_list
        ninja_dir = _ninja_dir()
        if ninja_dir is not None:
            os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
        yield
    finally:
        _restore_environment(saved)


def _restore_environment(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def build(
    name: str,
    sources: Sequence[Path],
    target: str,
    arch_list: str | None = None,
    build_root: Path | None = None,
) -> Path:
    """Compile `sources` into `<build_root>/<name>/<name>.so` (build_root defaults to cache_dir(target)).

    `arch_list` is the TVM_FFI_CUDA_ARCH_LIST value for CUDA sources ("9.0a"); None for CPU-only code.
    """
    import tvm_ffi.cpp

    ldflags = check_toolchain(sources)
    directory = (build_root if build_root is not None else cache_dir(target)) / name
    with _build_lock, file_lock(directory.parent / f"{name}.lock"), _build_environment(arch_list):
        try:
            library = tvm_ffi.cpp.build(
                name,
                sources=[str(source) for source in sources],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-lineinfo"],
                extra_ldflags=ldflags,
                extra_include_paths=[str(CSRC)],
                build_directory=str(directory),
            )
        except (RuntimeError, OSError) as error:
            raise KernelBuildError(
                f"building minisgl kernel module '{name}' for {target} in {directory} failed.\n{error}\n"
                f"If the toolkit was fixed since, delete {directory} (or point {CACHE_ENV} elsewhere) and "
                f"retry; {TROUBLESHOOTING}"
            ) from error
    return Path(library)


@functools.cache
def load(name: str, sources: tuple[str, ...], target: str, arch_list: str | None = None) -> Any:
    """Build (or find in the cache) and load one module; later calls in the process reuse it.

    `sources` are file names under csrc/. Returns a tvm_ffi.Module whose functions take torch tensors.
    """
    import tvm_ffi

    library = build(name, [CSRC / source for source in sources], target, arch_list)
    try:
        return tvm_ffi.load_module(str(library))
    except Exception as error:  # a stale or foreign .so: say how to get a clean one
        raise KernelBuildError(
            f"loading {library} failed: {error}. Delete {library.parent} and retry; {TROUBLESHOOTING}"
        ) from error

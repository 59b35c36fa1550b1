"""The JIT build: cache location, targets, the C++ build on this CPU, and the errors users see."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minisgl.kernels import __version__, jit


def test_cache_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(jit.CACHE_ENV, raising=False)
    assert jit.cache_dir("sm_90a") == Path.home() / ".cache" / "minisgl" / "kernels" / __version__ / "sm_90a"
    monkeypatch.setenv(jit.CACHE_ENV, str(tmp_path))
    assert jit.cache_dir("cpu") == tmp_path / __version__ / "cpu"


def test_cuda_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(jit.ARCH_ENV, raising=False)
    assert jit.cuda_target((9, 0)) == ("sm_90a", "9.0a")
    assert jit.cuda_target((8, 6)) == ("sm_86", "8.6")
    assert jit.cuda_target((10, 0)) == ("sm_100a", "10.0a")
    monkeypatch.setenv(jit.ARCH_ENV, "8.0 9.0a")
    assert jit.cuda_target((9, 0)) == ("sm_80-90a", "8.0 9.0a")


def test_old_gpu_is_refused_with_a_fix() -> None:
    jit.check_capability((9, 0))
    jit.check_capability((7, 5))
    with pytest.raises(
        jit.KernelBuildError, match=r"compute capability 6\.1.*7\.5 or newer.*troubleshooting"
    ):
        jit.check_capability((6, 1), "GPU 0 (Tesla P100)")


def test_missing_nvcc_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # a toolkit home without bin/nvcc
    with pytest.raises(jit.KernelBuildError, match=r"nvcc was not found.*CUDA_HOME.*troubleshooting"):
        jit.check_toolchain([Path("kernel.cu")])
    # CPU-only sources need no nvcc.
    assert jit.check_toolchain([Path("prefix.cpp")]) == []


def test_missing_cxx_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(jit.KernelBuildError, match=r"no C\+\+ compiler.*set CXX"):
        jit.check_toolchain([Path("prefix.cpp")])


def test_compiler_error_reports_the_log(tmp_path: Path) -> None:
    source = tmp_path / "broken.cpp"
    source.write_text("int main( { return 0; }\n")
    with pytest.raises(jit.KernelBuildError) as info:
        jit.build("broken", [source], jit.CPU_TARGET, build_root=tmp_path / "cache")
    message = str(info.value)
    assert "broken.cpp" in message and "error" in message
    assert jit.CACHE_ENV in message and "troubleshooting" in message


def test_cpu_module_builds_into_the_configured_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(jit.CACHE_ENV, str(tmp_path))
    library = jit.build("minisgl_cpu_ops", [jit.CSRC / "prefix.cpp"], jit.CPU_TARGET)
    assert library == tmp_path / __version__ / "cpu" / "minisgl_cpu_ops" / "minisgl_cpu_ops.so"
    assert library.is_file()
    import tvm_ffi

    module = tvm_ffi.load_module(str(library))
    assert module.first_mismatch(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])) == 2


def test_concurrent_processes_share_one_build(tmp_path: Path) -> None:
    # TP ranks start together: each must get a working module, none a half-written one.
    script = textwrap.dedent(
        """
        import torch
        from minisgl.kernels.prefix import first_mismatch
        assert first_mismatch(torch.tensor([5, 6, 7], dtype=torch.int32), torch.tensor([5, 6], dtype=torch.int32)) == 2
        from minisgl.kernels._dispatch import cpu_ops
        assert cpu_ops().first_mismatch(torch.tensor([1]), torch.tensor([2])) == 0
        """
    )
    env = {**os.environ, jit.CACHE_ENV: str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert (tmp_path / __version__ / "cpu" / "minisgl_cpu_ops" / "minisgl_cpu_ops.so").is_file()

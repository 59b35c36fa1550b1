"""EngineConfig: each option declared once, checked when the config is built, and what its names mean in
torch (config.py) covers every name it accepts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from minisgl.core.config import parse_dtype, parse_kv_cache_dtype
from minisgl.core.engine_config import DTYPES, KV_CACHE_DTYPES, EngineConfig, EngineOptionError, option_spec


def test_every_field_is_declared_with_help() -> None:
    for declared in dataclasses.fields(EngineConfig):
        assert option_spec(declared).help, declared.name


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("device", "tpu", "must be auto, cpu, cuda or cuda:N"),
        ("dtype", "int3", "must be one of auto, float32"),
        ("page_size", 3, "must be a power of two >= 1, got 3"),
        ("page_size", 0, "must be a power of two >= 1, got 0"),
        ("max_running_requests", 0, "must be >= 1, got 0"),
        ("max_prefill_tokens", -5, "must be >= 1, got -5"),
        ("num_kv_pages", 0, "must be >= 1, got 0"),
        ("memory_ratio", 1.5, "must be in (0, 1], got 1.5"),
        ("memory_ratio", float("nan"), "must be in (0, 1], got nan"),
        ("cpu_kv_cache_gib", 0.0, "must be > 0, got 0.0"),
        ("max_seq_len", 1, "must be >= 2, got 1"),
        ("load_format", "pickle", "must be one of auto, safetensors, gguf, dummy; got 'pickle'"),
        ("cache", "lru", "must be one of radix, naive; got 'lru'"),
        ("attn", "flash", "must be auto, one of torch, fi, fa3, xqa, or PREFILL,DECODE"),
        ("attn", "fi,fi,fi", "PREFILL,DECODE"),
        ("attn", "xqa", "xqa has decode kernels only (one query token per request): name it as the decode"),
        ("attn", "xqa,fi", "e.g. fi,xqa"),
        ("kv_cache_dtype", "int8", "must be one of auto, bfloat16, float16, fp8_e4m3; got 'int8'"),
        ("cuda_graph_max_bs", -1, "must be >= 0, got -1"),
        ("tp_size", 0, "must be >= 1, got 0"),
        ("moe_backend", "cutlass", "must be one of auto, torch, flashinfer; got 'cutlass'"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(EngineOptionError) as error:
        EngineConfig(**{field: value})
    assert error.value.option == field
    assert str(error.value) == f"{field} {error.value.problem}" and message in error.value.problem


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"tp_size": 2, "device": "cuda:1"}, "device", "'cuda:1' names one GPU"),
        ({"kv_cache_dtype": "fp8_e4m3", "attn": "fa3,fi"}, "attn", "fa3 cannot read an FP8 KV cache"),
    ],
)
def test_values_that_do_not_go_together_are_refused(values: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(EngineOptionError, match=message) as error:
        EngineConfig(**values)
    assert error.value.option == field


def test_a_config_is_checked_again_when_changed() -> None:
    config = EngineConfig(device="cpu", page_size=16, num_kv_pages=8, max_seq_len=2)
    assert dataclasses.replace(config, tp_size=2).tp_size == 2
    with pytest.raises(EngineOptionError, match="page_size"):
        dataclasses.replace(config, page_size=12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.page_size = 12  # type: ignore[misc]


def test_every_accepted_dtype_name_means_a_torch_dtype() -> None:
    assert {parse_dtype(name, None, torch.device("cpu")) for name in DTYPES} == {
        torch.float32,
        torch.float16,
        torch.bfloat16,
    }
    kv = {name: parse_kv_cache_dtype(name, torch.float32) for name in KV_CACHE_DTYPES}
    assert kv == {
        "auto": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "fp8_e4m3": torch.float8_e4m3fn,
    }


def test_the_readme_names_every_option() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(EngineConfig) if f"`{f.name}`" not in readme]
    assert not missing, missing

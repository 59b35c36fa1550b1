"""`minisgl bench offline`: the step timeline it writes; the CPU page-size default."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from minisgl.core import bench


def test_bench_writes_a_step_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    timeline = tmp_path / "steps.json"
    bench.main(  # the real SmolLM2 (the workload's prompt ids go up to 10,000)
        [
            "--model", "smollm2-135m", "--num-prompts", "4", "--max-input-len", "16",
            "--max-output-len", "8", "--timeline", str(timeline), "--time-device",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "throughput=" in out and "host waited" in out
    steps = json.loads(timeline.read_text())
    workload = bench.make_workload(4, 16, 8)
    assert steps and not steps[0]["is_decode"]  # the prompts are prefilled first
    # Every prompt token is computed once (no shared prefixes), and each step's attention reads at least
    # the tokens it computes.
    assert sum(s["num_tokens"] for s in steps if not s["is_decode"]) >= sum(len(p) for p in workload.prompts)
    for step in steps:
        assert step["kv_tokens"] >= step["num_tokens"] >= step["num_chunks"] >= 1
        assert 0.0 <= step["host_wait_seconds"] <= step["wall_seconds"]
        assert step["device_seconds"] is None  # CUDA events only on a GPU


def test_page_size_defaults_to_one_on_the_cpu(tiny_model_dir: Callable[[str], Path]) -> None:
    from minisgl.core import LLM

    llm = LLM(str(tiny_model_dir("llama")), device="cpu", num_kv_pages=64)
    assert llm.runtime.page_size == 1 and llm.runtime.stats()["page_size"] == 1
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        LLM(str(tiny_model_dir("llama")), device="cpu", page_size=3)

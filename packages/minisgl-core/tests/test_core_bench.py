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


def test_default_workload_is_designs() -> None:
    """The standard offline workload: 256 requests, lengths in [100, 1024], 133,966 output tokens."""
    workload = bench.make_workload(256, 1024, 1024)
    assert workload.num_output_tokens == 133_966
    assert sum(map(len, workload.prompts)) == 142_827


def test_fixed_lengths_workload() -> None:
    """--min-*-len = --max-*-len gives the online comparison's fixed 512-token prompts, 256 outputs."""
    workload = bench.make_workload(8, 512, 256, min_input_len=512, min_output_len=256)
    assert [len(p) for p in workload.prompts] == [512] * 8 and workload.output_lens == [256] * 8
    assert all(0 <= t <= 10000 for p in workload.prompts for t in p)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--min-input-len", "600", "--max-input-len", "512"],
            "--min-input-len 600 is above --max-input-len",
        ),
        (["--min-output-len", "0"], "--min-output-len must be >= 1"),
    ],
)
def test_bad_length_flags_are_refused(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_runs_a_moe_model_with_dummy_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `minisgl bench offline --model qwen3-30b-a3b --load-format dummy --moe-backend ...` does on a
    GPU, on a config-only Qwen3-MoE directory small enough for the CPU."""
    import tiny_models

    spec = tiny_models.SPECS["qwen3-moe"]
    # The workload's prompt ids go up to 10,000.
    spec.config_cls(**{**tiny_models._COMMON, **spec.kwargs, "vocab_size": 10_240}).save_pretrained(tmp_path)
    bench.main(
        [
            "--model", str(tmp_path), "--load-format", "dummy", "--moe-backend", "torch",
            "--num-prompts", "4", "--max-input-len", "16", "--max-output-len", "8",
        ]
    )  # fmt: skip
    assert "throughput=" in capsys.readouterr().out


def test_json_schema_fraction_constrains_that_share_of_requests() -> None:
    assert bench.constrained_requests(6, 0.5) == [True, False] * 3
    assert bench.constrained_requests(4, 1.0) == [True] * 4
    assert not any(bench.constrained_requests(4, 0.0))
    assert sum(bench.constrained_requests(10, 0.7)) == 7  # not every request, as round(1 / 0.7) gave
    assert sum(bench.constrained_requests(10, 0.6)) == 6


def test_fresh_prompts_keep_the_lengths_and_share_no_prefix() -> None:
    workload = bench.make_workload(16, 64, 8)
    fresh = bench.fresh_prompts(workload.prompts)
    assert [len(p) for p in fresh] == [len(p) for p in workload.prompts]
    assert all(a[:2] != b[:2] for a, b in zip(fresh, workload.prompts, strict=True))


def test_json_schema_fraction_prints_the_grammar_cost(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(
        [
            "--model", "smollm2-135m", "--num-prompts", "4", "--max-input-len", "16",
            "--max-output-len", "12", "--json-schema-fraction", "0.5",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "free run with the same output lengths:" in out
    assert "grammar cost:" in out and "throughput=" in out

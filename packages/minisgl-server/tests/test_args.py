"""`minisgl serve` flags: every one documented, each bad value refused with the flag's name."""

from __future__ import annotations

import dataclasses

import pytest

from minisgl.core.engine_config import EngineConfig
from minisgl.server.args import ServerArgs, build_serve_parser, parse_serve_args
from minisgl.server.cli import main

FLAGS = [
    "--model",
    "--host",
    "--port",
    "--device",
    "--dtype",
    "--kv-cache-dtype",
    "--tp",
    "--attn",
    "--cache",
    "--page-size",
    "--max-running-requests",
    "--max-prefill-length",
    "--max-queued-requests",
    "--cuda-graph-max-bs",
    "--memory-ratio",
    "--load-format",
    "--cpu-kv-cache-gib",
    "--num-kv-pages",
    "--context-length",
    "--seed",
    "--served-model-name",
    "--api-key",
    "--log-level",
    "--log-requests",
    "--startup-timeout",
    "--disable-overlap",
    "--no-mixed-batches",
    "--nnodes",
    "--node-rank",
    "--dist-init-addr",
    "--tokenizer-workers",
]


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in out, flag


def test_defaults() -> None:
    args = parse_serve_args([])
    assert args == ServerArgs()
    assert (args.model, args.host, args.port, args.engine.device) == (
        "smollm2-135m",
        "127.0.0.1",
        1919,
        "auto",
    )
    assert args.model_name == "smollm2-135m"
    # The engine picks the page size for the device (16 on CUDA, 1 on the CPU) unless one is given.
    assert args.engine.page_size is None
    assert args.engine == EngineConfig()  # the flags' defaults are the engine's


def test_values_are_parsed() -> None:
    args = parse_serve_args(
        [
            "--device",
            "cuda:1",
            "--attn",
            "fa3,fi",
            "--page-size",
            "16",
            "--max-queued-requests",
            "8",
            "--memory-ratio",
            "0.5",
            "--served-model-name",
            "m",
            "--cache",
            "naive",
            "--context-length",
            "512",
        ]
    )
    engine = args.engine
    assert (engine.device, engine.attn, engine.page_size, args.max_queued_requests) == (
        "cuda:1",
        "fa3,fi",
        16,
        8,
    )
    assert (engine.memory_ratio, args.model_name, engine.cache, engine.max_seq_len) == (
        0.5,
        "m",
        "naive",
        512,
    )
    assert engine.mix_decode_into_prefill is True
    assert parse_serve_args(["--no-mixed-batches"]).engine.mix_decode_into_prefill is False


def test_kv_cache_dtype_reaches_the_engine() -> None:
    args = parse_serve_args(["--kv-cache-dtype", "fp8_e4m3", "--attn", "fi"])
    assert args.engine.kv_cache_dtype == "fp8_e4m3"
    assert ServerArgs().engine.kv_cache_dtype == "auto"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "abc"], "--port"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "int3"], "--dtype"),
        (["--kv-cache-dtype", "int8"], "--kv-cache-dtype"),
        (["--kv-cache-dtype", "fp8_e4m3", "--attn", "fa3,fi"], "--attn"),
        (["--tp", "0"], "--tp"),
        (["--attn", "flash"], "--attn"),
        (["--attn", "fi,fi,fi"], "--attn"),
        (["--attn", "xqa"], "--attn"),
        (["--cache", "lru"], "--cache"),
        (["--moe-backend", "cutlass"], "--moe-backend"),
        (["--page-size", "3"], "--page-size"),
        (["--max-running-requests", "0"], "--max-running-requests"),
        (["--max-prefill-length", "-5"], "--max-prefill-length"),
        (["--max-queued-requests", "-1"], "--max-queued-requests"),
        (["--cuda-graph-max-bs", "x"], "--cuda-graph-max-bs"),
        (["--memory-ratio", "1.5"], "--memory-ratio"),
        (["--memory-ratio", "0"], "--memory-ratio"),
        (["--load-format", "pickle"], "--load-format"),
        (["--context-length", "1"], "--context-length"),
        (["--log-level", "loud"], "--log-level"),
        (["--log-interval", "-1"], "--log-interval"),
        (["--log-interval", "nan"], "--log-interval"),
        (["--model", ""], "--model"),
        (["--nnodes", "0"], "--nnodes"),
        (["--tokenizer-workers", "0"], "--tokenizer-workers"),
        (["--node-rank", "-1"], "--node-rank"),
        (["--dist-init-addr", "10.0.0.1"], "--dist-init-addr"),
        (["--dist-init-addr", "10.0.0.1:99999"], "--dist-init-addr"),
        # flags that are fine alone but not together
        (["--tp", "3", "--nnodes", "2", "--dist-init-addr", "h:1"], "--nnodes"),
        (["--tp", "2", "--nnodes", "2"], "--dist-init-addr"),
        (["--tp", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], "--node-rank"),
        (["--tp", "2", "--device", "cuda:1"], "--device"),
    ],
)
def test_bad_value_names_the_flag(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_serve_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_every_field_has_a_flag() -> None:
    # A ServerArgs field that no flag sets could never be chosen by a user; `engine` is EngineConfig,
    # whose fields are flags (test_engine_flags).
    dests = {action.dest for action in build_serve_parser()._actions}
    assert {f.name for f in dataclasses.fields(ServerArgs)} - {"engine"} <= dests


def test_ranks_are_spread_over_nodes() -> None:
    args = parse_serve_args(
        ["--tp", "4", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:5000"]
    )
    assert (args.ranks_per_node, list(args.local_ranks), args.dist_init_addr) == (2, [2, 3], "10.0.0.1:5000")
    assert args.engine.tp_size == 4

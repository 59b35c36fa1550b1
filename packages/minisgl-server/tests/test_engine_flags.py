"""The engine's flags are derived from EngineConfig: a field declared there is a flag of `minisgl serve`
and `minisgl bench offline` (and of the shell, tested in its package) with no other edit."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import minisgl.server.args as args_module
from minisgl.core.engine_config import EngineConfig, at_least, option
from minisgl.core.engine_flags import flags_of
from minisgl.server.args import build_serve_parser, parse_serve_args
from minisgl.server.cli import main


@dataclass(frozen=True)
class WithDraftTokens(EngineConfig):
    """EngineConfig as it would be with one more option declared."""

    draft_tokens: int = option(0, "tokens a draft model proposes per step", at_least(0))


def test_a_new_engine_field_is_a_serve_flag_with_its_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(args_module, "EngineConfig", WithDraftTokens)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--draft-tokens DRAFT_TOKENS tokens a draft model proposes per step (default 0)" in help_text

    engine = parse_serve_args(["--draft-tokens", "3"]).engine
    assert isinstance(engine, WithDraftTokens) and engine.draft_tokens == 3
    assert parse_serve_args([]).engine == WithDraftTokens()
    with pytest.raises(SystemExit):
        parse_serve_args(["--draft-tokens", "-1"])
    assert "argument --draft-tokens: must be >= 0, got -1" in capsys.readouterr().err


def test_every_engine_field_is_a_serve_flag_and_a_bench_offline_flag() -> None:
    from minisgl.core import bench

    fields = [declared.name for declared in dataclasses.fields(EngineConfig)]
    serve_dests = {action.dest for action in build_serve_parser()._actions}
    assert set(fields) <= serve_dests
    bench_args = bench.parse_args([])
    assert set(fields) <= set(vars(bench_args))
    assert bench_args.engine_config == EngineConfig() == parse_serve_args([]).engine


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--tp-size", "2"], "tp_size", 2),
        (["--max-prefill-tokens", "512"], "max_prefill_tokens", 512),
        (["--max-seq-len", "4096"], "max_seq_len", 4096),
        (["--attention-backend", "torch"], "attn", "torch"),
        (["--disable-overlap"], "disable_overlap", True),
        (["--cpu-kv-cache-gib", "0.5"], "cpu_kv_cache_gib", 0.5),
    ],
)
def test_every_spelling_reaches_the_engine_field(argv: list[str], field: str, value: object) -> None:
    from minisgl.core import bench

    assert getattr(parse_serve_args(argv).engine, field) == value
    assert getattr(bench.parse_args(argv).engine_config, field) == value


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--page-size", "3"], "argument --page-size: must be a power of two >= 1, got 3"),
        (["--memory-ratio", "nan"], "argument --memory-ratio: must be in (0, 1], got nan"),
        (["--tp", "x"], "argument --tp/--tp-size: expected an integer, got 'x'"),
        (["--cache", "lru"], "argument --cache: must be one of radix, naive; got 'lru'"),
        # combinations EngineConfig refuses, reported under the flag of the field they are about
        (["--tp", "2", "--device", "cuda:1"], "argument --device: 'cuda:1' names one GPU"),
        (["--kv-cache-dtype", "fp8_e4m3", "--attn", "fi,fa3"], "argument --attn: fa3 cannot read an FP8"),
        (["--attn", "xqa,fi"], "argument --attn/--attention-backend: xqa has decode kernels only"),
    ],
)
def test_bench_offline_refuses_what_serve_refuses(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from minisgl.core import bench

    for parse in (parse_serve_args, bench.parse_args):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, parse


def test_flags_keep_their_names() -> None:
    spelled = {declared.name: flags_of(declared) for declared in dataclasses.fields(EngineConfig)}
    assert spelled["tp_size"] == ("--tp", "--tp-size")
    assert spelled["max_seq_len"] == ("--context-length", "--max-seq-len")
    assert spelled["max_prefill_tokens"] == ("--max-prefill-length", "--max-prefill-tokens")
    assert spelled["mix_decode_into_prefill"] == ("--no-mixed-batches",)
    assert spelled["kv_cache_dtype"] == ("--kv-cache-dtype",)


def test_serve_help_imports_no_torch() -> None:
    # The server's parser reads minisgl.core.engine_config and engine_flags: they must stay torch-free.
    code = (
        "import sys\n"
        "from minisgl.server.cli import build_parser\n"
        "build_parser().format_help()\n"
        "from minisgl.core import EngineConfig\n"
        "EngineConfig(device='cpu')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_the_readme_flag_table_names_real_flags() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| `--")]
    named = {flag for row in rows for flag in re.findall(r"`(--[a-z-]+)`", row.split("|")[1])}
    spellings = {flag for action in build_serve_parser()._actions for flag in action.option_strings}
    assert len(named) > 20 and named <= spellings, named - spellings

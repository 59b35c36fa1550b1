"""The `minisgl` command line.

    minisgl serve [--model M] [--port 1919] ...                 the OpenAI-compatible server
    minisgl generate --prompt "What is the capital of France?"   offline generation on one process
    minisgl bench offline [ARGS...]                              the offline throughput benchmark
    minisgl bench serve [ARGS...]                                latency and throughput of a running server
    minisgl bench soak [ARGS...]                                 many varied requests, then check for leaks
    python -m minisgl --model M [--shell]                        mini-sglang's spelling: serve, or the shell

Heavy imports (torch, the engine) happen inside the subcommands, so that `--help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from typing import Any

from minisgl.core.engine_flags import add_engine_flags
from minisgl.server.args import (
    DEFAULT_MODEL,
    add_engine_arguments,
    add_server_arguments,
    server_args_from,
)
from minisgl.server.versions import package_versions, server_version

SHELL_FLAGS = ("--shell", "--shell-mode")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minisgl", description="minisgl: a compact LLM inference engine.")
    versions = ", ".join(f"{name.removeprefix('minisgl-')} {v}" for name, v in package_versions().items())
    parser.add_argument("--version", action="version", version=f"minisgl {server_version()} ({versions})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = commands.add_parser(
        "generate",
        help="generate chat replies offline, in this process",
        description="Run each --prompt as a one-turn chat and print the replies, in order.",
    )
    generate.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a model name, a local HF directory or a .gguf file (default: {DEFAULT_MODEL}, the embedded model)",
    )
    generate.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="a user message; repeat the flag to generate for several prompts in one batch",
    )
    generate.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    add_engine_flags(generate, names=("device", "dtype"))

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks (commands, not tests).")
    bench_kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    # add_help=False: every argument after `offline` / `serve`, --help included, belongs to the benchmark.
    bench_kinds.add_parser(
        "offline",
        add_help=False,
        help="offline engine throughput; arguments are those of minisgl.core.bench (try --help)",
    )
    bench_kinds.add_parser(
        "serve",
        add_help=False,
        help="replay a workload against a running server: TTFT, TPOT, latency, throughput (try --help)",
    )
    bench_kinds.add_parser(
        "soak",
        add_help=False,
        help="many varied requests, aborts and disconnects against a running server, then check that no "
        "KV page leaked and memory stopped growing (try --help)",
    )

    serve = commands.add_parser(
        "serve",
        help="the OpenAI-compatible HTTP server",
        description="Load a model and serve it over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).",
    )
    add_engine_arguments(serve)
    add_server_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _mini_sglang_spelling(argv):
        return _mini_sglang_style(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # each benchmark parses its own arguments
        return _BENCHMARKS[args.bench_kind](rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "serve":
        return _serve(parser, args)
    return _generate(args)


def _mini_sglang_spelling(argv: list[str]) -> bool:
    """`python -m minisgl --model M ...`: flags without a command."""
    return bool(argv) and argv[0].startswith("--") and argv[0] not in ("--help", "--version")


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from minisgl.server.serve import serve

    return serve(server_args_from(parser, args))


def _mini_sglang_style(argv: list[str]) -> int:
    """`python -m minisgl --model M [--shell]`: serve, or open the shell on a local engine."""
    if any(flag in argv for flag in SHELL_FLAGS):
        return _run_shell([a for a in argv if a not in SHELL_FLAGS])
    return main(["serve", *argv])


def _run_shell(argv: list[str]) -> int:
    shell = _find_shell()
    if shell is None:
        print("minisgl: --shell needs the minisgl-shell package: pip install minisgl-shell", file=sys.stderr)
        return 2
    status = shell(argv)
    return status if isinstance(status, int) else 0


def _find_shell() -> Any:
    """The shell's entry point, found through package metadata: the server does not import the shell
    (it sits above the server), the shell registers itself in the `minisgl.commands` group."""
    for entry in importlib.metadata.entry_points(group="minisgl.commands", name="shell"):
        return entry.load()
    return None


def _generate(args: argparse.Namespace) -> int:
    from minisgl.core import LLM, SamplingParams

    conversations = [[{"role": "user", "content": prompt}] for prompt in args.prompt]
    try:
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        results = llm.chat(conversations, params)
    except ValueError as error:
        # The engine reports bad user input (unknown model, no CUDA, bad option) as ValueError.
        print(f"minisgl generate: error: {error}", file=sys.stderr)
        return 1
    for result in results:
        print(result.text)
    return 0


def _bench_serve(argv: list[str]) -> int:
    from minisgl.server.bench_serve import main as bench_serve_main

    return bench_serve_main(argv)


def _bench_soak(argv: list[str]) -> int:
    from minisgl.server.bench_soak import main as bench_soak_main

    return bench_soak_main(argv)


def _bench_offline(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("minisgl.core.bench")
    except ModuleNotFoundError as error:
        if error.name not in ("minisgl.core", "minisgl.core.bench"):
            raise
        print(f"minisgl bench offline needs minisgl-core ({error})", file=sys.stderr)
        return 2
    status = bench.main(argv)
    return status if isinstance(status, int) else 0


_BENCHMARKS: dict[str, Callable[[list[str]], int]] = {
    "offline": _bench_offline,
    "serve": _bench_serve,
    "soak": _bench_soak,
}


if __name__ == "__main__":
    raise SystemExit(main())

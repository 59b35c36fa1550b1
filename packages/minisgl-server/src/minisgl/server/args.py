"""ServerArgs: every option of `minisgl serve` (and of the shell's local engine), parsed and checked.

The engine's options are minisgl.core's EngineConfig (`ServerArgs.engine`), declared there once: their
flags, help text and checks are derived from its fields (minisgl.core.engine_flags). The options declared
here are the server's own: the model, processes and nodes, HTTP, logging. Each flag's type function checks
its value, so a bad value fails at the command line with an error that names the flag (argparse prefixes
"argument --flag:"). No torch import here: `--help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from minisgl.core.engine_config import EngineConfig, at_least, one_of, positive
from minisgl.core.engine_flags import add_engine_flags, engine_config_from, value_parser
from minisgl.core.loading.model_source import DEFAULT_MODEL
from minisgl.server.api.parsers import REASONING_PARSERS, TOOL_PARSERS

DEFAULT_PORT = 1919
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServerArgs:
    model: str = DEFAULT_MODEL
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    shutdown_timeout: float = 15.0  # seconds running requests get to finish after SIGTERM / SIGINT
    # several machines: node 0 serves HTTP; the ranks of every node meet at dist_init_addr (host:port)
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    max_queued_requests: int | None = None
    # process and logging
    tokenizer_workers: int = 1
    startup_timeout: float = 600.0
    log_level: str = "info"
    log_requests: bool = False
    # chat output: the tool-call format ("none": tool calling off) and the think-block format
    tool_call_parser: str = "hermes"
    reasoning_parser: str | None = None
    log_interval: float = 10.0  # seconds between the scheduler's activity lines; 0: none

    @property
    def model_name(self) -> str:
        """The name clients put in `model` and that /v1/models lists."""
        return self.served_model_name or self.model

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)

    @property
    def ranks_per_node(self) -> int:
        return self.engine.tp_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        """The TP ranks whose scheduler processes run on this node."""
        first = self.node_rank * self.ranks_per_node
        return range(first, first + self.ranks_per_node)

    def combination_problem(self) -> tuple[str, str] | None:
        """(flag, message) when server flags that are each valid do not go together (EngineConfig checks
        its own combinations)."""
        tp = self.engine.tp_size
        if tp % self.nnodes:
            return "--nnodes", f"--tp {tp} ranks cannot be split evenly over {self.nnodes} nodes"
        if self.node_rank >= self.nnodes:
            return "--node-rank", f"must be < --nnodes ({self.nnodes}), got {self.node_rank}"
        if self.nnodes > 1 and self.dist_init_addr is None:
            return (
                "--dist-init-addr",
                "is required with --nnodes > 1 (node 0's HOST:PORT, the same on every node)",
            )
        return None


# ---- value checks of the server's own flags (argparse type functions) ----------------------------------


def int_at_least(low: int) -> Callable[[str], int]:
    return value_parser(int, at_least(low))


def _port_number(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be a TCP port in 0..65535, got {value}"


def _host_port(value: str) -> str | None:
    host, _, port = value.rpartition(":")
    if host and port.isdigit() and 0 < int(port) <= 65535:
        return None
    return f"expected HOST:PORT, got {value!r}"


def _nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    return value_parser(str, one_of(choices))


# ---- the flags ----------------------------------------------------------------------------------------


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose, size and start the engine (shared by `minisgl serve` and the shell): the
    model, every EngineConfig field, and the processes around it."""
    d = ServerArgs()
    group = parser.add_argument_group("model and engine")
    group.add_argument(
        "--model",
        "--model-path",
        type=value_parser(str, _nonempty),
        default=d.model,
        help=f"a local HF directory, a .gguf file, a hub id, or an embedded name (default: {d.model})",
    )
    add_engine_flags(group, EngineConfig)
    group.add_argument(
        "--nnodes", type=int_at_least(1), default=d.nnodes, help="machines the --tp ranks span (default 1)"
    )
    group.add_argument(
        "--node-rank",
        type=int_at_least(0),
        default=d.node_rank,
        help="this machine's index among --nnodes; node 0 serves HTTP (default 0)",
    )
    group.add_argument(
        "--dist-init-addr",
        "--dist-init-address",
        type=value_parser(str, _host_port),
        default=d.dist_init_addr,
        help="HOST:PORT of node 0 where the ranks meet (default: a free local port when on one node)",
    )
    group.add_argument(
        "--max-queued-requests",
        type=int_at_least(0),
        default=d.max_queued_requests,
        help="requests waiting to run at most; more are refused with HTTP 503 (default: no limit)",
    )
    group.add_argument(
        "--tokenizer-workers",
        type=int_at_least(1),
        default=d.tokenizer_workers,
        help="tokenizer/detokenizer processes; requests are spread over them (default 1)",
    )
    group.add_argument(
        "--startup-timeout",
        type=value_parser(float, positive),
        default=d.startup_timeout,
        help=f"seconds to wait for the engine to load before giving up (default {d.startup_timeout:g})",
    )
    group.add_argument(
        "--log-level", type=_choice(LOG_LEVELS), default=d.log_level, help="debug, info, warning or error"
    )


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The HTTP server's own flags."""
    d = ServerArgs()
    group = parser.add_argument_group("HTTP server")
    group.add_argument(
        "--host",
        type=value_parser(str, _nonempty),
        default=d.host,
        help=f"address to listen on (default {d.host})",
    )
    group.add_argument(
        "--port",
        type=value_parser(int, _port_number),
        default=d.port,
        help=f"port to listen on (default {d.port})",
    )
    group.add_argument(
        "--served-model-name",
        type=value_parser(str, _nonempty),
        default=None,
        help="the model name clients send and /v1/models lists (default: the --model value)",
    )
    group.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1/* requests (default: no key)",
    )
    group.add_argument(
        "--tool-call-parser",
        type=_choice((*TOOL_PARSERS, "none")),
        default=d.tool_call_parser,
        help="the format of the model's tool calls, parsed into message.tool_calls when a request has "
        f"tools: {', '.join(TOOL_PARSERS)}, or none to refuse tools (default {d.tool_call_parser})",
    )
    group.add_argument(
        "--reasoning-parser",
        type=_choice(tuple(REASONING_PARSERS)),
        default=d.reasoning_parser,
        help="split a reasoning model's <think> block into message.reasoning_content: "
        f"{', '.join(REASONING_PARSERS)} (default: none, the block stays in content)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int_at_least(1),
        default=d.max_request_bytes,
        help="largest request body accepted; larger ones get HTTP 413 before they are read "
        f"(default {d.max_request_bytes:,} bytes = {d.max_request_bytes >> 20} MiB)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=value_parser(float, at_least(0)),
        default=d.shutdown_timeout,
        help="on SIGTERM or SIGINT, seconds running requests get to finish before open streams are "
        f"ended with an error event (default {d.shutdown_timeout:g})",
    )
    group.add_argument(
        "--log-requests", action="store_true", help="log one line per finished request (default: off)"
    )
    group.add_argument(
        "--log-interval",
        type=value_parser(float, at_least(0)),
        default=d.log_interval,
        help="seconds between the scheduler's activity lines while it has work: requests running and "
        f"waiting, KV use, prompt and generation tok/s (default {d.log_interval:g}; 0: none)",
    )


def server_args_from(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> ServerArgs:
    """The ServerArgs of parsed flags; values that do not go together exit through parser.error, naming
    the flag."""
    names = {f.name for f in dataclasses.fields(ServerArgs)} - {"engine"}
    own = {name: value for name, value in vars(namespace).items() if name in names}
    args = ServerArgs(engine=engine_config_from(parser, namespace, EngineConfig), **own)
    problem = args.combination_problem()
    if problem is not None:
        parser.error(f"argument {problem[0]}: {problem[1]}")
    return args


def build_serve_parser(prog: str = "minisgl serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Serve a model over an OpenAI-compatible API.")
    add_engine_arguments(parser)
    add_server_arguments(parser)
    return parser


def parse_serve_args(argv: Sequence[str], prog: str = "minisgl serve") -> ServerArgs:
    parser = build_serve_parser(prog)
    return server_args_from(parser, parser.parse_args(list(argv)))


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )

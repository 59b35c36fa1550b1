"""ServerArgs: every option of `minisgl serve` (and of the shell's local engine), parsed and checked.

Each flag's type function checks its value, so a bad value fails at the command line with an error that
names the flag (argparse prefixes "argument --flag:"). No torch import here: `--help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from minisgl.server.api.parsers import REASONING_PARSERS, TOOL_PARSERS

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PORT = 1919
ATTENTION_BACKENDS = ("torch", "fi", "fa3")
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
CACHES = ("radix", "naive")
# minisgl.core.config's choices, repeated so that --help imports no torch (test_args keeps them equal)
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8_e4m3")
MOE_BACKENDS = ("auto", "torch", "flashinfer")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServerArgs:
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    shutdown_timeout: float = 15.0  # seconds running requests get to finish after SIGTERM / SIGINT
    # engine
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    tp: int = 1
    # several machines: node 0 serves HTTP; the ranks of every node meet at dist_init_addr (host:port)
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    attn: str = "auto"
    moe_backend: str = "auto"
    cache: str = "radix"
    page_size: int | None = None  # None: 16 on CUDA, 1 on the CPU
    max_running_requests: int = 256
    max_prefill_length: int = 8192
    max_queued_requests: int | None = None
    cuda_graph_max_bs: int | None = None
    disable_overlap: bool = False
    no_mixed_batches: bool = False
    memory_ratio: float = 0.9
    cpu_kv_cache_gib: float = 2.0
    num_kv_pages: int | None = None
    context_length: int | None = None
    load_format: str = "auto"
    seed: int = 0
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

    def engine_options(self) -> dict[str, Any]:
        """The options of minisgl.core's EngineConfig, by field name."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "kv_cache_dtype": self.kv_cache_dtype,
            "page_size": self.page_size,
            "max_running_requests": self.max_running_requests,
            "max_prefill_tokens": self.max_prefill_length,
            "num_kv_pages": self.num_kv_pages,
            "memory_ratio": self.memory_ratio,
            "cpu_kv_cache_gib": self.cpu_kv_cache_gib,
            "max_seq_len": self.context_length,
            "load_format": self.load_format,
            "cache": self.cache,
            "attn": self.attn,
            "moe_backend": self.moe_backend,
            "cuda_graph_max_bs": self.cuda_graph_max_bs,
            "disable_overlap": self.disable_overlap,
            "mix_decode_into_prefill": not self.no_mixed_batches,
            "seed": self.seed,
            "tp_size": self.tp,
        }

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)

    @property
    def ranks_per_node(self) -> int:
        return self.tp // self.nnodes

    @property
    def local_ranks(self) -> range:
        """The TP ranks whose scheduler processes run on this node."""
        first = self.node_rank * self.ranks_per_node
        return range(first, first + self.ranks_per_node)

    def combination_problem(self) -> tuple[str, str] | None:
        """(flag, message) when flags that are each valid do not go together."""
        if self.tp % self.nnodes:
            return "--nnodes", f"--tp {self.tp} ranks cannot be split evenly over {self.nnodes} nodes"
        if self.node_rank >= self.nnodes:
            return "--node-rank", f"must be < --nnodes ({self.nnodes}), got {self.node_rank}"
        if self.nnodes > 1 and self.dist_init_addr is None:
            return (
                "--dist-init-addr",
                "is required with --nnodes > 1 (node 0's HOST:PORT, the same on every node)",
            )
        if self.kv_cache_dtype == "fp8_e4m3" and "fa3" in self.attn.split(","):
            return (
                "--attn",
                "fa3 cannot read an FP8 KV cache (FlashInfer's FA3 kernels need FP8 queries for it); "
                "use fi or auto with --kv-cache-dtype fp8_e4m3",
            )
        if self.tp > 1 and self.device.startswith("cuda:"):
            return (
                "--device",
                f"{self.device} names one GPU; with --tp > 1 use cuda or auto (rank r takes GPU r)",
            )
        return None


# ---- value checks (argparse type functions: their message follows "argument --flag: ") ---------------


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _power_of_two(text: str) -> int:
    value = int_at_least(1)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


def _port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 0..65535, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# The comparisons are written so that nan fails them.
def _fraction(text: str) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    parse.__name__ = "choice"
    return parse


def _attention(text: str) -> str:
    """auto, one backend for both phases, or "prefill,decode"."""
    parts = text.split(",")
    if len(parts) in (1, 2) and all(p in ("auto", *ATTENTION_BACKENDS) for p in parts):
        return text
    raise argparse.ArgumentTypeError(
        f"must be auto, one of {', '.join(ATTENTION_BACKENDS)}, or PREFILL,DECODE (e.g. fa3,fi); got {text!r}"
    )


def _host_port(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# ---- the flags ----------------------------------------------------------------------------------------


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose and size the engine (shared by `minisgl serve` and the shell)."""
    d = ServerArgs()
    group = parser.add_argument_group("model and engine")
    group.add_argument(
        "--model",
        "--model-path",
        type=_nonempty,
        default=d.model,
        help=f"a local HF directory, a .gguf file, a hub id, or an embedded name (default: {d.model})",
    )
    group.add_argument(
        "--device", type=_device, default=d.device, help="auto (CUDA when available), cpu, cuda or cuda:N"
    )
    group.add_argument(
        "--dtype",
        type=_choice(DTYPES),
        default=d.dtype,
        help="auto (float32 on CPU, the checkpoint's half type on GPU), float32, bfloat16 or float16",
    )
    group.add_argument(
        "--kv-cache-dtype",
        type=_choice(KV_CACHE_DTYPES),
        default=d.kv_cache_dtype,
        help="KV cache element type: auto (the model's dtype), bfloat16, float16, or fp8_e4m3 (one byte "
        "per element: twice the KV pages; scales from the checkpoint's k_scale/v_scale, else 1.0)",
    )
    group.add_argument(
        "--tp", "--tp-size", type=int_at_least(1), default=d.tp, help="tensor-parallel ranks (default 1)"
    )
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
        type=_host_port,
        default=d.dist_init_addr,
        help="HOST:PORT of node 0 where the ranks meet (default: a free local port when on one node)",
    )
    group.add_argument(
        "--attn",
        "--attention-backend",
        type=_attention,
        default=d.attn,
        help="attention backend: auto, torch, fi, fa3, or PREFILL,DECODE such as fa3,fi (default auto)",
    )
    group.add_argument(
        "--moe-backend",
        type=_choice(MOE_BACKENDS),
        default=d.moe_backend,
        help="expert compute of mixture-of-experts models: torch (grouped GEMMs), flashinfer (its CUTLASS "
        "fused MoE, CUDA only) or auto (torch) (default auto)",
    )
    group.add_argument(
        "--cache",
        type=_choice(CACHES),
        default=d.cache,
        help="radix reuses the KV of shared prompt prefixes; naive does not (default radix)",
    )
    group.add_argument(
        "--page-size",
        type=_power_of_two,
        default=d.page_size,
        help="tokens per KV page (default: 16 on CUDA, 1 on the CPU)",
    )
    group.add_argument(
        "--max-running-requests",
        type=int_at_least(1),
        default=d.max_running_requests,
        help=f"requests decoded together at most (default {d.max_running_requests})",
    )
    group.add_argument(
        "--max-prefill-length",
        "--max-prefill-tokens",
        type=int_at_least(1),
        default=d.max_prefill_length,
        help=f"prompt tokens per prefill step; longer prompts are chunked (default {d.max_prefill_length})",
    )
    group.add_argument(
        "--max-queued-requests",
        type=int_at_least(0),
        default=d.max_queued_requests,
        help="requests waiting to run at most; more are refused with HTTP 503 (default: no limit)",
    )
    group.add_argument(
        "--cuda-graph-max-bs",
        type=int_at_least(0),
        default=d.cuda_graph_max_bs,
        help="largest decode batch captured in a CUDA graph; 0 disables graphs (default: automatic)",
    )
    group.add_argument(
        "--disable-overlap",
        action="store_true",
        help="run CPU scheduling and the device step one after the other (no overlap scheduling)",
    )
    group.add_argument(
        "--no-mixed-batches",
        action="store_true",
        help="decode steps wait for prefill batches instead of riding along in them",
    )
    group.add_argument(
        "--memory-ratio",
        type=_fraction,
        default=d.memory_ratio,
        help=f"fraction of GPU memory for weights and KV cache (default {d.memory_ratio})",
    )
    group.add_argument(
        "--cpu-kv-cache-gib",
        type=_positive_float,
        default=d.cpu_kv_cache_gib,
        help=f"KV cache size on the CPU, in GiB (default {d.cpu_kv_cache_gib})",
    )
    group.add_argument(
        "--num-kv-pages",
        type=int_at_least(1),
        default=d.num_kv_pages,
        help="KV cache size in pages; overrides --memory-ratio and --cpu-kv-cache-gib",
    )
    group.add_argument(
        "--context-length",
        "--max-seq-len",
        type=int_at_least(2),
        default=d.context_length,
        help="longest sequence (prompt + output); default: the model's maximum",
    )
    group.add_argument(
        "--load-format",
        type=_choice(LOAD_FORMATS),
        default=d.load_format,
        help="auto, safetensors, gguf, or dummy (random weights on the real config, for benchmarks)",
    )
    group.add_argument("--seed", type=int, default=d.seed, help="seed of requests that give none (default 0)")
    group.add_argument(
        "--tokenizer-workers",
        type=int_at_least(1),
        default=d.tokenizer_workers,
        help="tokenizer/detokenizer processes; requests are spread over them (default 1)",
    )
    group.add_argument(
        "--startup-timeout",
        type=_positive_float,
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
        "--host", type=_nonempty, default=d.host, help=f"address to listen on (default {d.host})"
    )
    group.add_argument("--port", type=_port, default=d.port, help=f"port to listen on (default {d.port})")
    group.add_argument(
        "--served-model-name",
        type=_nonempty,
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
        type=_non_negative_float,
        default=d.shutdown_timeout,
        help="on SIGTERM or SIGINT, seconds running requests get to finish before open streams are "
        f"ended with an error event (default {d.shutdown_timeout:g})",
    )
    group.add_argument(
        "--log-requests", action="store_true", help="log one line per finished request (default: off)"
    )
    group.add_argument(
        "--log-interval",
        type=_non_negative_float,
        default=d.log_interval,
        help="seconds between the scheduler's activity lines while it has work: requests running and "
        f"waiting, KV use, prompt and generation tok/s (default {d.log_interval:g}; 0: none)",
    )


def args_from_namespace(namespace: argparse.Namespace) -> ServerArgs:
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    return ServerArgs(**{k: v for k, v in vars(namespace).items() if k in names})


def build_serve_parser(prog: str = "minisgl serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Serve a model over an OpenAI-compatible API.")
    add_engine_arguments(parser)
    add_server_arguments(parser)
    return parser


def parse_serve_args(argv: Sequence[str], prog: str = "minisgl serve") -> ServerArgs:
    parser = build_serve_parser(prog)
    return checked(parser, args_from_namespace(parser.parse_args(list(argv))))


def checked(parser: argparse.ArgumentParser, args: ServerArgs) -> ServerArgs:
    """args, or exit through parser.error naming the flag when flags do not go together."""
    problem = args.combination_problem()
    if problem is not None:
        parser.error(f"argument {problem[0]}: {problem[1]}")
    return args


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )

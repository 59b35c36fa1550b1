"""EngineConfig: how the engine runs a model, each option declared once.

A field's type and default are the option's; its metadata (`option(...)`) holds the help text, the check
of a value and the command-line spellings. `LLM(model, **options)` takes the fields as keywords, and
`minisgl serve`, `minisgl bench offline` and the shell build their engine flags from these declarations
(minisgl.core.engine_flags), so a new field is a new flag everywhere. An EngineConfig checks its values
when it is built: one that exists is valid.

No torch import here: the server's `--help` reads this module.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# A check returns a value's problem ("must be >= 1, got 0"), or None when the value is fine.
Check = Callable[[Any], "str | None"]

# Model dtype names, each to the dtype it means ("auto" is resolved per device by config.parse_dtype).
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
# KV cache element types: "auto" is the model's dtype; fp8_e4m3 stores K and V in one byte each, scaled
# per layer (FlashInfer attention on CUDA; the torch backend dequantizes them).
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8_e4m3")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
CACHES = ("radix", "naive")
ATTENTION_BACKENDS = ("torch", "fi", "fa3", "xqa")
# Backends with decode kernels only (one query token per request): they are named as the decode half.
DECODE_ONLY_BACKENDS = ("xqa",)
MOE_BACKENDS = ("auto", "torch", "flashinfer")


class EngineOptionError(ValueError):
    """A bad engine option value; `option` is the EngineConfig field it is about."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option} {problem}")
        self.option = option
        self.problem = problem


# ---- checks (comparisons written so that nan fails them) ----------------------------------------------


def at_least(low: float) -> Check:
    def check(value: Any) -> str | None:
        return None if value >= low else f"must be >= {low}, got {value}"

    return check


def positive(value: Any) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


def power_of_two(value: Any) -> str | None:
    return None if value >= 1 and not value & (value - 1) else f"must be a power of two >= 1, got {value}"


def one_of(choices: Sequence[str]) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}; got {value!r}"

    return check


def device_name(value: Any) -> str | None:
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(value)):
        return None
    return f"must be auto, cpu, cuda or cuda:N, got {value!r}"


def attention_spec(value: Any) -> str | None:
    """auto, one backend for both phases, or "prefill,decode"."""
    parts = [part.strip() for part in str(value).split(",")]
    if not (len(parts) in (1, 2) and all(part in ("auto", *ATTENTION_BACKENDS) for part in parts)):
        backends = ", ".join(ATTENTION_BACKENDS)
        return f"must be auto, one of {backends}, or PREFILL,DECODE (e.g. fa3,fi); got {value!r}"
    return prefill_backend_problem(parts[0])


def prefill_backend_problem(name: str) -> str | None:
    """Why `name` cannot compute prefill batches (None when it can)."""
    if name not in DECODE_ONLY_BACKENDS:
        return None
    return (
        f"{name} has decode kernels only (one query token per request): name it as the decode half of "
        f"PREFILL,DECODE, e.g. fi,{name}"
    )


# ---- the declarations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionSpec:
    """How one EngineConfig field is documented, checked and spelled on the command line.

    help: what the flag does (for a True-by-default boolean, what turning it off does). A default that is
    not None is added to the flag's help; when None means "chosen for you", help says what is chosen.
    flags: the command-line spellings, the first one shown; none given: --field-name.
    """

    help: str
    check: Check | None = None
    flags: tuple[str, ...] = ()


def option(default: Any, help: str, check: Check | None = None, flags: tuple[str, ...] = ()) -> Any:
    """A declared EngineConfig field: its default and its OptionSpec."""
    return field(default=default, metadata={"option": OptionSpec(help, check, flags)})


def option_spec(declared: dataclasses.Field[Any]) -> OptionSpec:
    spec = declared.metadata.get("option")
    if not isinstance(spec, OptionSpec):
        raise TypeError(f"EngineConfig field {declared.name} is declared without option(...)")
    return spec


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. Every field has a keyword of the same name on `LLM(...)`."""

    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N", device_name)
    dtype: str = option(
        "auto",
        "auto (float32 on CPU, the checkpoint's half type on GPU), float32, bfloat16 or float16",
        one_of(("auto", *DTYPES)),
    )
    # FlashInfer's tensor-core decode reads pages of 16 fastest.
    page_size: int | None = option(
        None, "tokens per KV page, a power of two (default: 16 on CUDA, 1 on the CPU)", power_of_two
    )
    max_running_requests: int = option(256, "requests decoded together at most", at_least(1))
    max_prefill_tokens: int = option(
        8192,
        "prompt tokens per prefill step; longer prompts are chunked",
        at_least(1),
        ("--max-prefill-length", "--max-prefill-tokens"),
    )
    num_kv_pages: int | None = option(
        None,
        "KV cache size in pages; overrides --memory-ratio and --cpu-kv-cache-gib (default: sized from memory)",
        at_least(1),
    )
    memory_ratio: float = option(0.9, "fraction of GPU memory for weights and KV cache", fraction)
    cpu_kv_cache_gib: float = option(2.0, "KV cache size on the CPU, in GiB", positive)
    max_seq_len: int | None = option(
        None,
        "longest sequence (prompt + output); default: the model's maximum",
        at_least(2),
        ("--context-length", "--max-seq-len"),
    )
    load_format: str = option(
        "auto",
        "auto, safetensors, gguf, or dummy (random weights on the real config, for benchmarks)",
        one_of(LOAD_FORMATS),
    )
    cache: str = option(
        "radix", "radix reuses the KV of shared prompt prefixes; naive does not", one_of(CACHES)
    )
    # auto: fa3,fi on Hopper (fi,xqa with an FP8 KV cache), fi on other GPUs, torch on the CPU.
    attn: str = option(
        "auto",
        "attention backend: auto, torch, fi, fa3, or PREFILL,DECODE such as fa3,fi; xqa (FlashInfer's "
        "XQA kernels, Hopper or Blackwell: the fast decode over an FP8 KV cache) decodes only, as in fi,xqa",
        attention_spec,
        ("--attn", "--attention-backend"),
    )
    mix_decode_into_prefill: bool = option(
        True,
        "decode steps wait for prefill batches instead of riding along in them",
        flags=("--no-mixed-batches",),
    )
    # Also off with MINISGL_DISABLE_OVERLAP_SCHEDULING=1.
    disable_overlap: bool = option(
        False, "run CPU scheduling and the device step one after the other (no overlap scheduling)"
    )
    kv_cache_dtype: str = option(
        "auto",
        "KV cache element type: auto (the model's dtype), bfloat16, float16, or fp8_e4m3 (one byte per "
        "element: twice the KV pages; scales from the checkpoint's k_scale/v_scale, else 1.0)",
        one_of(KV_CACHE_DTYPES),
    )
    cuda_graph_max_bs: int | None = option(
        None,
        "largest decode batch captured in a CUDA graph; 0 disables graphs "
        "(default: min(256, max running requests))",
        at_least(0),
    )
    seed: int = option(0, "seed of requests that give none")
    tp_size: int = option(1, "tensor-parallel ranks", at_least(1), ("--tp", "--tp-size"))
    moe_backend: str = option(
        "auto",
        "expert compute of mixture-of-experts models: torch (grouped GEMMs), flashinfer (its CUTLASS "
        "fused MoE, CUDA only) or auto (torch)",
        one_of(MOE_BACKENDS),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise EngineOptionError naming the first field whose value is refused."""
        for declared in dataclasses.fields(self):
            problem = _field_problem(declared, getattr(self, declared.name))
            if problem is not None:
                raise EngineOptionError(declared.name, problem)
        conflict = self._conflict()
        if conflict is not None:
            raise EngineOptionError(*conflict)

    def _conflict(self) -> tuple[str, str] | None:
        """(field, problem) when values that are each fine do not go together."""
        if self.tp_size > 1 and self.device.startswith("cuda:"):
            return (
                "device",
                f"{self.device!r} names one GPU, but {self.tp_size} tensor-parallel ranks need one each: "
                "use cuda or auto (rank r takes GPU r)",
            )
        if self.kv_cache_dtype == "fp8_e4m3" and "fa3" in (p.strip() for p in self.attn.split(",")):
            return (
                "attn",
                "fa3 cannot read an FP8 KV cache (FlashInfer's FA3 kernels need FP8 queries for it); "
                "use fi or auto with kv_cache_dtype fp8_e4m3",
            )
        return None


def _field_problem(declared: dataclasses.Field[Any], value: Any) -> str | None:
    check = option_spec(declared).check
    if check is None or (value is None and declared.default is None):
        return None  # None where the default is None: the engine chooses
    return check(value)

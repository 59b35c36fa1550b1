"""Every MINISGL_* environment variable, in one place, with typed parsing. A value that does not parse
is an error naming the variable, never silently ignored.

MINISGL_KERNEL_CACHE is read by minisgl-kernels itself (it cannot import core); it is listed here so
that this module stays the one index of the variables.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    name: str
    default: T
    help: str

    def get(self) -> T:
        raw = os.environ.get(self.name)
        if raw is None:
            return self.default
        try:
            return self._parse(raw.strip())
        except ValueError as exc:
            raise ValueError(f"environment variable {self.name}={raw!r} is invalid: {exc}") from None

    def _parse(self, raw: str) -> T:
        if self.name == "MINISGL_LOG_LEVEL" and raw.upper() not in _LOG_LEVELS:
            raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
        parse = _PARSERS.get(type(self.default), str)
        value: T = parse(raw)
        return value


def _parse_bool(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# How a variable's text becomes a value of its default's type (any other type: the text itself).
_PARSERS: dict[type, Callable[[str], Any]] = {bool: _parse_bool, float: float, int: int}


DEBUG_CHECKS = EnvVar("MINISGL_DEBUG_CHECKS", False, "check KV page ownership after every scheduler step")
DISABLE_OVERLAP_SCHEDULING = EnvVar(
    "MINISGL_DISABLE_OVERLAP_SCHEDULING", False, "run the CPU scheduling and the GPU step one after the other"
)
INIT_NEW_TOKEN_RATIO = EnvVar(
    "MINISGL_INIT_NEW_TOKEN_RATIO",
    0.7,
    "fraction of max_tokens admission expects a request to still generate",
)
MIN_NEW_TOKEN_RATIO = EnvVar("MINISGL_MIN_NEW_TOKEN_RATIO", 0.1, "the floor the ratio decays to")
NEW_TOKEN_RATIO_DECAY = EnvVar("MINISGL_NEW_TOKEN_RATIO_DECAY", 0.001, "ratio decrease per decode step")
IN_BATCH_PREFIX_TOKENS = EnvVar(
    "MINISGL_IN_BATCH_PREFIX_TOKENS",
    32,
    "a prompt whose first N tokens another request of the same prefill batch computes waits a step for them",
)
DISABLE_FUSED_OPS = EnvVar(
    "MINISGL_DISABLE_FUSED_OPS", False, "use plain torch instead of FlashInfer's fused norm/activation/RoPE"
)
LOG_LEVEL = EnvVar("MINISGL_LOG_LEVEL", "INFO", "logging level of the minisgl loggers")
GGUF_CACHE = EnvVar(
    "MINISGL_GGUF_CACHE",
    "",
    "directory of GGUF models converted to safetensors (default ~/.cache/minisgl/gguf); off: no cache",
)
KERNEL_CACHE = EnvVar("MINISGL_KERNEL_CACHE", "", "directory of JIT-built kernels (read by minisgl-kernels)")

ALL = (
    DEBUG_CHECKS,
    DISABLE_OVERLAP_SCHEDULING,
    INIT_NEW_TOKEN_RATIO,
    MIN_NEW_TOKEN_RATIO,
    NEW_TOKEN_RATIO_DECAY,
    IN_BATCH_PREFIX_TOKENS,
    DISABLE_FUSED_OPS,
    LOG_LEVEL,
    GGUF_CACHE,
    KERNEL_CACHE,
)


def check_all() -> None:
    """Parse every variable once, so that a bad value fails at start-up rather than mid-run."""
    for var in ALL:
        var.get()

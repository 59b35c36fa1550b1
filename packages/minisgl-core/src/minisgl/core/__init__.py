"""minisgl-core: the engine. The offline entry point is `LLM`; see the package README.

The names that need torch are imported on first use, so that a torch-free module such as
`minisgl.core.engine_config` (the server's `--help` reads it) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from minisgl.core.engine_config import EngineConfig

if TYPE_CHECKING:
    from minisgl.core.config import ModelConfig
    from minisgl.core.llm import LLM
    from minisgl.core.request import GenerationResult
    from minisgl.core.request_error import InvalidRequestError
    from minisgl.core.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "EngineConfig",
    "GenerationResult",
    "InvalidRequestError",
    "ModelConfig",
    "SamplingParams",
    "__version__",
]

_HOMES = {
    "LLM": "minisgl.core.llm",
    "ModelConfig": "minisgl.core.config",
    "GenerationResult": "minisgl.core.request",
    "InvalidRequestError": "minisgl.core.request_error",
    "SamplingParams": "minisgl.core.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'minisgl.core' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)

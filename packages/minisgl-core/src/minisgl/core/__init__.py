"""minisgl-core: the engine. The offline entry point is `LLM`; see the package README."""

from minisgl.core.config import EngineConfig, ModelConfig
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

"""The runtime: a loaded model driven one step at a time (`Runtime`), built from an `EngineConfig`."""

from minisgl.core.runtime.results import StepResult
from minisgl.core.runtime.runtime import Runtime
from minisgl.core.runtime.timing import StepTiming

__all__ = ["Runtime", "StepResult", "StepTiming"]

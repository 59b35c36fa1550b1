"""The model's recommended sampling values (generation_config.json) for the fields a request leaves out,
as vLLM applies them: a request that sends `temperature` keeps it; one that does not gets the model's."""

from __future__ import annotations

import dataclasses
from typing import Any

from minisgl.server.api.protocol import GenerationSpec


def apply_sampling_defaults(body: Any, spec: GenerationSpec, defaults: dict[str, Any]) -> None:
    omitted = {
        name: value
        for name, value in defaults.items()
        if not isinstance(body, dict) or body.get(name) is None
    }
    if omitted:
        spec.params = dataclasses.replace(spec.params, **omitted)

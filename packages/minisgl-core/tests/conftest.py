"""Shared fixtures: tiny models on disk, their transformers reference, and a small cache of engines.

Engines are built lazily and at most one tiny-model engine is alive at a time (building a tiny one
takes well under a second), so the tests never depend on two engines coexisting, except the embedded
SmolLM2 engine, which is module scoped in its own test file.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
from tiny_models import GEN_LEN, PROMPT_LENGTHS, PROMPT_SEED

# CPU tests on small CI machines: keep torch from oversubscribing the cores.
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


_saved: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_root: Path) -> Callable[[str], Path]:
    """name -> directory of the saved checkpoint (saved once per session)."""

    def get(name: str) -> Path:
        if name not in _saved:
            _saved[name] = tiny_models.save_model(tiny_models.SPECS[name], tiny_model_root / name)
        return _saved[name]

    return get


_references: dict[str, tuple[Any, list[tiny_models.GreedyReference]]] = {}


@pytest.fixture(scope="session")
def reference(
    tiny_model_dir: Callable[[str], Path],
) -> Callable[[str], tuple[Any, list[tiny_models.GreedyReference]]]:
    """name -> (transformers model, greedy references of the standard prompts)."""

    def get(name: str) -> tuple[Any, list[tiny_models.GreedyReference]]:
        if name not in _references:
            model = tiny_models.load_reference(tiny_model_dir(name))
            prompts = tiny_models.make_prompts(PROMPT_SEED, PROMPT_LENGTHS)
            refs = [tiny_models.greedy_reference(model, p, GEN_LEN) for p in prompts]
            # Self-check of the reference: greedy must never sit on a near-tie, or token identity
            # would depend on harmless float reorderings.
            worst = min(r.min_gap for r in refs)
            assert worst > 5e-4, f"{name}: reference top-1 gap {worst:.2e} too small; reseed the model"
            _references[name] = (model, refs)
        return _references[name]

    return get


class EngineCache:
    """Keeps the most recently used engine alive; builds a new one when the key changes."""

    def __init__(self, model_dir: Callable[[str], Path]) -> None:
        self._model_dir = model_dir
        self._key: tuple[Any, ...] | None = None
        self._llm: Any = None

    def get(self, name: str, **kwargs: Any) -> Any:
        from minisgl.core import LLM

        key = (name, tuple(sorted(kwargs.items())))
        if key != self._key:
            self.close()
            options: dict[str, Any] = dict(device="cpu", dtype="float32", seed=0)
            options.update(kwargs)
            self._llm = LLM(str(self._model_dir(name)), **options)
            self._key = key
        return self._llm

    def close(self) -> None:
        self._llm = None
        self._key = None
        gc.collect()


@pytest.fixture(scope="session")
def engines(tiny_model_dir: Callable[[str], Path]) -> Iterator[EngineCache]:
    cache = EngineCache(tiny_model_dir)
    yield cache
    cache.close()


@pytest.fixture(scope="session")
def standard_prompts() -> list[list[int]]:
    return tiny_models.make_prompts(PROMPT_SEED, PROMPT_LENGTHS)

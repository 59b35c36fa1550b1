"""The package README's module map follows the source tree: every path it names exists, and every module
and folder of minisgl.core is named; the runtime keeps its public imports."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
CORE = PACKAGE / "src" / "minisgl" / "core"


def _map_rows() -> list[str]:
    readme = (PACKAGE / "README.md").read_text()
    section = readme.split("## Module map", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def _named_paths() -> set[str]:
    """Paths in the map's first column; a bare name after a folder's path lives in that folder."""
    named = set()
    for row in _map_rows():
        folder = ""
        for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if "/" in name.rstrip("/"):
                folder = name.rsplit("/", 1)[0] + "/"
                named.add(name)
            else:
                named.add(folder + name if name.endswith(".py") else name)
    return named


def test_every_path_in_the_module_map_exists() -> None:
    missing = [path for path in sorted(_named_paths()) if not (CORE / path).exists()]
    assert not missing, f"README module map names paths that do not exist: {missing}"


def test_every_module_and_folder_is_in_the_module_map() -> None:
    """A top-level module is named; a folder is named whole (`models/`) or module by module."""
    named = _named_paths()
    unlisted = []
    for entry in sorted(CORE.iterdir()):
        if entry.name.startswith("__") or entry.name == "py.typed":
            continue
        if entry.is_file():
            unlisted += [] if entry.name in named else [entry.name]
        elif f"{entry.name}/" not in named:
            modules = [
                f"{entry.name}/{m.name}" for m in sorted(entry.glob("*.py")) if m.name != "__init__.py"
            ]
            unlisted += [module for module in modules if module not in named]
    assert not unlisted, f"not in the README module map: {unlisted}"


def test_runtime_keeps_its_public_imports() -> None:
    from minisgl.core import LLM, EngineConfig, GenerationResult, ModelConfig, SamplingParams
    from minisgl.core.runtime import Runtime, StepResult, StepTiming

    assert all((LLM, EngineConfig, GenerationResult, ModelConfig, SamplingParams))
    assert Runtime.__module__ == "minisgl.core.runtime.runtime"
    assert StepResult.__module__ == "minisgl.core.runtime.results"
    assert StepTiming.__module__ == "minisgl.core.runtime.timing"

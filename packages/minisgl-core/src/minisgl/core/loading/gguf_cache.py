"""GGUF models converted once into a Hugging Face directory (config.json, tokenizer files,
model.safetensors) in a cache, and loaded from there afterwards.

Reading a GGUF file is slow: transformers' reader parses the whole metadata (the tokenizer's vocabulary
included) for the config, again for the tokenizer, and a third time before dequantizing every tensor,
about 20 s for SmolLM2-135M on two cores, in every process that loads it (the tokenizer process and each
TP rank). The converted directory loads in a few seconds, and its safetensors can be sliced, so a TP rank
reads only its own shard.

The cache lives in $MINISGL_GGUF_CACHE (default ~/.cache/minisgl/gguf); MINISGL_GGUF_CACHE=off reads the
GGUF file every time. An entry is keyed by the file (path, size, modification time) and the transformers
version (which does the dequantizing). Concurrent processes convert once: a file lock serializes them and
an entry only appears, by an atomic rename, once complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from minisgl.core import env
from minisgl.core.loading.model_source import ModelSource
from minisgl.kernels.jit import file_lock

logger = logging.getLogger("minisgl")

# Bump when the layout of a converted entry changes.
FORMAT_VERSION = 1
# Entries hold float32 weights, about 8x a 4-bit file: bigger models are read from the GGUF every time.
MAX_CONVERTED_BYTES = 8 << 30
COMPLETE_MARKER = "minisgl-gguf-complete"


def cache_root() -> Path | None:
    """The cache directory, or None when the cache is turned off."""
    configured = env.GGUF_CACHE.get()
    if configured.lower() in ("off", "0", "false", "no"):
        return None
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "minisgl" / "gguf"


def converted(source: ModelSource) -> ModelSource:
    """The same model as a Hugging Face directory in the cache (converting it the first time), or source
    itself when it is not a GGUF file or the cache is off."""
    root = cache_root()
    if source.gguf_file is None or root is None:
        return source
    gguf = (source.directory / source.gguf_file).resolve()
    if gguf.stat().st_size * 8 > MAX_CONVERTED_BYTES:
        logger.info("%s is too large to keep a float32 conversion of; reading it directly", gguf.name)
        return source
    entry = root / f"{gguf.stem}-{_key(gguf)}"
    try:
        _convert_once(source, root, entry)
    except OSError as exc:  # a read-only or full disk: slower, but the model still loads
        logger.warning(
            "cannot keep a converted copy of %s in %s (%s); reading it directly", gguf.name, root, exc
        )
        return source
    return ModelSource(source.name, entry)


def _convert_once(source: ModelSource, root: Path, entry: Path) -> None:
    """Convert into entry unless it is complete; a file lock keeps two processes from both converting."""
    if (entry / COMPLETE_MARKER).is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f"{entry.name}.lock"):
        if not (entry / COMPLETE_MARKER).is_file():
            _convert(source, entry)


def _key(gguf: Path) -> str:
    import transformers

    stat = gguf.stat()
    text = f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{FORMAT_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _convert(source: ModelSource, entry: Path) -> None:
    from safetensors.torch import save_file

    from minisgl.core.loading.loader import load_hf_config, load_tokenizer, read_gguf_tensors

    logger.info("converting %s to a Hugging Face directory in %s (once)", source.gguf_file, entry)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        hf_config = load_hf_config(source)
        hf_config.save_pretrained(staging)
        tokenizer = load_tokenizer(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        tensors = {name: tensor.contiguous() for name, tensor in read_gguf_tensors(source, hf_config)}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / COMPLETE_MARKER).write_text(f"from {source.directory / str(source.gguf_file)}\n")
        shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry left by a killed conversion
        os.replace(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

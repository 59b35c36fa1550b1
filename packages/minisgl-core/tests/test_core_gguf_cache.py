"""The GGUF conversion cache, on the embedded SmolLM2 GGUF: the converted directory must hold exactly what
the GGUF reader gives (tensors bit for bit, the same tokenizer and chat template), be made once, and
replace an entry that a killed conversion left incomplete."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minisgl.core.loading import gguf_cache
from minisgl.core.loading.gguf_cache import COMPLETE_MARKER, converted
from minisgl.core.loading.loader import load_hf_config, load_tokenizer, read_gguf_tensors
from minisgl.core.loading.model_source import resolve_model

TEXTS = ["Hello world", " leading space", "naïve café 東京 🙂", "<|im_start|>user\nhi<|im_end|>", "a\n\n\tb"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_off_reads_the_gguf_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINISGL_GGUF_CACHE", "off")
    source = resolve_model("smollm2-135m")
    assert converted(source) is source


def test_an_unwritable_cache_falls_back_to_the_gguf_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MINISGL_GGUF_CACHE", str(blocker / "cache"))
    source = resolve_model("smollm2-135m")
    assert converted(source) is source


def test_the_conversion_is_exact_and_made_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINISGL_GGUF_CACHE", str(tmp_path))
    source = resolve_model("smollm2-135m")
    assert source.gguf_file is not None
    gguf = (source.directory / source.gguf_file).resolve()
    # What a conversion killed half-way leaves: the entry without its completion marker.
    stale = tmp_path / f"{gguf.stem}-{gguf_cache._key(gguf)}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"truncated")

    cached = converted(source)
    assert cached.directory == stale and not cached.is_gguf
    assert (stale / COMPLETE_MARKER).is_file()

    expected = dict(read_gguf_tensors(source, load_hf_config(source)))
    stored = load_file(str(stale / "model.safetensors"))
    assert set(stored) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(stored[name], torch.as_tensor(tensor)), name

    original, copy = load_tokenizer(source), load_tokenizer(cached)
    assert [copy.encode(t) for t in TEXTS] == [original.encode(t) for t in TEXTS]
    assert (copy.eos_token_id, copy.bos_token_id, len(copy)) == (
        original.eos_token_id,
        original.bos_token_id,
        len(original),
    )
    template = {"tokenize": False, "add_generation_prompt": True}
    assert copy.apply_chat_template(CHAT, **template) == original.apply_chat_template(CHAT, **template)

    # Made once: the next call finds the entry and converts nothing.
    marker_time = (stale / COMPLETE_MARKER).stat().st_mtime_ns
    monkeypatch.setattr(gguf_cache, "_convert", lambda *args: pytest.fail("converted again"))
    assert converted(source).directory == stale
    assert (stale / COMPLETE_MARKER).stat().st_mtime_ns == marker_time

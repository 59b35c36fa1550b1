"""Model registry: Hugging Face architecture name -> model class."""

from __future__ import annotations

from minisgl.core.config import ModelConfig
from minisgl.core.models.decoder import DecoderForCausalLM

# Llama, Mistral, Qwen2 and Qwen3 are one dense decoder; ModelConfig carries their differences.
ARCHITECTURES: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "MistralForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
}


def create_model(config: ModelConfig) -> DecoderForCausalLM:
    if config.architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture {config.architecture!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return ARCHITECTURES[config.architecture](config)

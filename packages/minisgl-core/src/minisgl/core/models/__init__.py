"""Model registry: Hugging Face architecture name -> model class."""

from __future__ import annotations

from minisgl.core.config import ModelConfig
from minisgl.core.models.decoder import DecoderForCausalLM

# Llama, Mistral, Qwen2, Qwen3 and Qwen3-MoE are one decoder; ModelConfig carries their differences.
ARCHITECTURES: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "MistralForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
    "Qwen3MoeForCausalLM": DecoderForCausalLM,
}


def create_model(config: ModelConfig, moe_backend: str = "torch") -> DecoderForCausalLM:
    if config.architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture {config.architecture!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return ARCHITECTURES[config.architecture](config, moe_backend)

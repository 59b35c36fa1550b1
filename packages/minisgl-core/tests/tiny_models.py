"""Seeded tiny random models of every supported architecture, and a transformers reference on them.

The models are small enough that the reference runs in milliseconds on CPU, but each one exercises
the feature that sets its architecture apart: llama3 rope scaling, Qwen2 qkv bias, Qwen3 q/k norm with
an explicit head_dim, tied embeddings, a sharded checkpoint, Qwen3-MoE sparse blocks (top-2 of 8 experts,
with and without renormalised router weights, dense layers between them by `mlp_only_layers` and by
`decoder_sparse_step`).

Random-init logits are nearly flat, which would make greedy argmax fragile against harmless float
reorderings. The weights are therefore drawn with a large ``initializer_range`` and every norm weight and
bias is made non-trivial, so logits spread over several units. `top1_gap` lets the tests check that the
reference never sits on a near-tie.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB_SIZE = 512
MAX_POSITIONS = 256

# The standard greedy workload of the parity tests.
GEN_LEN = 32
PROMPT_LENGTHS = [3, 5, 8, 13, 21, 34, 47, 60]
PROMPT_SEED = 100

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# llama3 rope scaling with a short original context, so that (for head_dim 16) some frequencies are
# kept, one is smoothed and the rest are divided by `factor`: every branch of the formula is used.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@dataclass(frozen=True)
class TinySpec:
    name: str
    config_cls: type[PretrainedConfig]
    kwargs: dict[str, Any]
    seed: int
    max_shard_size: str | None = None  # a small value saves a sharded checkpoint


SPECS: dict[str, TinySpec] = {
    spec.name: spec
    for spec in [
        TinySpec("llama", LlamaConfig, dict(rope_theta=10000.0, rms_norm_eps=1e-5), seed=1),
        TinySpec(
            "llama3-rope",
            LlamaConfig,
            dict(
                rope_theta=500000.0,
                rope_scaling=dict(LLAMA3_ROPE),
                num_hidden_layers=3,
                tie_word_embeddings=True,
                rms_norm_eps=1e-5,
            ),
            seed=2,
        ),
        TinySpec(
            "qwen2",
            Qwen2Config,
            dict(
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                use_sliding_window=False,
                sliding_window=None,
                tie_word_embeddings=False,
            ),
            seed=3,
            max_shard_size="100KB",
        ),
        TinySpec(
            "qwen3",
            Qwen3Config,
            dict(
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                head_dim=24,
                use_sliding_window=False,
                sliding_window=None,
                tie_word_embeddings=False,
                attention_bias=False,
            ),
            seed=4,
        ),
        # Awkward for tensor parallelism on purpose: one KV head (replicated over ranks), a vocabulary
        # that 3 does not divide, and row-parallel biases (o_proj, down_proj) that must be added once.
        TinySpec(
            "llama-mqa",
            LlamaConfig,
            dict(
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                hidden_size=96,
                intermediate_size=192,
                num_attention_heads=6,
                num_key_value_heads=1,
                attention_bias=True,
                mlp_bias=True,
                tie_word_embeddings=False,
            ),
            seed=6,
        ),
        TinySpec(
            "qwen3-moe",
            Qwen3MoeConfig,
            dict(
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                head_dim=16,
                num_hidden_layers=3,
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                norm_topk_prob=True,
                mlp_only_layers=[1],  # layers 0 and 2 sparse, 1 dense
                tie_word_embeddings=False,
            ),
            seed=7,
        ),
        TinySpec(
            "qwen3-moe-step2",
            Qwen3MoeConfig,
            dict(
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                num_hidden_layers=4,
                num_experts=6,
                num_experts_per_tok=2,
                moe_intermediate_size=48,
                norm_topk_prob=False,
                decoder_sparse_step=2,  # layers 1 and 3 sparse, 0 and 2 dense
                tie_word_embeddings=True,
            ),
            seed=8,
        ),
        TinySpec(
            "mistral",
            MistralConfig,
            dict(
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                sliding_window=None,
                num_hidden_layers=3,
                tie_word_embeddings=False,
            ),
            seed=5,
        ),
    ]
}


def build_model(spec: TinySpec) -> PreTrainedModel:
    """A seeded random fp32 model whose norms and biases are not at their trivial init."""
    config = spec.config_cls(**{**_COMMON, **spec.kwargs})
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(spec.seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm weights, incl. Qwen3 q_norm / k_norm
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):  # Qwen2 q/k/v biases are zero at init
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model.eval()


def save_model(spec: TinySpec, directory: Path) -> Path:
    model = build_model(spec)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if spec.max_shard_size is not None:
        kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(str(directory), **kwargs)
    return directory


def load_reference(directory: Path) -> PreTrainedModel:
    """The transformers model read back from disk: the reference sees exactly what the engine sees."""
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return model.eval()


def saved_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def make_prompts(seed: int, lengths: list[int], vocab_size: int = VOCAB_SIZE) -> list[list[int]]:
    """Token-id prompts; ids start at 3 so that no prompt contains pad / bos / eos by accident."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def full_logprobs(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of one sequence, shape (len(ids), vocab)."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@dataclass
class GreedyReference:
    prompt: list[int]
    output: list[int]
    output_logprobs: list[float]  # logprob of each generated token
    prompt_logprobs: list[float | None]  # over prompt + output: entry i = logprob of token i given < i
    min_gap: float  # the smallest top-1 minus top-2 logit gap met while decoding


@torch.no_grad()
def greedy_reference(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> GreedyReference:
    """Greedy decoding by full re-forward at every step (no KV cache), then one teacher-forced pass."""
    ids = list(prompt)
    min_gap = float("inf")
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        min_gap = min(min_gap, float(top2[0] - top2[1]))
        ids.append(int(torch.argmax(logits)))
    logprobs = full_logprobs(model, ids)
    # position p predicts token p + 1
    per_token: list[float | None] = [None] + [float(logprobs[p, ids[p + 1]]) for p in range(len(ids) - 1)]
    output = ids[len(prompt) :]
    return GreedyReference(
        prompt=list(prompt),
        output=output,
        output_logprobs=[float(x) for x in per_token[len(prompt) :]],  # type: ignore[arg-type]
        prompt_logprobs=per_token,
        min_gap=min_gap,
    )

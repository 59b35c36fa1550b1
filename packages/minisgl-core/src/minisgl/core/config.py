"""Configuration: what the model is (ModelConfig, read from a Hugging Face config) and how the engine runs
it (EngineConfig, chosen by the user and declared in engine_config; here: what its names mean in torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from minisgl.core.engine_config import DTYPES
from minisgl.core.engine_config import EngineConfig as EngineConfig  # its torch-free home

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_settings(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, scaling dict or None) for transformers 4.x and 5.x configs alike.

    transformers 5 folds theta and scaling into one `rope_parameters` dict; 4.x keeps `rope_theta` and an
    optional `rope_scaling` dict whose type key is `rope_type` (or the legacy `type`).
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), _rope_scaling(params)
    raw = getattr(hf_config, "rope_scaling", None)
    return float(getattr(hf_config, "rope_theta", 10000.0)), _rope_scaling(raw) if raw else None


def _rope_scaling(settings: dict[str, Any]) -> dict[str, Any] | None:
    """The scaling settings with their type under `rope_type`; None for plain RoPE."""
    rope_type = settings.get("rope_type", settings.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    scaling = {k: v for k, v in settings.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = rope_type
    return scaling


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the engine needs, independent of the transformers version."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: torch.dtype | None
    # Llama/Qwen3 `attention_bias` also gives o_proj a bias (Qwen2's q/k/v biases do not); Llama's
    # `mlp_bias` gives gate, up and down a bias.
    o_bias: bool = False
    mlp_bias: bool = False
    # Mixture of experts (Qwen3-MoE). num_experts 0: every layer has the dense MLP. Otherwise layer i has a
    # sparse block of `num_experts` SwiGLU experts of `moe_intermediate_size` (a router picks
    # `num_experts_per_tok` per token) when (i + 1) % decoder_sparse_step == 0 and i is not in
    # mlp_only_layers, and the dense MLP of `intermediate_size` otherwise.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.num_experts > 0
            and layer_id not in self.mlp_only_layers
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    def local_kv_heads(self, tp_size: int) -> int:
        """KV heads held by one rank: split evenly, or one replicated head when there are fewer than ranks."""
        return max(1, self.num_kv_heads // tp_size)

    def check_tp(self, tp_size: int) -> None:
        """Raise ValueError naming the dimension that cannot be split over tp_size ranks."""
        if tp_size == 1:
            return
        moe_layers = [self.is_moe_layer(i) for i in range(self.num_layers)]
        checked = [("attention heads", self.num_heads)]
        if not all(moe_layers):
            checked.append(("intermediate size", self.intermediate_size))
        if any(moe_layers):
            # Experts are split on their intermediate dimension: every rank holds a slice of each.
            checked.append(("expert intermediate size (moe_intermediate_size)", self.moe_intermediate_size))
        for what, size in checked:
            if size % tp_size:
                raise ValueError(f"tp size {tp_size} does not divide the model's {what} ({size})")
        check_kv_split(self.num_kv_heads, tp_size)

    @classmethod
    def from_hf(cls, hf_config: Any, extra_eos_ids: tuple[int, ...] = ()) -> ModelConfig:
        num_heads = int(hf_config.num_attention_heads)
        hidden_size = int(hf_config.hidden_size)
        head_dim = getattr(hf_config, "head_dim", None) or hidden_size // num_heads
        theta, scaling = _rope_settings(hf_config)
        model_type = getattr(hf_config, "model_type", "")
        eos = _as_id_tuple(getattr(hf_config, "eos_token_id", None))
        return cls(
            architecture=_architecture(hf_config),
            hidden_size=hidden_size,
            intermediate_size=int(hf_config.intermediate_size),
            num_layers=int(hf_config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            vocab_size=int(hf_config.vocab_size),
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 4096)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama-family configs say so with `attention_bias`.
            qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            o_bias=model_type != "qwen2" and bool(getattr(hf_config, "attention_bias", False)),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            eos_token_ids=tuple(dict.fromkeys(eos + extra_eos_ids)),
            checkpoint_dtype=_checkpoint_dtype(hf_config),
            **_moe_settings(hf_config),
        )


def _architecture(hf_config: Any) -> str:
    """The config's architecture, or the one its model_type implies (GGUF-derived configs have none)."""
    architectures = getattr(hf_config, "architectures", None)
    if architectures:
        return str(architectures[0])
    model_type = getattr(hf_config, "model_type", "")
    return _ARCH_BY_MODEL_TYPE.get(model_type, f"<unknown model_type {model_type!r}>")


def _checkpoint_dtype(hf_config: Any) -> torch.dtype | None:
    # Newer transformers name it dtype and warn when torch_dtype is read; older ones know only torch_dtype.
    dtype = hf_config.dtype if hasattr(hf_config, "dtype") else getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _moe_settings(hf_config: Any) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from a Qwen3-MoE style config; none for a dense model."""
    num_experts = int(getattr(hf_config, "num_experts", 0) or 0)
    if num_experts == 0:
        return {}
    top_k = _experts_per_token(hf_config, num_experts)
    step = _sparse_step(hf_config)
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(hf_config.moe_intermediate_size),
        norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)),
        decoder_sparse_step=step,
        mlp_only_layers=tuple(int(i) for i in getattr(hf_config, "mlp_only_layers", None) or ()),
    )


def _experts_per_token(hf_config: Any, num_experts: int) -> int:
    top_k = int(hf_config.num_experts_per_tok)
    if not 0 < top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok {top_k} must be in 1..num_experts ({num_experts})")
    return top_k


def _sparse_step(hf_config: Any) -> int:
    """Every step-th layer is sparse (decoder_sparse_step)."""
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    if step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {step}")
    return step


_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, dtype) for name, dtype in DTYPES.items()}


def parse_dtype(
    name: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: torch.device
) -> torch.dtype:
    """Resolve a user dtype. "auto" takes the checkpoint's dtype on a GPU and float32 on the CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


# The KV_CACHE_DTYPES of engine_config other than "auto".
_KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "fp8_e4m3": torch.float8_e4m3fn}


def parse_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's dtype for a kv_cache_dtype that EngineConfig accepted."""
    return model_dtype if name == "auto" else _KV_DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device(name)
    if not name.startswith("cuda"):
        raise ValueError(f"device {name!r} is not one of: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available; use device='cpu'")
    return torch.device(name)


def default_page_size(device: torch.device) -> int:
    return 16 if device.type == "cuda" else 1


def check_kv_split(num_kv_heads: int, tp_size: int) -> None:
    """KV heads are split over ranks, or each replicated on tp/kv ranks: one must divide the other."""
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"tp size {tp_size} and the model's {num_kv_heads} KV heads: one must divide the other "
            "(KV heads are split over ranks, or each replicated on tp/kv ranks)"
        )


def pages_for(num_tokens: int, page_size: int) -> int:
    return math.ceil(num_tokens / page_size)

"""Configuration: what the model is (ModelConfig, read from a Hugging Face config) and how the engine runs
it (EngineConfig, chosen by the user)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
MOE_BACKENDS = ("auto", "torch", "flashinfer")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


def _rope_settings(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, scaling dict or None) for transformers 4.x and 5.x configs alike.

    transformers 5 folds theta and scaling into one `rope_parameters` dict; 4.x keeps `rope_theta` and an
    optional `rope_scaling` dict whose type key is `rope_type` (or the legacy `type`).
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling: dict[str, Any] | None = dict(params)
    else:
        theta = float(getattr(hf_config, "rope_theta", 10000.0))
        raw = getattr(hf_config, "rope_scaling", None)
        scaling = dict(raw) if raw else None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
        elif rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
    return theta, scaling


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
        architectures = getattr(hf_config, "architectures", None) or []
        if not architectures:
            model_type = getattr(hf_config, "model_type", "")
            architectures = [_ARCH_BY_MODEL_TYPE.get(model_type, f"<unknown model_type {model_type!r}>")]
        architecture = architectures[0]
        num_heads = int(hf_config.num_attention_heads)
        hidden_size = int(hf_config.hidden_size)
        head_dim = getattr(hf_config, "head_dim", None) or hidden_size // num_heads
        theta, scaling = _rope_settings(hf_config)
        model_type = getattr(hf_config, "model_type", "")
        eos = _as_id_tuple(getattr(hf_config, "eos_token_id", None))
        # Newer transformers name it dtype and warn when torch_dtype is read; older ones know only torch_dtype.
        dtype = hf_config.dtype if hasattr(hf_config, "dtype") else getattr(hf_config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return cls(
            architecture=architecture,
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
            checkpoint_dtype=dtype if isinstance(dtype, torch.dtype) else None,
            **_moe_settings(hf_config),
        )


def _moe_settings(hf_config: Any) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from a Qwen3-MoE style config; none for a dense model."""
    num_experts = int(getattr(hf_config, "num_experts", 0) or 0)
    if num_experts == 0:
        return {}
    top_k = int(hf_config.num_experts_per_tok)
    if not 0 < top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok {top_k} must be in 1..num_experts ({num_experts})")
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    if step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {step}")
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(hf_config.moe_intermediate_size),
        norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)),
        decoder_sparse_step=step,
        mlp_only_layers=tuple(int(i) for i in getattr(hf_config, "mlp_only_layers", None) or ()),
    )


_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


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


# KV cache element types: "auto" is the model's dtype; fp8_e4m3 stores K and V in one byte each, scaled
# per layer (FlashInfer attention on CUDA; the torch backend dequantizes them).
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8_e4m3")
_KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "fp8_e4m3": torch.float8_e4m3fn}


def parse_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's dtype for a kv_cache_dtype that EngineConfig.validate accepted."""
    return model_dtype if name == "auto" else _KV_DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available; use device='cpu'")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device {name!r} is not one of: auto, cpu, cuda, cuda:N")
    return torch.device(name)


@dataclass
class EngineConfig:
    """How the engine runs a model. Every field has a keyword of the same name on `LLM(...)`."""

    device: str = "auto"
    dtype: str = "auto"
    # Tokens per KV page; None: 16 on CUDA (FlashInfer's tensor-core decode reads pages of 16 fastest), 1
    # on the CPU.
    page_size: int | None = None
    max_running_requests: int = 256
    # Token budget of one prefill batch; longer prompts are prefilled in chunks of at most this size.
    max_prefill_tokens: int = 8192
    # KV pool size in pages; None sizes it from memory (memory_ratio of free GPU memory after the weights,
    # or cpu_kv_cache_gib on the CPU).
    num_kv_pages: int | None = None
    memory_ratio: float = 0.9
    cpu_kv_cache_gib: float = 2.0
    # Context length; None takes the model's max_position_embeddings.
    max_seq_len: int | None = None
    load_format: str = "auto"
    # "radix" reuses the KV of shared prefixes; "naive" computes every prompt in full.
    cache: str = "radix"
    # Attention backend: "auto" (fa3,fi on Hopper, fi on other GPUs, torch on the CPU), "torch", "fi",
    # "fa3", or "prefill,decode".
    attn: str = "auto"
    # Decode steps of running requests ride along in prefill batches instead of waiting for them.
    mix_decode_into_prefill: bool = True
    # Overlap scheduling (prepare step N+1 while step N runs); also off with MINISGL_DISABLE_OVERLAP_SCHEDULING=1.
    disable_overlap: bool = False
    # KV cache element type: auto (the model's dtype), bfloat16, float16, or fp8_e4m3 (one byte per
    # element, so twice the pages in the same memory; K and V scaled per layer, 1.0 unless the checkpoint
    # carries k_scale / v_scale).
    kv_cache_dtype: str = "auto"
    # Decode CUDA graphs up to this batch size; None: min(256, max_running_requests); 0 disables them.
    cuda_graph_max_bs: int | None = None
    seed: int = 0
    tp_size: int = 1
    # Expert compute of mixture-of-experts models: "torch" (grouped GEMMs), "flashinfer" (its CUTLASS
    # fused MoE, CUDA only) or "auto" (torch).
    moe_backend: str = "auto"

    def validate(self) -> None:
        if self.page_size is not None and (self.page_size < 1 or self.page_size & (self.page_size - 1)):
            raise ValueError(f"page_size must be a power of two >= 1, got {self.page_size}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.num_kv_pages is not None and self.num_kv_pages < 1:
            raise ValueError(f"num_kv_pages must be >= 1, got {self.num_kv_pages}")
        if not 0.0 < self.memory_ratio <= 1.0:
            raise ValueError(f"memory_ratio must be in (0, 1], got {self.memory_ratio}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}"
            )
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 0:
            raise ValueError(f"cuda_graph_max_bs must be >= 0, got {self.cuda_graph_max_bs}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.cache not in ("radix", "naive"):
            raise ValueError(f"cache must be radix or naive, got {self.cache!r}")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(
                f"moe_backend must be one of {', '.join(MOE_BACKENDS)}, got {self.moe_backend!r}"
            )
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.tp_size > 1 and self.device.startswith("cuda:"):
            raise ValueError(
                f"device {self.device!r} names one GPU, but tp_size={self.tp_size} ranks need one each: "
                "use device='cuda' (rank r takes GPU r)"
            )


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

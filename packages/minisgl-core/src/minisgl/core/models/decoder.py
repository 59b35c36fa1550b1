"""The decoder shared by Llama, Mistral, Qwen2, Qwen3 and Qwen3-MoE: pre-norm blocks of grouped-query
attention with rotary embeddings and a SwiGLU MLP. The architectures differ only in flags from
ModelConfig: q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), and sparse mixture-of-experts blocks in
place of the MLP in some layers (Qwen3-MoE)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from minisgl.core.config import ModelConfig
from minisgl.core.layers import fused_ops
from minisgl.core.layers.activation import silu_and_mul
from minisgl.core.layers.attention import PagedAttention
from minisgl.core.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from minisgl.core.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from minisgl.core.layers.moe import EXPERT_TENSOR, STACKED_NAMES, SparseMoeBlock, StackedExperts
from minisgl.core.layers.norm import RMSNorm
from minisgl.core.layers.rotary import RotaryEmbedding
from minisgl.core.parallel.distributed import get_tp
from minisgl.kernels import ROPE_STORE_HEAD_DIMS


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        tp = get_tp()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads, config.qkv_bias
        )
        self.num_heads = config.num_heads // tp.size
        self.num_kv_heads = self.qkv_proj.local_kv_heads
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, bias=config.o_bias
        )
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(layer_id)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if fused_ops.available(qkv) and self.head_dim in ROPE_STORE_HEAD_DIMS:
            qk_norm = None
            if self.q_norm is not None and self.k_norm is not None:
                qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
            out = self.attn.forward_fused(
                qkv, positions, self.rotary.cos_sin, qk_norm, self.num_heads, self.num_kv_heads
            )
            return self.o_proj(out)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], bias=config.mlp_bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, moe_backend: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_id, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (
            SparseMoeBlock(config, moe_backend) if config.is_moe_layer(layer_id) else MLP(config)
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.forward_with_residual(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm.forward_with_residual(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, moe_backend: str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One rotary table shared by all layers.
        rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary, moe_backend) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        assert residual is not None
        hidden, _ = self.norm.forward_with_residual(hidden, residual)
        return hidden


# Checkpoint tensor name fragment -> (our module attribute, shard index) for merged layers.
_MERGED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Checkpoint tensors that carry no weights we use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Per-layer FP8 KV cache scales of quantized checkpoints: `self_attn.k_scale`, or under a submodule
# (`self_attn.k_proj.k_scale`, `self_attn.attn.k_scale`); of per-head scales the layer takes the largest.
_KV_SCALE = re.compile(r"model\.layers\.(?P<layer>\d+)\.self_attn\.(?:\w+\.)?(?P<kind>[kv])_scale")


class DecoderForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, moe_backend: str = "torch") -> None:
        """moe_backend: a resolved moe_ops backend (torch or flashinfer); dense models ignore it."""
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, moe_backend)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        # The checkpoint's KV cache scales, if it has any: {"k": {layer: scale}, "v": {...}}.
        self.kv_scales: dict[str, dict[int, float]] = {"k": {}, "v": {}}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Returns the final hidden states, one row per input token; see compute_logits."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Loads checkpoint tensors by their Hugging Face names; returns the names it did not use.
        Raises ValueError naming the first parameter left unloaded or a tensor of the wrong shape."""
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        unused: list[str] = []
        for name, tensor in tensors:
            if name.endswith(_IGNORED_SUFFIXES) or self._took_kv_scale(name, tensor):
                continue
            target = self._route(name)
            if target is None or target[0] not in modules:
                unused.append(name)
                continue
            module_name, shard, param = target
            modules[module_name].load_weight(name, tensor, shard)
            loaded.add(f"{module_name}.{param}#{shard}")
        self._tie_embeddings(loaded)
        self._check_complete(loaded)
        return unused

    def _took_kv_scale(self, name: str, tensor: torch.Tensor) -> bool:
        """A checkpoint's FP8 KV cache scale is kept in kv_scales (the runtime hands it to the KV pool)."""
        scale = _KV_SCALE.fullmatch(name)
        if scale is not None:
            self.kv_scales[scale["kind"]][int(scale["layer"])] = float(tensor[...].float().max())
        return scale is not None

    def _tie_embeddings(self, loaded: set[str]) -> None:
        """A tied LM head shares the loaded embedding."""
        if self.config.tie_word_embeddings and "model.embed_tokens.weight#0" in loaded:
            self.lm_head.weight = self.model.embed_tokens.weight
            loaded.add("lm_head.weight#0")

    def _missing_params(self, loaded: set[str]) -> list[str]:
        """Parameters (of modules that load weights) that no checkpoint tensor filled, in name order."""
        expected: set[str] = set()
        for module_name, module in self.named_modules():
            # StackedExperts reads two checkpoint layouts, so it keeps its own account: _missing_experts.
            if hasattr(module, "load_weight") and not isinstance(module, StackedExperts):
                expected.update(_param_shards(module_name, module))
        return [m.split("#")[0] for m in sorted(expected - loaded)]

    def _missing_experts(self) -> list[str]:
        return [
            f"{module_name}.{name}"
            for module_name, module in self.named_modules()
            if isinstance(module, StackedExperts)
            for name in module.unloaded()
        ]

    def _route(self, name: str) -> tuple[str, int, str] | None:
        """Map an HF tensor name to (module, shard, parameter)."""
        expert = EXPERT_TENSOR.match(name)
        if expert is not None:  # a per-expert tensor: its shard is its expert
            return expert["module"], int(expert["expert"]), f"{expert['proj']}_proj"
        module_name, _, param = name.rpartition(".")
        if module_name.endswith(".experts") and param not in STACKED_NAMES:
            return None
        parent, _, leaf = module_name.rpartition(".")
        if leaf in _MERGED:
            merged, shard = _MERGED[leaf]
            return f"{parent}.{merged}", shard, param
        return module_name, 0, param

    def _check_complete(self, loaded: set[str]) -> None:
        missing = self._missing_params(loaded) + self._missing_experts()
        if missing:
            raise ValueError(f"checkpoint is missing tensor(s) for: {', '.join(missing[:5])}")


def _param_shards(module_name: str, module: nn.Module) -> Iterator[str]:
    """ "module.param#shard" for each shard a checkpoint fills of each of the module's parameters."""
    shards = len(module.full_out_sizes) if isinstance(module, ColumnParallelLinear) else 1
    for param, value in module.named_parameters(recurse=False):
        if value is not None:
            yield from (f"{module_name}.{param}#{s}" for s in range(shards))

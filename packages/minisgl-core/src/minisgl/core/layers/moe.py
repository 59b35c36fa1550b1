"""The sparse mixture-of-experts block of Qwen3-MoE: a replicated router and stacked SwiGLU experts.

Tensor parallelism splits every expert on its intermediate dimension (like the dense MLP): each rank holds
a slice of every expert's gate, up and down projections, computes its partial output for all tokens and
their routed experts, and one all-reduce after the block sums the slices. The router is small and
replicated, so every rank routes identically.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from minisgl.core.config import ModelConfig
from minisgl.core.layers import moe_ops
from minisgl.core.layers.linear import ReplicatedLinear, _check_shape
from minisgl.core.parallel.distributed import all_reduce, get_tp

# A per-expert checkpoint tensor, as Hugging Face checkpoints store them.
EXPERT_TENSOR = re.compile(r"^(?P<module>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
# transformers 5 (and its GGUF reader) stack them per layer instead: gate_up_proj (experts, 2 * inter,
# hidden) with gate rows first, and down_proj (experts, hidden, inter).
STACKED_NAMES = ("gate_up_proj", "down_proj")


class StackedExperts(nn.Module):
    """This rank's slice of every expert: w13 (experts, 2 * local_inter, hidden), gate and up rows in the
    backend's order (moe_ops.W13_ORDER), and w2 (experts, hidden, local_inter). Loads either checkpoint
    layout and remembers what it got, so that a missing expert is reported by name."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, w13_order: str) -> None:
        super().__init__()
        tp = get_tp()
        if intermediate_size % tp.size:
            raise ValueError(
                f"expert intermediate size {intermediate_size} is not divisible by tp size {tp.size}"
            )
        self.num_experts = num_experts
        self.full_inter = intermediate_size
        self.local_inter = intermediate_size // tp.size
        self.hidden_size = hidden_size
        self.gate_slot = 0 if w13_order == moe_ops.GATE_FIRST else 1
        self.w13 = nn.Parameter(
            torch.empty(num_experts, 2 * self.local_inter, hidden_size), requires_grad=False
        )
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_inter), requires_grad=False)
        self._loaded: set[tuple[str, int]] = set()

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """A per-expert tensor (`shard` is its expert) or a stacked one (all experts)."""
        match = EXPERT_TENSOR.match(name)
        if match is not None:
            self._load_expert(name, shard, match["proj"], tensor)
            return
        if name.endswith("gate_up_proj"):
            _check_shape(
                name, torch.Size([self.num_experts, 2 * self.full_inter, self.hidden_size]), tensor.shape
            )
            for expert in range(self.num_experts):
                self._copy_rows(expert, "gate", tensor[expert, self._rows(0)])
                self._copy_rows(expert, "up", tensor[expert, self._rows(self.full_inter)])
        else:
            _check_shape(
                name, torch.Size([self.num_experts, self.hidden_size, self.full_inter]), tensor.shape
            )
            for expert in range(self.num_experts):
                self._copy_down(expert, tensor[expert, :, self._rows(0)])

    def unloaded(self) -> list[str]:
        """Checkpoint names of the expert tensors not loaded yet."""
        return [
            f"{expert}.{proj}_proj.weight"
            for expert in range(self.num_experts)
            for proj in ("gate", "up", "down")
            if (proj, expert) not in self._loaded
        ]

    def _load_expert(self, name: str, expert: int, proj: str, tensor: torch.Tensor) -> None:
        if expert >= self.num_experts:
            raise ValueError(f"tensor {name!r}: the model has {self.num_experts} experts")
        if proj == "down":
            _check_shape(name, torch.Size([self.hidden_size, self.full_inter]), tensor.shape)
            self._copy_down(expert, tensor[:, self._rows(0)])
        else:
            _check_shape(name, torch.Size([self.full_inter, self.hidden_size]), tensor.shape)
            self._copy_rows(expert, proj, tensor[self._rows(0)])

    def _rows(self, start: int) -> slice:
        """This rank's slice of an intermediate dimension that begins at `start`."""
        first = start + get_tp().rank * self.local_inter
        return slice(first, first + self.local_inter)

    def _copy_rows(self, expert: int, proj: str, rows: torch.Tensor) -> None:
        slot = self.gate_slot if proj == "gate" else 1 - self.gate_slot
        self.w13.data[expert, slot * self.local_inter : (slot + 1) * self.local_inter].copy_(rows)
        self._loaded.add((proj, expert))

    def _copy_down(self, expert: int, columns: torch.Tensor) -> None:
        self.w2.data[expert].copy_(columns)
        self._loaded.add(("down", expert))


class SparseMoeBlock(nn.Module):
    """Route each token to its top-k experts, run them, sum their outputs weighted by the router."""

    def __init__(self, config: ModelConfig, backend: str) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts)
        self.experts = StackedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, moe_ops.W13_ORDER[backend]
        )
        self.compute_experts = moe_ops.EXPERT_FUNCTIONS[backend]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = moe_ops.route(self.gate(x), self.top_k, self.renormalize)
        return all_reduce(self.compute_experts(x, self.experts.w13, self.experts.w2, weights, ids))

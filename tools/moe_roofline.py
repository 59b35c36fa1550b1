"""Memory roofline of the offline benchmark workload for a model config, dense or mixture-of-experts.

Lower bound on the run's time = HBM bytes / bandwidth (the roofline docs/benchmarks.md uses for the dense
models, which this reproduces for them), where the bytes are
  - KV reads: every decode step reads each running request's whole KV so far (bf16);
  - weight reads: every decode step reads every non-expert weight (attention, norms, dense MLPs, routers,
    embeddings and LM head), plus, in each sparse layer, the experts that step's tokens are routed to.
    With B tokens each picking k of E experts uniformly at random (random weights route about
    uniformly), E * (1 - (1 - k/E)^B) experts are touched.
Decode step s runs every request whose output is longer than s tokens (the benchmark's ignore_eos
workload, all requests admitted at once). Prefill is compute-bound and left out of the bound; its
minimum time (2 x active parameters x prompt tokens / matmul rate) is printed beside it.

    python tools/moe_roofline.py --model qwen3-30b-a3b [--measured TOK_S] [--bandwidth 4.12e12]

prints the bound in output tok/s and, with --measured, the fraction of it a run reached.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from minisgl.core.bench import make_workload
from minisgl.core.config import ModelConfig
from minisgl.core.kv.kv_pool import KVPool
from minisgl.core.loading.loader import checkpoint_shapes, load_hf_config
from minisgl.core.loading.model_source import resolve_model

BF16 = 2


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(parameters every decode step reads: all but the experts, parameters of one expert)."""
    shapes = checkpoint_shapes(config)
    always = sum(math.prod(shape) for name, shape in shapes.items() if ".experts." not in name)
    one_expert = sum(math.prod(shape) for name, shape in shapes.items() if ".experts.0." in name)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    return always, one_expert // max(moe_layers, 1)


def roofline(config: ModelConfig, workload: Any, bandwidth: float, matmul_rate: float) -> dict[str, float]:
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    per_step, expert_params = parameter_counts(config)
    kv_per_token = KVPool.bytes_per_token(
        config.num_layers, config.num_kv_heads, config.head_dim, torch.bfloat16
    )
    inputs, outputs = [len(p) for p in workload.prompts], workload.output_lens
    kv_bytes = sum(o * i + o * (o - 1) // 2 for i, o in zip(inputs, outputs, strict=True)) * kv_per_token
    decode_steps = range(1, max(outputs))
    weight_bytes = per_step * BF16 * len(decode_steps)
    expert_bytes = 0.0
    if moe_layers:
        k, e = config.num_experts_per_tok, config.num_experts
        for step in decode_steps:
            touched = e * (1 - (1 - k / e) ** sum(o > step for o in outputs))
            expert_bytes += moe_layers * touched * expert_params * BF16
    active = per_step + moe_layers * config.num_experts_per_tok * expert_params
    prefill_s = 2 * active * sum(inputs) / matmul_rate
    total_s = (kv_bytes + weight_bytes + expert_bytes) / bandwidth
    return {
        "kv_tb": kv_bytes / 1e12,
        "weights_tb": weight_bytes / 1e12,
        "experts_tb": expert_bytes / 1e12,
        "prefill_s": prefill_s,
        "bound_s": total_s,
        "bound_tok_s": workload.num_output_tokens / total_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen3-30b-a3b", help="a bundled config name or an HF directory")
    parser.add_argument("--bandwidth", type=float, default=4.12e12, help="bytes/s (the H200's copy rate)")
    parser.add_argument("--matmul-rate", type=float, default=790e12, help="bf16 FLOP/s (the H200's)")
    parser.add_argument("--measured", type=float, default=None, help="a run's output tok/s")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    args = parser.parse_args()
    config = ModelConfig.from_hf(load_hf_config(resolve_model(args.model)))
    workload = make_workload(args.num_prompts, args.max_input_len, args.max_output_len)
    result = roofline(config, workload, args.bandwidth, args.matmul_rate)
    print(
        f"{args.model}: {workload.num_output_tokens} output tokens; reads: KV {result['kv_tb']:.2f} TB, "
        f"dense weights {result['weights_tb']:.2f} TB, experts {result['experts_tb']:.2f} TB; "
        f"prefill {result['prefill_s']:.2f} s; bound {result['bound_s']:.2f} s = "
        f"{result['bound_tok_s']:,.0f} output tok/s"
    )
    if args.measured is not None:
        print(
            f"measured {args.measured:,.0f} tok/s = {args.measured / result['bound_tok_s']:.0%} of the bound"
        )


if __name__ == "__main__":
    main()

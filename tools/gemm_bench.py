"""How fast the model's linear layers run at decode and prefill sizes, on a GPU (performance work, not a test).

    python tools/gemm_bench.py --model qwen3-8b --tokens 64,128,256,8192,16384

For each projection of one layer (fused qkv, o, fused gate/up, down, and the LM head) and each token count
M, it times `F.linear(x, w)` as CUDA-graph replays over enough weight copies that the L2 cache cannot hold
them, and prints the bandwidth (weight and activation bytes moved once) and the compute rate. It also
prints the best rate of minisgl-kernels' benchmark copies for reference (4.12 TB/s on the H200, where the
LM head GEMM reads 4.06). --blas picks PyTorch's BLAS library.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from minisgl.kernels.bench import copy_bandwidths, gpu_time_us

CONFIGS = Path(__file__).resolve().parents[1] / "packages/minisgl-core/src/minisgl/core/loading/model_configs"
L2_DEFEAT_BYTES = 256 << 20  # several times the H100's 50 MB L2


def projection_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear layer, from the bundled config."""
    cfg = json.loads((CONFIGS / model / "config.json").read_text())
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    inter = cfg["intermediate_size"]
    return {
        "qkv": (q + 2 * kv, hidden),
        "o": (hidden, q),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
        "lm_head": (cfg["vocab_size"], hidden),
    }


def time_linear(m: int, out_features: int, in_features: int) -> tuple[float, float, float]:
    """(microseconds per call, TB/s, TFLOP/s) of x[m, in] @ w[out, in]^T in bf16."""
    weight_bytes = out_features * in_features * 2
    copies = max(1, -(-L2_DEFEAT_BYTES // weight_bytes)) if m <= 1024 else 1
    weights = [
        torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) for _ in range(copies)
    ]
    x = torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16)

    def run() -> None:
        for w in weights:
            F.linear(x, w)

    seconds = gpu_time_us(run, reps=1, iters=20) / 1e6 / copies
    moved = weight_bytes + 2 * m * (in_features + out_features)
    return seconds * 1e6, moved / seconds / 1e12, 2 * m * out_features * in_features / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--tokens", default="64,128,256,8192,16384")
    parser.add_argument("--blas", choices=["default", "cublas", "cublaslt"], default="default")
    args = parser.parse_args()
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    copy = max(copy_bandwidths(iters=10).values()) / 1e12
    print(f"{torch.cuda.get_device_name()}: copy {copy:.2f} TB/s; blas {args.blas}")
    shapes = projection_shapes(args.model)
    print(f"{'M':>6} " + " ".join(f"{name:>22}" for name in shapes) + "   (us, TB/s, TFLOP/s)")
    for m in (int(t) for t in args.tokens.split(",")):
        cells = []
        for out_features, in_features in shapes.values():
            us, tbs, tflops = time_linear(m, out_features, in_features)
            cells.append(f"{us:8.1f} {tbs:5.2f} {tflops:6.0f}")
        print(f"{m:>6} " + " ".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()

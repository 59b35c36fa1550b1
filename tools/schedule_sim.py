"""What a scheduling policy would do to the offline workload's wall time, from a step-cost model
calibrated on the H200 (performance planning, not a test).

    python tools/schedule_sim.py [--fixed-us 350]

The workload is the bench's (256 requests, prompt and output lengths uniform in [100, 1024], seed 0).
One step costs its GEMMs (weights read once, or the FLOPs of all its tokens: a smooth maximum of the
two, fitted to tools/gemm_bench.py's Qwen3-8B shapes at 64-8192 tokens), the LM head of its sampled
rows, the KV its decode rows read (at the decode kernel's measured 3.47 TB/s), its prefill attention,
per-token elementwise work, sampling and a fixed cost per step (--fixed-us, which calibrates the
defaults' run to the measured 14.6 s). It compares the engine's policy (prefill first, 8,192 tokens a
step, decodes riding along) with decode-first token budgets and caps on running requests: prefill
chunks that ride on memory-bound decode steps.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

# Qwen3-8B on the H200, per layer unless named (docs/benchmarks.md).
LAYERS = 36
WEIGHT_READ_US = 116.0  # the four projections' weights at the decode GEMMs' measured rate
FLOP_US_PER_TOKEN = 0.508  # the same GEMMs' FLOPs per token at about 760 TFLOP/s
LM_HEAD_READ_US, LM_HEAD_US_PER_ROW = 306.0, 1.64
KV_BYTES_PER_TOKEN, DECODE_ATTENTION_BPS = 147456, 3.47e12
PREFILL_ATTENTION_US_PER_QK = 4 * 32 * 128 * LAYERS / 350e12 * 1e6  # FA3 at about 350 TFLOP/s
ELEMENTWISE_US, ELEMENTWISE_US_PER_TOKEN = 300.0, 1.77
SAMPLING_US = 470.0


def smooth_max(a: float, b: float) -> float:
    """Memory time and compute time overlap imperfectly: the cube norm fits the measured GEMMs."""
    return float((a**3 + b**3) ** (1 / 3))


@dataclass
class Step:
    decode_contexts: list[int]
    prefill_chunks: list[tuple[int, int, bool]]  # (prefix, tokens, samples)

    def cost_us(self, fixed_us: float) -> float:
        tokens = len(self.decode_contexts) + sum(q for _, q, _ in self.prefill_chunks)
        sampled = len(self.decode_contexts) + sum(1 for *_, s in self.prefill_chunks if s)
        cost = LAYERS * smooth_max(WEIGHT_READ_US, FLOP_US_PER_TOKEN * tokens)
        if sampled:
            cost += smooth_max(LM_HEAD_READ_US, LM_HEAD_US_PER_ROW * sampled) + SAMPLING_US
        cost += sum(self.decode_contexts) * KV_BYTES_PER_TOKEN / DECODE_ATTENTION_BPS * 1e6
        cost += sum(PREFILL_ATTENTION_US_PER_QK * q * (p + q / 2) for p, q, _ in self.prefill_chunks)
        return cost + ELEMENTWISE_US + ELEMENTWISE_US_PER_TOKEN * tokens + fixed_us


def workload(num: int = 256, seed: int = 0) -> tuple[list[int], list[int]]:
    """The bench's lengths (make_workload's draw order: each prompt's length, then its ids)."""
    random.seed(seed)
    prompts = []
    for _ in range(num):
        length = random.randint(100, 1024)
        for _ in range(length):
            random.randint(0, 10000)
        prompts.append(length)
    return prompts, [random.randint(100, 1024) for _ in range(num)]


def simulate(decode_first: bool, budget: int, max_running: int, fixed_us: float) -> tuple[float, int]:
    """(seconds, steps) of the workload under one policy."""
    prompts, outputs = workload()
    waiting = list(range(len(prompts)))
    computed, generated = [0] * len(prompts), [0] * len(prompts)
    running: list[int] = []
    total_us, steps = 0.0, 0
    while waiting or running:
        decoding = [i for i in running if computed[i] >= prompts[i]]
        left = budget - (len(decoding) if decode_first else 0)
        chunks: list[tuple[int, int]] = []
        for i in [i for i in running if computed[i] < prompts[i]]:
            if left > 0:
                chunks.append((i, min(prompts[i] - computed[i], left)))
                left -= chunks[-1][1]
        while waiting and left > 0 and len(running) < max_running:
            i = waiting.pop(0)
            running.append(i)
            chunks.append((i, min(prompts[i], left)))
            left -= chunks[-1][1]
        step = Step(
            [prompts[i] + generated[i] for i in decoding],
            [(computed[i], q, computed[i] + q >= prompts[i]) for i, q in chunks],
        )
        total_us += step.cost_us(fixed_us)
        steps += 1
        for i, q in chunks:
            computed[i] += q
            generated[i] += computed[i] >= prompts[i]
        for i in decoding:
            generated[i] += 1
        running = [i for i in running if generated[i] < outputs[i]]
    return total_us / 1e6, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixed-us", type=float, default=350.0, help="fixed cost per step, microseconds")
    args = parser.parse_args()
    output_tokens = sum(workload()[1])
    print("policy | budget | max running | seconds | steps | output tok/s")
    policies = [(False, 8192, 256)] + [
        (True, budget, running) for budget in (8192, 2048, 1024, 512, 256) for running in (256, 192, 128)
    ]
    for decode_first, budget, running in policies:
        seconds, steps = simulate(decode_first, budget, running, args.fixed_us)
        name = "decode first" if decode_first else "prefill first (engine)"
        print(f"{name} | {budget} | {running} | {seconds:.2f} | {steps} | {output_tokens / seconds:,.0f}")


if __name__ == "__main__":
    main()

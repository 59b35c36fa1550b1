"""The engine's host (Python) overhead per step, measured on the CPU with a tiny model so that the model
itself costs little: 256 requests admitted at once, 64 sampled tokens each, under cProfile.

    python tools/profile_host.py [--requests 256] [--top 25]

A proxy for the GPU, where the same scheduler, KV accounting and batch layout run on the host while the
device computes; it shows which host functions grow with the batch size.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "packages" / "minisgl-core" / "tests"))
import tiny_models

from minisgl.core import LLM, SamplingParams
from minisgl.core.runtime import StepTiming


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = tiny_models.save_model(tiny_models.SPECS["llama"], Path(tempfile.mkdtemp()) / "llama")
    llm = LLM(str(directory), device="cpu", dtype="float32", max_running_requests=args.requests)
    prompts = tiny_models.make_prompts(1, [16] * args.requests)
    params = SamplingParams(max_tokens=64, temperature=0.6, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
    timing = llm.runtime.timing = StepTiming()
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profile.disable()
    print(f"total {time.perf_counter() - started:.3f} s; {timing.summary()}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()

"""Tensor parallelism on the real embedded model: SmolLM2-135M (9 heads, 3 KV heads) at tp=1 and tp=3 on
the CPU, three chats greedily; prints load and generation times and whether the tokens are identical.

    python tools/tp_check_smollm2.py
"""

from __future__ import annotations

import time

from minisgl.core import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]


def main() -> None:
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(max_tokens=48, temperature=0)
    tokens = {}
    for tp in (1, 3):
        started = time.time()
        with LLM("smollm2-135m", device="cpu", tp_size=tp) as llm:
            loaded = time.time() - started
            started = time.time()
            results = llm.chat(conversations, params, use_tqdm=False)
            tokens[tp] = [r.token_ids for r in results]
            print(
                f"tp={tp} load {loaded:.1f}s generate {time.time() - started:.1f}s {results[0].text[:60]!r}"
            )
    print("identical:", tokens[1] == tokens[3])


if __name__ == "__main__":
    main()

"""Tensor parallelism on the real embedded model: SmolLM2-135M (9 heads, 3 KV heads) at tp=1 and tp=3 on
the CPU, three chats greedily; prints load and generation times and whether the tokens are identical.

    python tools/tp_check_smollm2.py
"""

import time
from minisgl.core import LLM, SamplingParams
conv = [[{"role": "user", "content": q}] for q in ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]]
p = SamplingParams(max_tokens=48, temperature=0)
if __name__ == "__main__":
    out = {}
    for tp in (1, 3):
        t = time.time()
        with LLM("smollm2-135m", device="cpu", tp_size=tp) as llm:
            load = time.time() - t
            t = time.time()
            res = llm.chat(conv, p, use_tqdm=False)
            out[tp] = [r.token_ids for r in res]
            print(f"tp={tp} load {load:.1f}s generate {time.time()-t:.1f}s", repr(res[0].text[:60]))
    print("identical:", out[1] == out[3])

"""A Qwen3-MoE model through the server: `minisgl serve --model DIR` on a tiny random Qwen3-MoE checkpoint
(safetensors in the per-expert layout of real checkpoints, the real SmolLM2 tokenizer) answers the
official `openai` client with exactly the tokens transformers' greedy decoding gives on the same weights."""

from __future__ import annotations

import signal
from pathlib import Path

import openai
import pytest
import torch
from conftest import save_smollm2_tokenizer, start_server, stop_cleanly, tiny_config_fields

PROMPT = "The capital of France is"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    directory = tmp_path_factory.mktemp("tiny-moe")
    tokenizer = save_smollm2_tokenizer(directory)
    config = Qwen3MoeConfig(
        **tiny_config_fields(tokenizer),
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=16,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    return directory


def _transformers_greedy(directory: Path) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1] :]]


def test_server_serves_a_moe_model(tmp_path: Path, tiny_moe_model: Path) -> None:
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(str(tiny_moe_model)).decode(_transformers_greedy(tiny_moe_model))
    server = start_server(tmp_path, "--model", str(tiny_moe_model), "--cpu-kv-cache-gib", "0.1")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [str(tiny_moe_model)]
        reply = client.completions.create(
            model=str(tiny_moe_model),
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS
        assert reply.choices[0].text == expected
    finally:
        stop_cleanly(server, signal.SIGTERM)

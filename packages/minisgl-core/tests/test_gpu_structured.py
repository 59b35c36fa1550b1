"""Structured output on a CUDA GPU with overlap scheduling and decode CUDA graphs on: random Qwen3-0.6B
weights with the SmolLM2 tokenizer (a directory from `tools/build_gpu_server_model.py DIR --tokenizer
smollm2`, named by MINISGL_STRUCTURED_MODEL), constrained and free requests in the same batches, every constrained output
checked with jsonschema / re. The masks are applied by xgrammar's Triton kernel to the graph's logits."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch
from test_core_structured import PERSON

from minisgl.core import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SCHEMA = PERSON


@pytest.fixture(scope="module")
def llm() -> Iterator[Any]:
    path = os.environ.get("MINISGL_STRUCTURED_MODEL")
    if not path:
        pytest.skip(
            "set MINISGL_STRUCTURED_MODEL to a tools/build_gpu_server_model.py --tokenizer smollm2 dir"
        )
    engine = LLM(path, load_format="dummy", max_seq_len=2048, max_running_requests=64)
    assert engine.runtime.model_runner.graphs is not None and engine.runtime.max_in_flight == 2
    yield engine
    engine.shutdown()


def test_constrained_and_free_requests_share_graph_batches(llm: Any) -> None:
    prompts = [[random_id % 40000 + 100 for random_id in range(i, i + 30)] for i in range(48)]
    params = []
    for i in range(48):
        grammar: dict[str, Any] = {}
        if i % 3 == 0:
            grammar = {"json_schema": SCHEMA}
        elif i % 3 == 1:
            grammar = {"regex": r"[a-z]{3,8}-[0-9]{2}"}
        params.append(SamplingParams(temperature=0.8, seed=i, max_tokens=300 if grammar else 200, **grammar))
    results = llm.generate(prompts, params)
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert result.finish_reason == "stop", result.text
            jsonschema.validate(json.loads(result.text), SCHEMA)
        elif i % 3 == 1:
            assert result.finish_reason == "stop" and re.fullmatch(r"[a-z]{3,8}-[0-9]{2}", result.text)
        else:
            assert len(result.token_ids) == 200 or result.finish_reason == "stop"
    llm.runtime.check_integrity()


def test_n_samples_under_a_schema(llm: Any) -> None:
    result = llm.generate(
        [[5, 6, 7, 8]], SamplingParams(temperature=1.0, n=8, max_tokens=300, json_schema=SCHEMA)
    )[0]
    for sample in result.samples:
        assert sample.finish_reason == "stop"
        jsonschema.validate(json.loads(sample.text), SCHEMA)

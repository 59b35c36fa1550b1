"""lm-evaluation-harness's `local-completions` model against a live server, fully offline: a multiple-choice
task (scored with `echo` + prompt logprobs) whose accuracy must equal the one computed from transformers'
own logprobs on the same float32 model, and a generate-until task. Run by `nox -s lmeval` (the package
sessions do not install lm-eval; there this module is skipped)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import MODEL, Server

# Nothing may come from the hub: the data are local files, the tokenizer the model's own directory.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Tokyo", "Lima", "Oslo"], 0),
    ("What color is the sky on a clear day?", ["green", "blue", "red", "black"], 1),
    ("How many legs does a dog have?", ["two", "six", "four", "ten"], 2),
    ("Which animal says moo?", ["cat", "cow", "duck", "fish"], 1),
    ("What do bees make?", ["milk", "silk", "bread", "honey"], 3),
    ("What is frozen water called?", ["ice", "steam", "sand", "glass"], 0),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What is two plus two?", ["three", "four", "five", "seven"], 1),
    ("Which season is the coldest?", ["summer", "spring", "autumn", "winter"], 3),
    ("What do you use to write on paper?", ["a pen", "a spoon", "a shoe", "a cup"], 0),
    ("Which is the largest ocean?", ["Arctic", "Indian", "Pacific", "Atlantic"], 2),
    ("What is the opposite of hot?", ["warm", "cold", "loud", "fast"], 1),
]
GENERATE = [
    ("The capital of France is", "Paris"),
    ("One, two, three, four,", "five"),
    ("Monday, Tuesday,", "Wednesday"),
    ("The opposite of up is", "down"),
]


def _context(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _write_tasks(directory: Path) -> None:
    """Two task YAMLs over local jsonl files (the `json` builder of datasets: no hub access)."""
    mc = directory / "mc.jsonl"
    mc.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    gen = directory / "gen.jsonl"
    gen.write_text("".join(json.dumps({"text": t, "answer": a}) + "\n" for t, a in GENERATE))
    (directory / "minisgl_mc.yaml").write_text(
        f"""task: minisgl_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
    )
    (directory / "minisgl_gen.yaml").write_text(
        f"""task: minisgl_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: text
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "(\\\\w+)"
      - function: take_first
"""
    )


@torch.no_grad()
def _reference_loglikelihoods(directory: Path) -> list[list[float]]:
    """Sum of transformers' logprobs of each choice after its context, split into tokens as lm-eval does
    (the whole text encoded, the context's tokens cut off)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    scores = []
    for question, choices, _ in QUESTIONS:
        context = tokenizer.encode(_context(question), add_special_tokens=False)
        row = []
        for choice in choices:
            whole = tokenizer.encode(_context(question) + " " + choice, add_special_tokens=False)
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
            row.append(sum(float(logprobs[p - 1, whole[p]]) for p in range(len(context), len(whole))))
        scores.append(row)
    return scores


def test_lm_eval_local_completions(server: Server, tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    from minisgl.core.loading.gguf_cache import converted
    from minisgl.core.loading.model_source import resolve_model

    model_dir = converted(resolve_model(MODEL)).directory
    _write_tasks(tmp_path)
    results: Any = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": MODEL,
            "base_url": f"{server.url}/v1/completions",
            "tokenizer": str(model_dir),
            "tokenizer_backend": "huggingface",
            "num_concurrent": 2,
            "max_retries": 1,
            "batch_size": 4,
        },
        tasks=["minisgl_mc", "minisgl_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
    )
    reference = _reference_loglikelihoods(model_dir)
    want = sum(
        int(torch.tensor(row).argmax()) == gold
        for row, (_, _, gold) in zip(reference, QUESTIONS, strict=True)
    )
    got = results["results"]["minisgl_mc"]["acc,none"]
    assert got == pytest.approx(want / len(QUESTIONS)), (got, want)
    # Each loglikelihood itself matches transformers' (a sum of a few logprobs, each within 1e-4).
    for sample in results["samples"]["minisgl_mc"]:
        row = reference[sample["doc_id"]]
        for (loglikelihood, _), expected in zip(sample["filtered_resps"], row, strict=True):
            assert loglikelihood == pytest.approx(expected, abs=1e-3), sample["doc"]
    # The generate-until task ran, and got what a greedy request with the same stops gets.
    assert "exact_match,strip" in results["results"]["minisgl_gen"]
    for sample in results["samples"]["minisgl_gen"]:
        direct = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": sample["doc"]["text"], "max_tokens": 6, "temperature": 0, "stop": ["\n", "."]},
            timeout=300,
        ).json()
        assert sample["resps"][0][0] == direct["choices"][0]["text"], sample

"""Structured output on the CPU: the masks against a plain-Python reference (xgrammar's matcher asked token
by token), and the embedded SmolLM2 generating under JSON schemas, regexes and EBNF grammars, sampled,
batched with free requests, with n > 1, retraction and chunked prefill."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr

from minisgl.core import LLM, SamplingParams
from minisgl.core.sampling import structured
from minisgl.core.sampling.structured import GrammarCompiler, check_grammar, json_schema_source, mask_logits

QUESTION = [{"role": "user", "content": "Describe a person as JSON."}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "$defs": {"tag": {"type": "string", "maxLength": 6}},
}


@pytest.fixture(scope="module")
def smollm() -> Iterator[Any]:
    llm = LLM("smollm2-135m", device="cpu", dtype="float32", max_seq_len=1024)
    yield llm
    del llm


def test_bad_grammars_name_their_field() -> None:
    with pytest.raises(ValueError, match=r"^json_schema is invalid"):
        check_grammar(SamplingParams(json_schema='{"type": "foo"}'))
    with pytest.raises(ValueError, match=r"^regex is invalid"):
        check_grammar(SamplingParams(regex="a(b"))
    with pytest.raises(ValueError, match=r"^ebnf is invalid"):
        check_grammar(SamplingParams(ebnf="root ::= undefined_rule"))
    with pytest.raises(ValueError, match="exclude each other"):
        SamplingParams(regex="a", ebnf='root ::= "a"')


def test_mask_matches_the_matcher_on_constrained_rows_only(smollm: Any) -> None:
    compiler = GrammarCompiler(smollm.runtime.tokenizer, 49152, (2,))
    state = compiler.state_for(SamplingParams(regex="(yes|no)!"))
    assert state is not None

    class Row:
        def __init__(self, grammar: Any) -> None:
            self.grammar = grammar

    logits = torch.randn(3, 49152)
    original = logits.clone()
    mask_logits(logits, [Row(None), Row(state), Row(None)])
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    # The reference: every token whose text the matcher accepts as a next step.
    tokenizer = smollm.runtime.tokenizer
    probe = xgr.GrammarMatcher(
        xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=49152, stop_token_ids=[2])
        ).compile_regex("(yes|no)!")
    )
    expected = []
    for token in range(49152):
        if probe.accept_token(token):
            expected.append(token)
            probe.rollback(1)
    assert allowed == expected
    assert all(tokenizer.decode([t]) in ("y", "ye", "yes", "yes!", "n", "no", "no!") for t in allowed)


def test_json_schema_batch_mixed_with_free_requests(smollm: Any) -> None:
    schema = json.dumps(PERSON)
    constrained = SamplingParams(temperature=0.8, seed=1, max_tokens=200, json_schema=schema, n=3)
    free = SamplingParams(temperature=0.8, seed=2, max_tokens=24)
    engine = smollm.runtime.model_runner
    assert smollm.runtime.max_in_flight == 2  # overlap scheduling stays on
    late_steps = []

    def sample_late(pending: Any) -> None:
        late_steps.append(pending.late is not None)
        original(pending)

    original, engine.sample_late = engine.sample_late, sample_late
    try:
        results = smollm.chat([QUESTION] * 4, [constrained, free, constrained, free])
    finally:
        del engine.sample_late
    # Constrained rows were sampled one step late, after the tokens their masks depend on.
    assert sum(late_steps) > 10
    for result in (results[0], results[2]):
        for sample in result.samples:
            assert sample.finish_reason == "stop", sample.text
            jsonschema.validate(json.loads(sample.text), PERSON)
    assert all(r.finish_reason in ("stop", "length") for r in (results[1], results[3]))


def test_regex_and_ebnf(smollm: Any) -> None:
    regex, ebnf = (
        SamplingParams(temperature=1.0, seed=3, max_tokens=30, regex=r"[0-9]{3}-[a-z]{2,4}"),
        SamplingParams(temperature=1.0, seed=4, max_tokens=30, ebnf='root ::= ("cat" | "dog") " " [0-9]'),
    )
    first, second = smollm.chat([QUESTION, QUESTION], [regex, ebnf])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", first.text) and first.finish_reason == "stop"
    assert re.fullmatch(r"(cat|dog) [0-9]", second.text) and second.finish_reason == "stop"


def test_length_bounded_strings_never_hold_raw_control_characters(smollm: Any) -> None:
    """A model that wants tabs (logit_bias) inside a maxLength string still writes valid JSON: JSON forbids
    raw control characters in strings, and xgrammar's own length-bounded string rule admits them."""
    tokenizer = smollm.runtime.tokenizer
    tab = tokenizer.encode("\t", add_special_tokens=False)
    assert len(tab) == 1
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}},
        "required": ["name"],
    }
    params = SamplingParams(
        temperature=0.0, max_tokens=40, json_schema=json.dumps(schema), logit_bias={tab[0]: 30}
    )
    result = smollm.chat([QUESTION], params)[0]
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), schema)  # json.loads refuses raw control characters


def test_bounded_strings_become_patterns_for_xgrammar() -> None:
    schema = {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 5}}
    keep = {"type": "string", "maxLength": 3, "pattern": "^a+$"}
    converted = json.loads(json_schema_source(json.dumps({"anyOf": [schema, keep]})))
    assert converted["anyOf"][0]["items"] == {"type": "string", "pattern": "^[\\s\\S]{2,5}$"}
    assert converted["anyOf"][1] == keep
    assert json_schema_source("not json") == "not json"


def test_length_finish_is_honest(smollm: Any) -> None:
    result = smollm.chat([QUESTION], SamplingParams(temperature=0.0, max_tokens=3, json_schema=PERSON))[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 3


def test_grammar_after_a_marker_token(smollm: Any) -> None:
    # "<|im_end|>"-free stand-in for "</think>": free text until the marker, then the grammar.
    params = SamplingParams(temperature=0.0, max_tokens=40, regex="OK", grammar_after="\n")
    state = GrammarCompiler(smollm.runtime.tokenizer, 49152, (2,)).state_for(params)
    assert state is not None and not state.active
    newline = smollm.runtime.tokenizer.encode("\n", add_special_tokens=False)[0]
    assert state.accept(123) and not state.active
    assert state.accept(newline) and state.active


def test_retracted_request_resumes_in_its_grammar_through_chunked_prefill(smollm: Any) -> None:
    runtime = smollm.runtime
    prompt = runtime.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=160, json_schema=PERSON)
    req = runtime.add_request(runtime.tokenizer.encode(prompt), params)
    while len(req.resolved_output_ids()) < 8:
        runtime.step()
    runtime.max_in_flight = 1  # drain the steps in flight: retraction needs every token on the host
    while runtime.in_flight:
        runtime.step()
    runtime.max_in_flight = 2
    assert not req.finished
    runtime.scheduler._retract(req)
    saved = runtime.scheduler.max_prefill_tokens
    runtime.scheduler.max_prefill_tokens = 8  # the resumed request re-prefills in chunks
    try:
        while not req.finished:
            runtime.step()
    finally:
        runtime.scheduler.max_prefill_tokens = saved
    assert req.num_retractions == 1 and req.finish_reason == "stop"
    jsonschema.validate(
        json.loads(runtime.tokenizer.decode(req.output_ids, skip_special_tokens=True)), PERSON
    )
    runtime.check_integrity()


def test_min_tokens_holds_for_rows_sampled_late(smollm: Any) -> None:
    """A constrained row sampled one step late (overlap on) counts its generated tokens as they were at
    launch: EOS, pushed up by logit_bias, stays masked for exactly min_tokens tokens."""
    assert smollm.runtime.max_in_flight == 2
    eos = 2
    params = SamplingParams(
        temperature=0, max_tokens=20, min_tokens=5, logit_bias={eos: 100.0}, regex="[a-z ]*"
    )
    tokens = smollm.generate(["Write a few words."], params)[0].token_ids
    assert eos not in tokens[:5] and tokens[5:6] == [eos], tokens


def test_mask_kernel_variants_are_compiled_once_per_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU, the first mask for a device and dtype runs xgrammar's kernel at 1, 2 and 16 rows (its
    three compiled variants) on scratch logits, and never again. The meta device stands in for a GPU."""
    calls: list[tuple[int, str]] = []

    def record(logits: torch.Tensor, bitmask: torch.Tensor, *, indices: list[int]) -> None:
        calls.append((len(indices), logits.device.type))

    monkeypatch.setattr(structured.xgr, "apply_token_bitmask_inplace", record)
    monkeypatch.setattr(structured, "_warmed_mask_kernels", set())
    structured.warm_mask_kernel(torch.zeros(3, 64))  # the CPU kernel is not compiled: nothing to warm
    assert calls == []
    for _ in range(2):
        structured.warm_mask_kernel(torch.zeros(3, 64, device="meta"))
    assert calls == [(1, "meta"), (2, "meta"), (16, "meta")]
    structured.warm_mask_kernel(torch.zeros(3, 64, device="meta", dtype=torch.bfloat16))
    assert len(calls) == 6

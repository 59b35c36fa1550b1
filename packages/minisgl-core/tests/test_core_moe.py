"""Qwen3-MoE beyond the parity tests (which run the tiny MoE models like every architecture): the expert
compute against a plain per-token loop, both checkpoint layouts, loading errors, TP shape checks, the
bundled Qwen3-30B-A3B config, and the prefix cache and retraction on a MoE model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from minisgl.core import LLM, SamplingParams
from minisgl.core.config import EngineConfig, ModelConfig
from minisgl.core.layers import moe_ops
from minisgl.core.loading.loader import load_hf_config
from minisgl.core.loading.model_source import resolve_model

MODEL = "qwen3-moe"
GREEDY = SamplingParams(temperature=0.0, max_tokens=tiny_models.GEN_LEN, ignore_eos=True)


def _per_token_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The definition, one token and one chosen expert at a time (w13 gate rows first)."""
    inter = w2.shape[-1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
            out[t] += weights[t, k] * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("use_library", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_torch_experts_match_a_per_token_loop(renormalize: bool, use_library: bool, tokens: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    experts, hidden, inter, top_k = 7, 24, 40, 3
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(tokens, experts, generator=gen)
    weights, ids = moe_ops.route(logits, top_k, renormalize)
    probs = torch.softmax(logits, -1)
    assert torch.equal(ids, probs.topk(top_k).indices)  # the top-k experts, most probable first
    expected_weights = probs.topk(top_k).values
    if renormalize:
        expected_weights = expected_weights / expected_weights.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected_weights)
    got = moe_ops.torch_experts(x, w13, w2, weights, ids, use_library=use_library)
    torch.testing.assert_close(got, _per_token_reference(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_experts_without_tokens_are_skipped_cleanly() -> None:
    """Every token routed to the same two experts: the other groups are empty."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, generator=gen)
    w13, w2 = torch.randn(5, 32, 16, generator=gen), torch.randn(5, 16, 16, generator=gen)
    ids = torch.tensor([[3, 1]] * 6)
    weights = torch.full((6, 2), 0.5)
    for use_library in (True, False):
        got = moe_ops.torch_experts(x, w13, w2, weights, ids, use_library=use_library)
        torch.testing.assert_close(got, _per_token_reference(x, w13, w2, weights, ids))


def test_tiny_moe_configs_exercise_the_features(tiny_model_dir: Callable[[str], Path]) -> None:
    """Guards the test models: sparse and dense layers both present, both routings, a router that is
    not at a degenerate (all-equal) init."""
    sparse = tiny_models.saved_config(tiny_model_dir("qwen3-moe"))
    assert sparse["norm_topk_prob"] is True and sparse["mlp_only_layers"] == [1]
    step2 = tiny_models.saved_config(tiny_model_dir("qwen3-moe-step2"))
    assert step2["norm_topk_prob"] is False and step2["decoder_sparse_step"] == 2
    for name, sparse_layers in (("qwen3-moe", [0, 2]), ("qwen3-moe-step2", [1, 3])):
        config = ModelConfig.from_hf(load_hf_config(resolve_model(str(tiny_model_dir(name)))))
        assert [i for i in range(config.num_layers) if config.is_moe_layer(i)] == sparse_layers
    model = tiny_models.build_model(tiny_models.SPECS["qwen3-moe"])
    router = model.model.layers[0].mlp.gate.weight
    assert router.abs().min() > 0 and router.std() > 0.05


def _stacked_checkpoint(source: Path, target: Path) -> Path:
    """The same weights in transformers 5's in-memory layout (stacked gate_up_proj / down_proj per
    layer), which its GGUF reader also produces."""
    model = tiny_models.load_reference(source)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert any(name.endswith("experts.gate_up_proj") for name in state)
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture
def moe_llm(engines: Any, tiny_model_dir: Callable[[str], Path]) -> Iterator[Callable[..., LLM]]:
    engines.close()  # one tiny engine alive at a time
    built: list[LLM] = []

    def make(path: Path | None = None, **options: Any) -> LLM:
        built.clear()
        directory = path or tiny_model_dir(MODEL)
        llm = LLM(str(directory), **{"device": "cpu", "dtype": "float32", "seed": 0, **options})
        built.append(llm)
        return llm

    yield make
    built.clear()


def test_stacked_checkpoint_layout_loads_the_same_model(
    moe_llm: Callable[..., LLM], tiny_model_dir: Callable[[str], Path], reference: Any, tmp_path: Path
) -> None:
    _, refs = reference(MODEL)
    llm = moe_llm(_stacked_checkpoint(tiny_model_dir(MODEL), tmp_path / "stacked"))
    results = llm.generate([r.prompt for r in refs], GREEDY, use_tqdm=False)
    assert [r.token_ids for r in results] == [r.output for r in refs]


def _checkpoint_without(source: Path, target: Path, drop: str) -> Path:
    from safetensors.torch import load_file

    tensors = load_file(str(source / "model.safetensors"))
    del tensors[drop]
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_a_missing_expert_is_named(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    broken = _checkpoint_without(tiny_model_dir(MODEL), tmp_path / "broken", name)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        LLM(str(broken), device="cpu", dtype="float32")


def test_a_wrongly_shaped_expert_is_named(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    source = tiny_model_dir(MODEL)
    tensors = load_file(str(source / "model.safetensors"))
    name = "model.layers.0.mlp.experts.1.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    target = tmp_path / "misshaped"
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"experts\.1\.down_proj\.weight.*shape \(64, 31\), expected \(64, 32\)"
    ):
        LLM(str(target), device="cpu", dtype="float32")


def test_tp_refuses_an_expert_size_it_cannot_split() -> None:
    config = ModelConfig.from_hf(load_hf_config(resolve_model("qwen3-30b-a3b")))
    config.check_tp(4)  # 32 heads, 4 KV heads, 768 expert rows: all split over 4
    odd = dataclasses.replace(config, moe_intermediate_size=770)
    with pytest.raises(ValueError, match=r"expert intermediate size \(moe_intermediate_size\) \(770\)"):
        odd.check_tp(4)
    # No dense layer: the dense intermediate size is never split, so it may be anything.
    dataclasses.replace(config, intermediate_size=6146).check_tp(4)


def test_bundled_qwen3_30b_a3b_config() -> None:
    source = resolve_model("qwen3-30b-a3b")
    assert source.config_only
    config = ModelConfig.from_hf(load_hf_config(source))
    assert (config.architecture, config.hidden_size, config.num_layers) == ("Qwen3MoeForCausalLM", 2048, 48)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.qk_norm) == (32, 4, 128, True)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (128, 8, 768)
    assert config.norm_topk_prob and all(config.is_moe_layer(i) for i in range(48))


def test_dummy_weights_build_a_moe_model(moe_llm: Callable[..., LLM]) -> None:
    """load_format=dummy fills every sparse block (router and experts) from the per-expert layout."""
    llm = moe_llm(load_format="dummy")
    result = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    assert len(result.token_ids) == 4


def test_moe_backend_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="moe_backend must be one of auto, torch, flashinfer"):
        EngineConfig(moe_backend="cutlass").validate()
    with pytest.raises(ValueError, match="moe_backend 'flashinfer' needs a CUDA device"):
        moe_ops.resolve_moe_backend("flashinfer", torch.device("cpu"))
    assert moe_ops.resolve_moe_backend("auto", torch.device("cpu")) == "torch"


def test_second_turn_reuses_the_prefix_and_retraction_keeps_tokens(
    moe_llm: Callable[..., LLM], reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The radix cache and retraction need nothing MoE-specific: a second turn (prompt + answer + new
    text) hits the first turn's pages and still gives transformers' tokens, and a KV pool far too small
    for the batch retracts requests that resume to the same tokens."""
    monkeypatch.setenv("MINISGL_DEBUG_CHECKS", "1")
    model, refs = reference(MODEL)
    llm = moe_llm(page_size=4)
    first = refs[5]
    turn2 = first.prompt + first.output + tiny_models.make_prompts(77, [9])[0]
    want = tiny_models.greedy_reference(model, turn2, 8)
    llm.generate([first.prompt], GREEDY, use_tqdm=False)
    second = llm.generate([turn2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    computed = len(first.prompt) + len(first.output) - 1
    assert second.num_cached_tokens >= computed // 4 * 4 > 0
    assert second.token_ids == want.output

    monkeypatch.setenv("MINISGL_INIT_NEW_TOKEN_RATIO", "0.2")
    small = moe_llm(page_size=16, num_kv_pages=10)
    results = small.generate([r.prompt for r in refs], GREEDY, use_tqdm=False)
    assert [r.token_ids for r in results] == [r.output for r in refs]
    assert small.runtime.scheduler.num_retractions > 0


# GGUF tensor names of llama.cpp's qwen3moe architecture, by the Hugging Face name they hold.
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}


def _write_qwen3moe_gguf(model: Any, path: Path) -> None:
    """The model's float32 weights and config as a qwen3moe GGUF file (no tokenizer). Every layer sparse:
    GGUF metadata has no mlp_only_layers. transformers' GGUF reader takes the expert size from the config
    default (768), so the model uses that size."""
    import gguf

    config = model.config
    inter = config.moe_intermediate_size
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(inter)
    writer.add_vocab_size(config.vocab_size)
    for name, tensor in model.state_dict().items():
        if name in _GGUF_NAMES:
            writer.add_tensor(_GGUF_NAMES[name], tensor.numpy())
            continue
        layer, rest = name.split(".", 3)[2:]
        if rest == "mlp.experts.gate_up_proj":  # llama.cpp keeps gate and up apart
            writer.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", tensor[:, :inter].contiguous().numpy())
            writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", tensor[:, inter:].contiguous().numpy())
        else:
            writer.add_tensor(f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_qwen3moe_gguf_file_matches_transformers(
    moe_llm: Callable[..., LLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read through transformers' GGUF reader (which stacks the experts) and the GGUF cache's conversion."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        **tiny_models._COMMON,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(9)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _write_qwen3moe_gguf(model, tmp_path / "tiny-moe.gguf")
    monkeypatch.setenv("MINISGL_GGUF_CACHE", str(tmp_path / "cache"))
    llm = moe_llm(tmp_path / "tiny-moe.gguf")
    for prompt in tiny_models.make_prompts(31, [4, 19]):
        want = tiny_models.greedy_reference(model, prompt, 12)
        got = llm.generate(
            [prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
        )
        assert got[0].token_ids == want.output
        assert got[0].logprobs == pytest.approx(want.output_logprobs, abs=1e-4)

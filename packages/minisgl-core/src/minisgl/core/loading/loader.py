"""Loading a model: its Hugging Face config, its tokenizer and its weights (safetensors, GGUF through
transformers' GGUF reader, or random "dummy" weights for benchmarks)."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from minisgl.core.config import ModelConfig, _as_id_tuple
from minisgl.core.layers.moe_ops import resolve_moe_backend
from minisgl.core.loading.model_source import ModelSource
from minisgl.core.models import create_model
from minisgl.core.models.decoder import DecoderForCausalLM
from minisgl.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def load_hf_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source.directory), gguf_file=source.gguf_file)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the config of model {source.name!r}: {exc}") from None


def load_model_config(source: ModelSource, hf_config: Any) -> ModelConfig:
    return ModelConfig.from_hf(hf_config, extra_eos_ids=_generation_eos_ids(source))


# The sampling fields of generation_config.json that requests inherit when they leave them out (as vLLM
# does); their names are SamplingParams' too.
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _generation_config(source: ModelSource) -> dict[str, Any]:
    path = source.directory / "generation_config.json"
    if source.is_gguf or not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return config if isinstance(config, dict) else {}


def _generation_eos_ids(source: ModelSource) -> tuple[int, ...]:
    """EOS ids from generation_config.json (often a list: Llama 3 stops on several tokens)."""
    return _as_id_tuple(_generation_config(source).get("eos_token_id"))


def load_sampling_defaults(source: ModelSource) -> dict[str, Any]:
    """The model's recommended sampling values from generation_config.json, by SamplingParams field name;
    {} when it has none or they are not valid SamplingParams values (that is logged)."""
    config = _generation_config(source)
    defaults = {name: config[name] for name in SAMPLING_DEFAULT_FIELDS if config.get(name) is not None}
    if defaults.get("top_k") == 0:  # Hugging Face's "no top-k"
        defaults["top_k"] = -1
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as exc:
        logger.warning("ignoring the sampling values of %s's generation_config.json: %s", source.name, exc)
        return {}
    return defaults


def load_tokenizer(source: ModelSource) -> Any | None:
    """The model's tokenizer, or None when the model directory has none (token-id prompts still work)."""
    from transformers import AutoTokenizer

    if source.config_only:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.gguf_file)
    # transformers 4.57 raises AttributeError from its slow-tokenizer converter when there is no tokenizer.
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        logger.warning(
            "model %s has no usable tokenizer (%s); only token-id prompts will work", source.name, exc
        )
        return None


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    source: ModelSource,
    hf_config: Any,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    moe_backend: str = "auto",
) -> DecoderForCausalLM:
    load_format = _resolve_load_format(source, load_format)
    with _default_dtype(dtype), torch.device(device):
        model = create_model(config, resolve_moe_backend(moe_backend, device))
    if load_format == "dummy":
        tensors = dummy_checkpoint(config, dtype, device)
    elif load_format == "gguf":
        tensors = read_gguf_tensors(source, hf_config)
    else:
        tensors = _safetensors(source)
    unused = model.load_weights(tensors)
    if unused:
        logger.warning("ignored %d checkpoint tensors, e.g. %s", len(unused), unused[:3])
    return model.eval()


def _resolve_load_format(source: ModelSource, load_format: str) -> str:
    """ "auto" as the source's own format; a bundled config (no weights) loads only as "dummy"."""
    if load_format == "auto":
        load_format = "gguf" if source.is_gguf else "safetensors"
    if source.config_only and load_format != "dummy":
        raise ValueError(
            f"model {source.name!r} is a bundled config without weights: use load_format='dummy'"
        )
    return load_format


class _LazyTensor:
    """A safetensors tensor read from disk only where it is sliced, so that a tensor-parallel rank reads
    just its own rows or columns. Layers use `.shape` and slicing, which is all it offers."""

    def __init__(self, view: Any) -> None:
        self._view = view
        self.shape = torch.Size(view.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        tensor: torch.Tensor = self._view[index]
        return tensor


def _safetensors(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(source.directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model {source.name!r}: no *.safetensors files in {source.directory}")
    for path in tqdm(files, desc="Loading safetensors", disable=len(files) < 2):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, cast(torch.Tensor, _LazyTensor(handle.get_slice(name)))


def read_gguf_tensors(source: ModelSource, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized tensors with Hugging Face names. transformers' reader maps GGUF names by looking at an
    instance of the HF model, so we give it one on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    assert source.gguf_file is not None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    checkpoint = load_gguf_checkpoint(
        str(source.directory / source.gguf_file), return_tensors=True, model_to_load=skeleton
    )
    yield from checkpoint["tensors"].items()


def dummy_checkpoint(
    config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights with a realistic scale, for benchmarks on real configs without real checkpoints.

    They come as full checkpoint tensors with Hugging Face names, each drawn from a generator seeded by
    its name, and load like a real checkpoint: every TP size slices the same weights, so tp=2 can be
    compared with tp=1.
    """
    for name, shape in checkpoint_shapes(config).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        tensor = torch.empty(shape, dtype=dtype, device=device)
        yield name, tensor.uniform_(-0.02, 0.02, generator=generator)


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of this config, by its Hugging Face name (sparse blocks in the
    per-expert layout)."""
    hidden = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    shapes["model.norm.weight"] = (hidden,)
    for i in range(config.num_layers):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
        shapes.update(_attention_shapes(config, f"{layer}.self_attn"))
        if config.is_moe_layer(i):
            shapes.update(_expert_shapes(config, f"{layer}.mlp"))
        else:
            shapes.update(_mlp_shapes(config, f"{layer}.mlp"))
    return shapes


def _attention_shapes(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    hidden, head_dim = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_heads * head_dim, config.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for proj, rows in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
        shapes[f"{prefix}.{proj}.weight"] = (rows, hidden)
        if config.qkv_bias:
            shapes[f"{prefix}.{proj}.bias"] = (rows,)
    shapes[f"{prefix}.o_proj.weight"] = (hidden, q_size)
    if config.o_bias:
        shapes[f"{prefix}.o_proj.bias"] = (hidden,)
    if config.qk_norm:
        shapes[f"{prefix}.q_norm.weight"] = (head_dim,)
        shapes[f"{prefix}.k_norm.weight"] = (head_dim,)
    return shapes


def _mlp_shapes(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """A dense MLP's tensors."""
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.gate_proj.weight": (inter, hidden),
        f"{prefix}.up_proj.weight": (inter, hidden),
        f"{prefix}.down_proj.weight": (hidden, inter),
    }
    if config.mlp_bias:
        for proj, rows in (("gate_proj", inter), ("up_proj", inter), ("down_proj", hidden)):
            shapes[f"{prefix}.{proj}.bias"] = (rows,)
    return shapes


def _expert_shapes(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """A sparse block's tensors in the per-expert layout of Hugging Face checkpoints."""
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}.gate.weight": (config.num_experts, hidden)}
    for expert in range(config.num_experts):
        shapes[f"{prefix}.experts.{expert}.gate_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.experts.{expert}.up_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.experts.{expert}.down_proj.weight"] = (hidden, inter)
    return shapes

"""Building a runtime's parts from a model and an EngineConfig: the rank's device, the context length,
the KV pool's size and scales, the model runner (attention backend, decode CUDA graphs), and the check that
every TP rank runs with the same settings."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from typing import Any

import torch

from minisgl.core import env
from minisgl.core.attention import SplitBackend, create_backend
from minisgl.core.config import EngineConfig, ModelConfig, pages_for
from minisgl.core.kv.kv_pool import KVPool
from minisgl.core.kv.tables import RequestTables
from minisgl.core.loading.gguf_cache import converted
from minisgl.core.loading.model_source import ModelSource, resolve_model
from minisgl.core.model_runner.cuda_graph import DecodeGraphRunner
from minisgl.core.model_runner.model_runner import ModelRunner
from minisgl.core.models.decoder import DecoderForCausalLM
from minisgl.core.parallel.distributed import disagreeing_rank, get_tp

logger = logging.getLogger("minisgl")

# GPU memory kept out of the KV pool for activations, logits and CUDA graphs.
ACTIVATION_RESERVE_BYTES = 3 << 30


def check_tp_rank(config: EngineConfig, tp_rank: int, dist_init_address: str | None) -> None:
    if config.tp_size > 1 and dist_init_address is None:
        raise ValueError("tp_size > 1 needs dist_init_address (host:port where the ranks meet)")
    if not 0 <= tp_rank < config.tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside [0, tp_size={config.tp_size})")


def model_source(model: str, load_format: str) -> ModelSource:
    source = resolve_model(model)
    if load_format in ("auto", "dummy"):
        source = converted(source)  # a GGUF file: its Hugging Face conversion, made once
    return source


def build_model_runner(
    config: EngineConfig,
    model_config: ModelConfig,
    model: DecoderForCausalLM,
    kv_pool: KVPool,
    tables: RequestTables,
    dtype: torch.dtype,
    device: torch.device,
    dummy_page: int,
) -> ModelRunner:
    cfg, tp = model_config, config.tp_size
    backend = create_backend(
        config.attn,
        cfg.num_heads // tp,
        cfg.local_kv_heads(tp),
        cfg.head_dim,
        dtype,
        kv_pool.dtype,
        device,
        kv_pool.page_size,
    )
    generator = torch.Generator(device=device).manual_seed(config.seed)
    runner = ModelRunner(
        model,
        kv_pool,
        tables,
        backend,
        device,
        generator,
        eos_token_ids=frozenset(cfg.eos_token_ids),
    )
    decode_backend = backend.decode if isinstance(backend, SplitBackend) else backend
    max_graph_bs = _max_graph_batch_size(config)
    if device.type != "cuda" or max_graph_bs == 0:
        return runner
    attention = decode_backend.graph_attention(kv_pool, max_graph_bs, tables.page_table.shape[1], dummy_page)
    if attention is not None:
        runner.graphs = DecodeGraphRunner(
            model, decode_backend, attention, kv_pool, max_graph_bs, dummy_page, device
        )
        runner.graphs.capture()
    return runner


def _max_graph_batch_size(config: EngineConfig) -> int:
    if config.cuda_graph_max_bs is None:
        return min(256, config.max_running_requests)
    return config.cuda_graph_max_bs


def use_checkpoint_kv_scales(model: DecoderForCausalLM, kv_pool: KVPool, num_layers: int) -> None:
    """An FP8 pool takes the checkpoint's per-layer k/v scales (1.0 for a layer without one)."""
    found = model.kv_scales
    if not any(found.values()):
        return
    if not kv_pool.quantized:
        logger.info("the checkpoint's KV cache scales are unused: the KV cache is %s", kv_pool.dtype)
        return
    layers = range(num_layers)
    kv_pool.set_scales([found["k"].get(i, 1.0) for i in layers], [found["v"].get(i, 1.0) for i in layers])
    logger.info("FP8 KV cache scales from the checkpoint for %d layers", len(found["k"]))


def num_kv_pages(
    config: EngineConfig,
    model_config: ModelConfig,
    kv_dtype: torch.dtype,
    device: torch.device,
    page_size: int,
    max_seq_len: int,
) -> int:
    if config.num_kv_pages is not None:
        return config.num_kv_pages
    cfg = model_config
    per_token = KVPool.bytes_per_token(
        cfg.num_layers, cfg.local_kv_heads(config.tp_size), cfg.head_dim, kv_dtype
    )
    budget = _kv_budget_bytes(config, device)
    # More pages than every row filled to the context length can never be used.
    useful = config.max_running_requests * pages_for(max_seq_len, page_size)
    pages = min(int(budget // (per_token * page_size)), useful)
    if pages < 1:
        raise ValueError("not enough memory for a single KV page; free memory or raise memory_ratio")
    return pages


def _kv_budget_bytes(config: EngineConfig, device: torch.device) -> float:
    """Memory the KV pool may take: on a GPU what memory_ratio leaves free after activations, on the CPU
    cpu_kv_cache_gib."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free - (1.0 - config.memory_ratio) * total - ACTIVATION_RESERVE_BYTES
    return config.cpu_kv_cache_gib * (1 << 30)


def rank_device(device: torch.device, rank: int, tp_size: int) -> torch.device:
    """A TP rank's device: cuda:(rank mod GPUs here) unless an index was given; on the CPU, the cores are
    shared out between the ranks."""
    if device.type == "cpu":
        _share_cpu_threads(tp_size)
        return device
    if device.index is None and tp_size > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    if device.index is not None:
        # CUDA graphs, events and FlashInfer's workspaces use the current device.
        torch.cuda.set_device(device)
    return device


def _share_cpu_threads(tp_size: int) -> None:
    if tp_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))


def check_same_settings(config: EngineConfig, model_config: ModelConfig) -> None:
    """Ranks (perhaps on other machines, with other environments) must schedule alike: the same engine
    options apart from the device, the same model, and the same MINISGL_* scheduling variables."""
    settings = (
        {name: value for name, value in asdict(config).items() if name != "device"},
        model_config,
        {
            var.name: var.get()
            for var in env.ALL
            if var not in (env.LOG_LEVEL, env.KERNEL_CACHE, env.GGUF_CACHE)
        },
    )
    differs = disagreeing_rank(settings)
    if differs is not None:
        rank, theirs = differs
        raise ValueError(
            f"TP rank {rank} runs with other settings than rank {get_tp().rank}: {theirs} != {settings}; "
            "start every rank with the same model, engine flags and MINISGL_* variables"
        )


def with_tokenizer_eos(config: ModelConfig, tokenizer: Any | None) -> ModelConfig:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or eos in config.eos_token_ids:
        return config
    return replace(config, eos_token_ids=(*config.eos_token_ids, int(eos)))


def context_length(requested: int | None, model_limit: int) -> int:
    """The requested context length, or the model's when none is asked for; above the model's it is an
    error, not a silent clamp (positions beyond what the model was trained on)."""
    if requested is None:
        return model_limit
    if requested > model_limit:
        raise ValueError(
            f"the context length {requested} (max_seq_len, --context-length) is above this model's "
            f"maximum of {model_limit} tokens (max_position_embeddings)"
        )
    return requested

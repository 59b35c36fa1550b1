"""The `xqa` decode backend, without a GPU: where it is refused (the spec, the GPU generation, the shapes
FlashInfer's XQA kernels are compiled for), the page-table / KV-length buffers its CUDA graphs read
against a plain Python model of them, and its arguments (page table, uint32 lengths, the layer's FP8 scales
folded into bmm1/bmm2) run through FlashInfer's documented contract for the XQA call, written in torch,
against the torch backend. The kernel itself is tested on the GPU (test_gpu_xqa.py)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from minisgl.core import LLM
from minisgl.core.attention import FP8_HOPPER_AUTO, BatchLayout, resolve_attention
from minisgl.core.attention.xqa_backend import (
    XQABackend,
    XQAGraphAttention,
    xqa_metadata,
    xqa_support_problem,
)
from minisgl.core.engine_config import EngineOptionError
from minisgl.core.kv.kv_pool import KVPool

FP8 = torch.float8_e4m3fn
CUDA = torch.device("cuda")


@pytest.fixture
def gpu_generation(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, int], None]:
    """Make resolve_attention see a CUDA device of compute capability (major, minor)."""

    def set_generation(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_generation


@pytest.mark.parametrize("capability", [(9, 0), (10, 0), (12, 0)])
@pytest.mark.parametrize("fp8_kv", [True, False])
def test_xqa_decodes_on_hopper_and_blackwell(
    gpu_generation: Callable[[int, int], None], capability: tuple[int, int], fp8_kv: bool
) -> None:
    gpu_generation(*capability)
    assert resolve_attention("fi,xqa", CUDA, fp8_kv) == ("fi", "xqa")
    assert resolve_attention("auto,xqa", CUDA, fp8_kv) == (
        "fi" if fp8_kv or capability[0] != 9 else "fa3",
        "xqa",
    )


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (7, 5)])
def test_xqa_is_refused_on_older_gpus(
    gpu_generation: Callable[[int, int], None], capability: tuple[int, int]
) -> None:
    gpu_generation(*capability)
    major, minor = capability
    with pytest.raises(
        ValueError, match=re.escape(f"Blackwell (sm_100, sm_120) GPUs only; this GPU is sm_{major}{minor}")
    ):
        resolve_attention("fi,xqa", CUDA, True)


@pytest.mark.parametrize("spec", ["xqa", "xqa,fi", "xqa,xqa"])
def test_xqa_is_refused_as_the_prefill_backend(gpu_generation: Callable[[int, int], None], spec: str) -> None:
    gpu_generation(9, 0)
    with pytest.raises(ValueError, match=re.escape("has decode kernels only")):
        resolve_attention(spec, CUDA, True)
    with pytest.raises(
        EngineOptionError, match=re.escape("name it as the decode half of PREFILL,DECODE, e.g. fi,xqa")
    ):
        LLM("unused", attn=spec)


def test_fp8_auto_on_hopper_decodes_with_xqa_where_it_fits(
    gpu_generation: Callable[[int, int], None],
) -> None:
    """The H200 benchmark chose XQA for FP8 decode; a shape or page size XQA cannot run keeps fi."""
    gpu_generation(9, 0)
    assert resolve_attention("auto", CUDA, True, xqa_fits=True) == FP8_HOPPER_AUTO == ("fi", "xqa")
    assert resolve_attention("auto", CUDA, True, xqa_fits=False) == ("fi", "fi")
    assert resolve_attention("auto", CUDA, False, xqa_fits=True) == ("fa3", "fi")
    gpu_generation(8, 0)
    assert resolve_attention("auto", CUDA, True, xqa_fits=True) == ("fi", "fi")


def test_fa3_prefill_with_xqa_decode_is_refused_over_fp8(gpu_generation: Callable[[int, int], None]) -> None:
    gpu_generation(9, 0)
    assert resolve_attention("fa3,xqa", CUDA, False) == ("fa3", "xqa")
    with pytest.raises(ValueError, match="'fa3' cannot read an FP8 KV cache"):
        resolve_attention("fa3,xqa", CUDA, True)


def test_xqa_on_the_cpu_is_refused(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(ValueError, match=re.escape("attention backend 'fi' needs a CUDA device")):
        LLM(str(tiny_model_dir("llama")), device="cpu", attn="fi,xqa", num_kv_pages=64)
    with pytest.raises(ValueError, match=re.escape("attention backend 'xqa' needs a CUDA device")):
        LLM(str(tiny_model_dir("llama")), device="cpu", attn="torch,xqa", num_kv_pages=64)


@pytest.mark.parametrize(
    ("head_dim", "page_size", "dtype", "kv_dtype", "message"),
    [
        (
            128,
            1,
            torch.bfloat16,
            FP8,
            "reads pages of 16, 32, 64, 128 tokens, not 1: set page_size (--page-size)",
        ),
        (128, 8, torch.bfloat16, torch.bfloat16, "not 8"),
        (128, 256, torch.bfloat16, FP8, "not 256"),
        (24, 16, torch.bfloat16, FP8, "multiple of 16 in [16, 256]; this model's is 24"),
        (512, 16, torch.bfloat16, FP8, "this model's is 512"),
        (128, 16, torch.float32, torch.float32, "not torch.float32: set dtype (--dtype)"),
        (128, 16, torch.bfloat16, torch.float16, "or fp8_e4m3, not torch.float16"),
    ],
)
def test_shapes_xqa_is_not_compiled_for_are_refused(
    head_dim: int, page_size: int, dtype: torch.dtype, kv_dtype: torch.dtype, message: str
) -> None:
    problem = xqa_support_problem(head_dim, page_size, dtype, kv_dtype)
    assert problem is not None and message in problem
    with pytest.raises(ValueError, match=re.escape(f"attention backend 'xqa' {problem}")):
        XQABackend(head_dim, dtype, kv_dtype, torch.device("cpu"), page_size)


@pytest.mark.parametrize(
    ("head_dim", "page_size", "dtype", "kv_dtype"),
    [
        (128, 16, torch.bfloat16, FP8),
        (128, 16, torch.bfloat16, torch.bfloat16),
        (64, 128, torch.float16, torch.float16),
        (256, 32, torch.float16, FP8),
        (16, 64, torch.bfloat16, FP8),
    ],
)
def test_shapes_xqa_runs(head_dim: int, page_size: int, dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    assert xqa_support_problem(head_dim, page_size, dtype, kv_dtype) is None


def _decode_layout(rows: list[list[int]], kv_lens: list[int]) -> BatchLayout:
    n = len(kv_lens)
    return BatchLayout(
        positions=torch.tensor([length - 1 for length in kv_lens]),
        out_slots=torch.zeros(n, dtype=torch.int64),
        query_starts=torch.arange(n + 1),
        kv_lens=torch.tensor(kv_lens),
        page_table=torch.tensor(rows, dtype=torch.int32).view(n, -1),
        query_lens_host=[1] * n,
        kv_lens_host=kv_lens,
        is_decode=True,
    )


def test_eager_metadata_is_the_page_table_rows_and_the_lengths_as_uint32() -> None:
    metadata = xqa_metadata(torch.tensor([[3, 4, 0], [7, 0, 0]], dtype=torch.int32), torch.tensor([33, 2]))
    assert metadata.page_table.dtype == torch.int32 and metadata.page_table.is_contiguous()
    assert metadata.page_table.tolist() == [[3, 4, 0], [7, 0, 0]]
    assert metadata.seq_lens.dtype == torch.uint32
    assert metadata.seq_lens.view(torch.int32).tolist() == [33, 2]


def test_graph_buffers_match_a_plain_model_across_loads() -> None:
    """Every load leaves the first `size` rows as the model says: the batch's page-table rows and KV
    lengths, then padding rows of dummy pages reading one token, whatever earlier loads left there."""
    max_bs, max_pages, page_size, dummy = 16, 6, 16, 1000
    graphs = XQAGraphAttention(max_bs, max_pages, dummy, torch.device("cpu"))
    sizes = [1, 2, 4, 8, 16]
    captured = {size: graphs.metadata(size) for size in sizes}
    rng = random.Random(0)
    for _ in range(50):
        real = rng.randint(1, max_bs)
        size = min(s for s in sizes if s >= real)
        kv_lens = [rng.randint(1, max_pages * page_size) for _ in range(real)]
        rows = [[rng.randrange(dummy) for _ in range(max_pages)] for _ in range(real)]
        graphs.load(size, _decode_layout(rows, kv_lens))

        expected_rows = rows + [[dummy] * max_pages] * (size - real)
        expected_lens = kv_lens + [1] * (size - real)
        metadata = captured[size]
        assert metadata.page_table.tolist() == expected_rows
        assert metadata.seq_lens.view(torch.int32).tolist() == expected_lens
        # The captured graph reads these very buffers.
        assert metadata.page_table.data_ptr() == graphs.page_table.data_ptr()
        assert metadata.seq_lens.data_ptr() == graphs.seq_lens.data_ptr()
        assert metadata.seq_lens.dtype == torch.uint32


def _fake_runs(monkeypatch: pytest.MonkeyPatch, scores: list[object]) -> list[tuple[str, dict[str, object]]]:
    """Replace kv_accuracy's engine runs by `scores` in turn; returns the (kv dtype, options) of each run."""
    from minisgl.core import kv_accuracy

    seen: list[tuple[str, dict[str, object]]] = []

    def fake_run(
        model: str,
        kv_cache_dtype: str,
        prompts: object,
        reference: object,
        shape: object,
        options: dict[str, object],
    ) -> tuple[list[list[int]], object]:
        seen.append((kv_cache_dtype, options))
        return [[1, 2, 3]], scores[len(seen) - 1]

    monkeypatch.setattr(kv_accuracy, "_run", fake_run)
    return seen


def test_the_accuracy_tool_gives_the_reference_its_own_attention(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """kv_accuracy prices fi,xqa over FP8 against fi over bf16: each engine gets its own attn."""
    from minisgl.core import kv_accuracy

    same = kv_accuracy._Scores([[5, 6]], [[-0.5, -1.0]], [[-0.5, -1.0]], [[5, 6]])
    seen = _fake_runs(monkeypatch, [same] * 4)
    kv_accuracy.main(["--attn", "fi,xqa", "--reference-attn", "fi", "--num-prompts", "1", "--gen-len", "2"])
    assert [(dtype, options["attn"]) for dtype, options in seen] == [("auto", "fi"), ("fp8_e4m3", "fi,xqa")]
    assert '"attn": "fi,xqa", "reference_attn": "fi"' in capsys.readouterr().out

    seen.clear()
    kv_accuracy.measure("m", "fp8_e4m3", 1, 3, 2, attn="fi,xqa")
    assert [options["attn"] for _, options in seen] == ["fi,xqa", "fi,xqa"]  # the same by default


def test_the_accuracy_tool_compares_decode_logprobs_before_the_outputs_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Positions 1.. before the first different greedy token: the same context in both engines."""
    from minisgl.core import kv_accuracy

    reference = kv_accuracy._Scores(
        greedy=[[5, 6, 7, 8], [1, 2, 3, 4]],
        greedy_logprobs=[[-9.0] * 4, [-9.0] * 4],  # unused: the reference's own decode
        scored=[[-0.1, -0.2, -0.3, -0.4], [-1.0, -2.0, -3.0, -4.0]],
        next_tokens=[[5, 6, 7, 8], [1, 2, 3, 4]],
    )
    tested = kv_accuracy._Scores(
        greedy=[[5, 6, 7, 9], [7, 2, 3, 4]],  # differs at 3, and at 0 (no decode position)
        greedy_logprobs=[[-5.0, -0.25, -0.5, -7.0], [-1.0] * 4],
        scored=[[-0.1, -0.2, -0.3, -0.4], [-1.0, -2.0, -3.0, -4.0]],
        next_tokens=[[5, 6, 7, 8], [1, 2, 3, 4]],
    )
    _fake_runs(monkeypatch, [reference, tested])
    result = kv_accuracy.measure("m", "fp8_e4m3", 2, 3, 4)
    assert result.decode_positions == 2  # positions 1 and 2 of the first prompt
    assert result.decode_max_logprob_diff == pytest.approx(0.2)
    assert result.decode_mean_logprob_diff == pytest.approx((0.05 + 0.2) / 2)
    assert result.free_running_prefix == 3 / 8


def test_the_accuracy_tool_refuses_a_bad_reference_attention(capsys: pytest.CaptureFixture[str]) -> None:
    from minisgl.core import kv_accuracy

    with pytest.raises(SystemExit) as exit_info:
        kv_accuracy.main(["--reference-attn", "xqa"])
    assert exit_info.value.code == 2
    assert "argument --reference-attn: xqa has decode kernels only" in capsys.readouterr().err


# ---- the backend's wiring, against XQA's documented contract in plain torch -------------------------

PAGE_SIZE, NUM_QO, NUM_KV, HEAD_DIM, NUM_PAGES, MAX_PAGES = 16, 8, 2, 32, 40, 8


def documented_xqa(
    query: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    workspace: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    bmm1_scale: float,
    bmm2_scale: float,
    kv_layout: str,
    backend: str,
) -> torch.Tensor:
    """FlashInfer's trtllm_batch_decode_with_kv_cache(backend="xqa") as its docstring defines it, in
    float32: softmax(bmm1_scale * q.k) . v * bmm2_scale over the stored values of each request's first
    seq_len tokens, through its row of the (batch, max_pages) int32 page table; uint32 lengths."""
    assert (kv_layout, backend, block_tables.dtype, seq_lens.dtype) == (
        "NHD",
        "xqa",
        torch.int32,
        torch.uint32,
    )
    k_cache, v_cache = kv_cache
    assert max_seq_len == block_tables.shape[1] * k_cache.shape[1]
    outs = []
    for row, n in enumerate(seq_lens.view(torch.int32).tolist()):
        pages = block_tables[row, : -(-n // k_cache.shape[1])].long()
        k, v = (cache[pages].flatten(0, 1)[:n].float() for cache in (k_cache, v_cache))
        q = query[row].float().view(NUM_KV, NUM_QO // NUM_KV, HEAD_DIM)
        weights = (torch.einsum("hgd,nhd->hgn", q, k) * bmm1_scale).softmax(-1)
        outs.append(torch.einsum("hgn,nhd->hgd", weights, v).reshape(NUM_QO, HEAD_DIM) * bmm2_scale)
    return torch.stack(outs).to(query.dtype)


@pytest.fixture
def cpu_xqa(monkeypatch: pytest.MonkeyPatch) -> Callable[[torch.dtype], XQABackend]:
    from minisgl.core.attention import xqa_backend

    monkeypatch.setattr(xqa_backend, "_import_xqa_decode", lambda: documented_xqa)
    monkeypatch.setattr(xqa_backend, "WORKSPACE_BYTES", 1024)
    return lambda kv_dtype: XQABackend(HEAD_DIM, torch.bfloat16, kv_dtype, torch.device("cpu"), PAGE_SIZE)


def _filled_pool(kv_dtype: torch.dtype) -> KVPool:
    pool = KVPool(2, NUM_PAGES + 1, PAGE_SIZE, NUM_KV, HEAD_DIM, kv_dtype, torch.device("cpu"))
    if kv_dtype == FP8:
        pool.set_scales([0.5, 0.0625], [2.0, 0.125])
    gen = torch.Generator().manual_seed(0)
    slots = torch.arange((NUM_PAGES + 1) * PAGE_SIZE)
    for layer in range(2):
        k, v = (torch.randn(len(slots), NUM_KV, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
        pool.store(layer, slots, k, v)
    return pool


def _scattered_batch(kv_lens: list[int], seed: int) -> BatchLayout:
    rng = random.Random(seed)
    free = rng.sample(range(NUM_PAGES), NUM_PAGES)
    rows = []
    for n in kv_lens:
        count = -(-n // PAGE_SIZE)
        rows.append(free[:count] + [rng.randrange(NUM_PAGES) for _ in range(MAX_PAGES - count)])
        free = free[count:]
    return _decode_layout(rows, kv_lens)


def _torch_reference(q: torch.Tensor, layer: int, pool: KVPool, layout: BatchLayout) -> torch.Tensor:
    from minisgl.core.attention.torch_backend import TorchAttentionBackend

    backend = TorchAttentionBackend()
    return backend.forward(q.float(), layer, pool, backend.prepare(layout, pool))


@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16], ids=["fp8", "bf16"])
def test_the_backend_folds_the_layer_scales_into_xqas_scales(
    cpu_xqa: Callable[[torch.dtype], XQABackend], kv_dtype: torch.dtype
) -> None:
    """XQA's contract with the backend's arguments equals attention over the dequantized cache, for layers
    with different k/v scales: bmm1_scale = softmax scale * k_scale, bmm2_scale = v_scale."""
    backend, pool = cpu_xqa(kv_dtype), _filled_pool(kv_dtype)
    layout = _scattered_batch([1, 16, 17, 100, 127], seed=1)
    q = torch.randn(5, NUM_QO, HEAD_DIM, generator=torch.Generator().manual_seed(1)).bfloat16()
    for layer in range(2):
        out = backend.forward(q, layer, pool, backend.prepare(layout, pool))
        ref = _torch_reference(q, layer, pool, layout)
        assert float((out.float() - ref).norm() / ref.norm()) < 0.01


def test_the_graph_buffers_feed_the_backend(cpu_xqa: Callable[[torch.dtype], XQABackend]) -> None:
    """Through the graph metadata: the real rows attend as the batch says, the padding rows to the one
    dummy-page token (their output is that token's V)."""
    backend, pool = cpu_xqa(FP8), _filled_pool(FP8)
    dummy, size = NUM_PAGES, 8
    graphs = backend.graph_attention(pool, size, MAX_PAGES, dummy)
    metadata = graphs.metadata(size)
    layout = _scattered_batch([3, 40, 128], seed=2)
    graphs.load(size, layout)
    q = torch.randn(size, NUM_QO, HEAD_DIM, generator=torch.Generator().manual_seed(2)).bfloat16()
    out = backend.forward(q, 1, pool, metadata).float()
    ref = _torch_reference(q[:3], 1, pool, layout)
    assert float((out[:3] - ref).norm() / ref.norm()) < 0.01
    dummy_v = pool.v_cache(1)[dummy, 0].float() * pool.v_scales[1]
    padding = dummy_v.repeat_interleave(NUM_QO // NUM_KV, dim=0).flatten().expand(size - 3, -1)
    assert torch.allclose(out[3:], padding, rtol=0.01, atol=1e-3)


def test_a_prefill_batch_is_refused(cpu_xqa: Callable[[torch.dtype], XQABackend]) -> None:
    layout = _scattered_batch([5], seed=3)
    layout.is_decode = False
    with pytest.raises(ValueError, match="decode kernels only"):
        cpu_xqa(FP8).prepare(layout, _filled_pool(FP8))

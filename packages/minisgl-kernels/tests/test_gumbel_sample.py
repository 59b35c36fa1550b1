"""The one-pass sampler: its torch reference against a plain Python hash and softmax (CPU), and the CUDA
kernel against the reference (GPU)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from minisgl.kernels import gumbel_sample, reference


def on_gpu(test: Callable[..., None]) -> Callable[..., None]:
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nox -s gpu)")
    return pytest.mark.gpu(needs_cuda(test))


def mix32(x: int) -> int:
    """lowbias32 in plain Python: what reference._mix32 and the kernel's Mix32 compute."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def python_score(logit: float, inv_t: float, seed: int, row: int, token: int) -> float:
    seed &= (1 << 64) - 1
    key_a = mix32((seed & 0xFFFFFFFF) ^ mix32(row))
    key_b = mix32((seed >> 32) ^ key_a)
    hashed = mix32((mix32(token ^ key_a) + key_b) & 0xFFFFFFFF)
    u = ((hashed >> 9) + 0.5) * 2.0**-23
    return logit * inv_t - math.log(-math.log(u))


def test_reference_scores_are_the_python_hash() -> None:
    logits = torch.randn(3, 50)
    inv_t = torch.tensor([1.0, 1 / 0.7, 0.0])
    seed = -(2**62) - 12345  # negative seeds (torch draws int64) hash as their 64 bits
    scores = reference.gumbel_scores(logits, inv_t, seed)
    for row in range(2):
        for token in range(50):
            expected = python_score(float(logits[row, token]), float(inv_t[row]), seed, row, token)
            assert scores[row, token].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert torch.equal(scores[2], logits[2])  # greedy row: the logits themselves


def total_variation(tokens: torch.Tensor, logits: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=logits.shape[-1]).float() / tokens.numel()
    return float((observed - logits.float().softmax(-1)).abs().sum() / 2)


def draw_rows(device: str, dtype: torch.dtype, rows: int = 40000) -> tuple[torch.Tensor, torch.Tensor]:
    """rows draws over a 30-token vocabulary at temperature 0.7 in one call, and the scaled logits."""
    torch.manual_seed(0)
    base = (torch.randn(30) * 2).to(dtype)
    inv_t = torch.full((rows,), 1 / 0.7, device=device)
    generator = torch.Generator(device=device).manual_seed(3)
    tokens = gumbel_sample(base.to(device).repeat(rows, 1), inv_t, generator)
    return tokens.cpu(), base.float() / 0.7


def test_reference_draws_follow_softmax_over_temperature() -> None:
    """40,000 draws: sampling noise keeps the total variation near 0.01; a wrong temperature (1.0 for
    0.7) or a biased hash shows as 0.05 and more."""
    tokens, scaled = draw_rows("cpu", torch.float32)
    assert total_variation(tokens, scaled) < 0.025
    assert total_variation(tokens, scaled * 0.7) > 0.05


def test_reference_is_repeatable_per_seed_and_rows_differ() -> None:
    logits = torch.zeros(64, 1000)  # uniform: every id is equally likely, only the noise decides
    inv_t = torch.ones(64)
    first = reference.gumbel_sample(logits, inv_t, 7)
    assert torch.equal(first, reference.gumbel_sample(logits, inv_t, 7))
    assert not torch.equal(first, reference.gumbel_sample(logits, inv_t, 8))
    assert first.unique().numel() > 50  # rows draw independently (64 draws from 1000 ids rarely repeat)


def test_greedy_rows_take_the_argmax_lowest_id_on_ties() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0], [5.0, 0.0, 5.0, 5.0]])
    assert reference.gumbel_sample(logits, torch.zeros(2), 1).tolist() == [1, 0]


def test_reference_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="inv_temperature"):
        reference.gumbel_sample(torch.zeros(2, 5), torch.zeros(3), 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 7), (5, 4096), (37, 4097), (128, 151936)])
@on_gpu
def test_kernel_picks_the_reference_winner(dtype: torch.dtype, rows: int, vocab: int) -> None:
    """Same seed, same hash: the kernel's id scores within float rounding of the reference's best (its
    logf and FMA may round the last bit differently) and is the same id in all but near-ties."""
    torch.manual_seed(rows + vocab)
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
    logits[:, ::5] = float("-inf")  # masked ids (logit_bias, grammars) never win
    inv_t = torch.rand(rows, device="cuda") + 0.5
    inv_t[::3] = 0.0  # greedy rows
    generator = torch.Generator(device="cuda").manual_seed(11)
    seed = int(
        torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device="cuda", generator=generator)
    )
    tokens = gumbel_sample(logits, inv_t, torch.Generator(device="cuda").manual_seed(11))
    scores = reference.gumbel_scores(logits, inv_t, seed)
    best = scores.max(dim=-1).values
    chosen = scores.gather(1, tokens.unsqueeze(1)).squeeze(1)
    assert torch.allclose(chosen, best, rtol=1e-5, atol=1e-5)
    same = tokens.eq(scores.argmax(dim=-1)).float().mean().item()
    assert same >= (1.0 if rows < 100 else 0.99)
    greedy = inv_t == 0
    assert torch.equal(tokens[greedy], logits[greedy].float().argmax(dim=-1))


@on_gpu
def test_kernel_draws_follow_softmax_over_temperature() -> None:
    tokens, scaled = draw_rows("cuda", torch.bfloat16)
    assert total_variation(tokens, scaled.to(torch.bfloat16).float()) < 0.025


@on_gpu
def test_kernel_runs_in_a_cuda_graph_with_fresh_draws() -> None:
    """The seed is drawn on the device, so a captured draw replays with new noise each time."""
    logits = torch.zeros(16, 5000, device="cuda", dtype=torch.bfloat16)
    inv_t = torch.ones(16, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    gumbel_sample(logits, inv_t, generator)  # builds the module outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = gumbel_sample(logits, inv_t)
    graph.replay()
    first = tokens.clone()
    graph.replay()
    assert not torch.equal(first, tokens)


@on_gpu
def test_kernel_refuses_bad_arguments() -> None:
    logits = torch.zeros(4, 10, device="cuda")
    with pytest.raises(ValueError, match="inv_temperature"):
        gumbel_sample(logits, torch.ones(3, device="cuda"))
    with pytest.raises(TypeError, match="logits must be"):
        gumbel_sample(logits.long(), torch.ones(4, device="cuda"))
    with pytest.raises(ValueError, match="dense last dim"):
        gumbel_sample(torch.zeros(10, 4, device="cuda").t(), torch.ones(4, device="cuda"))

"""SpindleKV's batched codebook greedy (several centers per step) against the one-at-a-time greedy.

`build_codebooks` takes, per step, every center the one-at-a-time greedy (`build_codebook`) would
take next that it can prove from the candidates' neighbourhoods; the result must be the same
codebook, indices and magnitudes, on data where proofs succeed (repeated tokens: pairs) and where
they stop early (chains, overlapping clusters, ties of degree).
"""

from __future__ import annotations

import math

import pytest
import torch

from policies import spindlekv as sp
from policies.spindlekv import build_codebook, build_codebooks


def _arc(n: int, step_deg: float, d: int, gen) -> torch.Tensor:
    """n unit vectors on a great circle, `step_deg` apart: neighbours in a chain, not beyond."""
    a, b = torch.linalg.qr(torch.randn(d, 2, generator=gen))[0].T
    ang = torch.arange(n) * math.radians(step_deg)
    return ang.cos()[:, None] * a + ang.sin()[:, None] * b


def _mixed(n: int, d: int, gen) -> torch.Tensor:
    """Random directions with exact repeats (pairs, triples), a chain and a tight cluster, shuffled."""
    parts = [torch.randn(n - n // 4 - 22, d, generator=gen)]
    uniq = torch.randn(n // 8, d, generator=gen)
    parts.append(uniq[torch.randint(0, uniq.shape[0], (n // 4,), generator=gen)])  # repeats
    parts.append(_arc(12, 14.0, d, gen))  # cos 0.970 to the next, 0.883 two apart (theta 0.95)
    centre = torch.randn(d, generator=gen)
    parts.append(centre + 0.05 * torch.randn(10, d, generator=gen))  # one tight cluster
    x = torch.cat(parts)
    x = x[torch.randperm(x.shape[0], generator=gen)][:n]
    return x * (torch.rand(n, 1, generator=gen) + 0.5)


def _check_equal(x: torch.Tensor, lengths: torch.Tensor, theta: float) -> int:
    book, index, mag, counts = build_codebooks(x, lengths, theta, torch.float32)
    merged = 0
    for p in range(x.shape[0]):
        m = int(lengths[p])
        b1, i1, m1 = build_codebook(x[p, :m], theta)
        merged += m - b1.shape[0]
        assert counts[p] == b1.shape[0], p
        assert torch.equal(book[p, : b1.shape[0]], b1), p
        assert torch.equal(index[p, :m], i1) and torch.equal(mag[p, :m], m1), p
        assert (book[p, b1.shape[0] :] == 0).all() and (index[p, m:] == 0).all()
    return merged


@pytest.mark.parametrize("candidates", [1, 3, 1024])
@pytest.mark.parametrize("theta", [0.95, 0.5])
@pytest.mark.parametrize("sims", [sp._SIMS, 100])  # 100: similarities in blocks of a few rows/members
def test_batched_greedy_equals_one_at_a_time(monkeypatch, candidates, theta, sims):
    monkeypatch.setattr(sp, "_CANDIDATES", candidates)
    monkeypatch.setattr(sp, "_SIMS", sims)
    gen = torch.Generator().manual_seed(candidates)
    x = torch.stack([_mixed(160, 16, gen) for _ in range(4)])
    lengths = torch.tensor([160, 97, 1, 140])
    assert _check_equal(x, lengths, theta) > 0


def test_repeats_need_few_steps(monkeypatch):
    """Pairs of repeated tokens: the one-at-a-time greedy needs a step per pair, the batched one a few."""
    steps = []
    drop = sp._drop_members
    monkeypatch.setattr(sp, "_drop_members", lambda *a: steps.append(1) or drop(*a))  # once per step
    gen = torch.Generator().manual_seed(7)
    uniq = torch.randn(300, 32, generator=gen)
    x = torch.cat([uniq, uniq[:100]])[torch.randperm(400, generator=gen)][None]  # 100 pairs
    assert _check_equal(x, torch.tensor([400]), 0.98) == 100
    assert 1 <= len(steps) <= 3

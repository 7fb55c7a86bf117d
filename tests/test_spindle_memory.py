"""SpindleKV's chunk append resolves in-chunk matches in bounded blocks: the same result as the whole
similarity matrix at once, and no temporary larger than the block bounds (the whole [P, q, C] float32
matrix was the largest transient of a chunked prefill)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import policies.spindlekv as sp


def _chunk(P: int, q: int, d: int, directions: int, seed: int):
    """Unit tokens drawn around a few directions (many in-chunk links), a few candidates left out."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(directions, d, generator=gen), dim=-1)
    pick = torch.randint(0, directions, (P, q), generator=gen)
    x = base[pick] + 0.08 * torch.randn(P, q, d, generator=gen)
    unit = x / x.norm(dim=-1, keepdim=True)
    valid = torch.rand(P, q, generator=gen) > 0.05
    best_old = torch.rand(P, q, generator=gen) * 0.3 + 0.7  # some tokens match an old entry
    arg_old = torch.randint(0, 5, (P, q), generator=gen)
    cand = valid & (best_old <= 0.95)
    count = torch.full((P,), 5, dtype=torch.int64)
    return unit, unit.to(torch.bfloat16), valid, cand, best_old, arg_old, count


def _resolve_whole(unit, units_b, valid, cand, best_old, arg_old, count, theta):
    """The former `_resolve_chunk`: every similarity of the chunk at once ([P, q, C] float32)."""
    P, q, d = unit.shape
    c_n, (ct,) = sp._compact2(cand)
    C2 = ct.shape[1]
    ok = torch.arange(C2) < c_n[:, None]
    tok = torch.arange(q)
    entries = torch.gather(units_b, 1, ct[..., None].expand(P, C2, d)).float()
    cos = unit @ entries.transpose(1, 2)
    before = (ct[:, None, :] < tok[None, :, None]) & ok[:, None, :]
    link_cc = torch.gather((cos > theta) & before, 1, ct[..., None].expand(P, C2, C2))
    op = sp._openers(link_cc, ok)
    rank = op.long().cumsum(-1) - 1
    best_new, arg_new = cos.masked_fill(~(before & op[:, None, :]), -2.0).max(-1)
    idx = torch.where(best_old >= best_new, arg_old, count[:, None] + torch.gather(rank, 1, arg_new))
    op_tok = torch.zeros((P, q + 1), dtype=torch.bool)
    op_tok.scatter_(1, torch.where(ok, ct, torch.full_like(ct, q)), op)
    op_tok = op_tok[:, :q]
    return op_tok, torch.where(op_tok, count[:, None] + op_tok.long().cumsum(-1) - 1, idx)


@pytest.mark.parametrize("sims, links", [(sp._SIMS, sp._LINKS), (7, 1), (1000, 200_000)])
def test_blocked_resolution_equals_the_whole_matrix(monkeypatch, sims, links):
    args = _chunk(P=3, q=300, d=16, directions=40, seed=0)
    want_opens, want_idx = _resolve_whole(*args, theta=0.95)
    monkeypatch.setattr(sp, "_SIMS", sims)
    monkeypatch.setattr(sp, "_LINKS", links)
    opens, idx = sp._resolve_chunk(*args, theta=0.95)
    joined_new = (~want_opens & (idx >= 5)).sum()
    assert want_opens.sum() > 40 and joined_new > 40  # the chunk really opens and joins its own entries
    assert torch.equal(opens, want_opens)
    assert torch.equal(idx, want_idx)


class _LargestOutput(TorchDispatchMode):
    """The largest tensor any op returns (bytes of the tensor, not of a storage it views)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_resolution_temporaries_stay_within_the_block_bounds(monkeypatch):
    P, q, d = 3, 512, 16
    args = _chunk(P=P, q=q, d=d, directions=60, seed=1)
    sims, links = 1 << 12, 1 << 18
    monkeypatch.setattr(sp, "_SIMS", sims)
    monkeypatch.setattr(sp, "_LINKS", links)
    C2 = int(args[3].sum(-1).max())
    inputs = P * q * d * 4  # a float32 copy of the chunk's tokens
    bound = max(4 * sims, max(links, C2 * C2), inputs)
    assert bound < P * q * C2 * 4  # the whole similarity matrix would not fit it
    with _LargestOutput() as seen:
        sp._resolve_chunk(*args, theta=0.95)
    assert seen.largest <= bound

"""A codebook layer's decode token written in one launch (`spindle_append.matched_append`) against
the torch writes it replaces, under TRITON_INTERPRET=1 on CPU. (The eviction layers' writer is
checked against the torch writer in `test_spindle_static`.)"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.attention_math import EMPTY  # noqa: E402
from policies import spindle_kernels as sk  # noqa: E402
from policies.spindle_append import matched_append  # noqa: E402
from tests.test_spindle_kernels import needs_kernel, random_storage  # noqa: E402

THETAS = (0.9, 0.8)
SPARE = 2  # slots past the live ones: the token's and the trash slot (a buffer's last)


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    monkeypatch.setattr(sk, "CPU_INTERPRET", True)


def _buffers(st) -> dict:
    """The storage as a layer's buffers: every book entry live, SPARE zero slots after each tensor."""
    bufs = {}
    for name, key in (("kbook", "kbook"), ("vbook", "vbook"), ("rk", "rk"), ("rv", "rv")):
        bufs[name] = torch.cat([st[key], torch.zeros_like(st[key][:, :, :SPARE])], dim=2)
    for name, key in (("mk", "mk"), ("mv", "mv"), ("_pos", "pos")):
        bufs[name] = torch.cat([st[key], torch.zeros_like(st[key][:, :, :SPARE])], dim=2)
    return bufs


def _reference(bufs, counts, n, x, mag, positions, query, part, scaling) -> None:
    """The torch writes (what `SpindleLayer` did before the kernel: `_write_matched`, `_new_token_term`),
    in place."""
    b, hk, d = x[0].shape
    group = query.shape[1] // hk
    valid = (positions != EMPTY).expand(b, hk)
    rows = {}
    for j, which in enumerate("kv"):
        best, arg = part.best[:, :, j], part.arg[:, :, j]
        top = best.max(dim=-1).values
        first = torch.where(best == top[..., None], arg, torch.full_like(arg, 2**31 - 1)).min(dim=-1).values
        arg = torch.where(top > -2.0, first, torch.zeros_like(first)).long()
        count = counts[j]
        opens = valid & (top <= THETAS[j])
        entry = torch.where(opens, count, arg)
        book, r, m = bufs[which + "book"], bufs["r" + which], bufs["m" + which]
        unit = (x[j].float() / mag[..., j].clamp(min=1e-12)[..., None]).to(book.dtype)
        at = torch.where(opens, count, book.shape[2] - 1)
        book[torch.arange(b)[:, None], torch.arange(hk), at] = unit
        slot = torch.where(valid, n, r.shape[2] - 1)
        r[torch.arange(b)[:, None], torch.arange(hk), slot] = entry.to(r.dtype)
        m[torch.arange(b)[:, None], torch.arange(hk), slot] = mag[..., j].to(m.dtype)
        count += opens.long()
        stored = m[torch.arange(b)[:, None], torch.arange(hk), slot].float()
        rows[which] = book[torch.arange(b)[:, None], torch.arange(hk), entry].float() * stored[..., None]
    slot = torch.where(valid, n, bufs["_pos"].shape[2] - 1)
    bufs["_pos"][torch.arange(b)[:, None], torch.arange(hk), slot] = positions.to(torch.int32).expand(b, hk)
    n += valid.long()
    q = query[:, :, 0].float().reshape(b, hk, group, d) * (scaling * sk.LOG2E)
    score = torch.einsum("bhgd,bhd->bhg", q, rows["k"]).reshape(b, hk * group)
    ok = positions != EMPTY
    part.pm[:, :, -1] = torch.where(ok, score, float("-inf"))
    part.pl[:, :, -1] = ok.float()
    value = rows["v"][:, :, None].expand(b, hk, group, d).reshape(b, hk * group, d)
    part.pacc[:, :, -1] = value * ok[..., None]


def _clone(part):
    return sk.Partials(part.pm.clone(), part.pl.clone(), part.pacc.clone(), part.best, part.arg)


@needs_kernel
@pytest.mark.parametrize("group", [4, 3])
def test_matched_append_writes_what_the_torch_writes_do(group):
    """Tokens that join an entry and tokens that open one, a padding row, several splits: every
    buffer byte, count and the new token's softmax term as the torch writes. In float16: the
    interpreter casts float32 to bfloat16 by truncation (a GPU rounds to nearest, as torch does)."""
    g = torch.Generator().manual_seed(group)
    b, hk, d, s = 3, 2, 64, 40
    st = random_storage(b, hk, group, d, s, "codebook", None, dtype=torch.float16, gen=g)
    st["n"] = st["n"].clamp(max=s - 1)[:, :hk]
    bufs = _buffers(st)
    counts = (torch.full((b, hk), st["kbook"].shape[2]), torch.full((b, hk), st["vbook"].shape[2]))
    # row 0's key joins an entry (a scaled book vector), the others are random: joins and opens
    xk = torch.randn(b, hk, d, generator=g)
    xk[0] = st["kbook"][0, :, 2].float() * 3
    xv = torch.randn(b, hk, d, generator=g)
    xv[2, 1] = st["vbook"][2, 1, 0].float() * 0.5
    x = (xk.to(torch.float16), xv.to(torch.float16))
    mag = torch.stack([t.float().norm(dim=-1) for t in x], dim=-1)
    positions = torch.tensor([[60], [EMPTY], [61]])
    storage = [bufs[name] for name in ("kbook", "vbook", "rk", "rv", "mk", "mv", "_pos")]
    part = sk.match_partials(
        st["query"], *storage, st["n"], st["scaling"], None, *x, 1.0 / mag, mma=True, block_n=16, splits=3
    )  # fmt: skip
    want = {name: t.clone() for name, t in bufs.items()}
    want_counts, want_n, want_part = tuple(c.clone() for c in counts), st["n"].clone(), _clone(part)
    query = st["query"][:, :, None]
    _reference(want, want_counts, want_n, x, mag, positions, query, want_part, st["scaling"])
    matched_append(bufs, counts, st["n"], x, mag, positions, query, part, THETAS, st["scaling"])

    opened = [int((c - st[book].shape[2]).sum()) for c, book in zip(counts, ("kbook", "vbook"))]
    assert 0 < opened[0] < 2 * hk and opened[1] > 0  # some tokens open entries, some join
    for got, ref in zip((*counts, st["n"]), (*want_counts, want_n)):
        assert torch.equal(got, ref)
    for name, buf in bufs.items():
        assert torch.equal(buf, want[name]), name
    live = torch.isfinite(want_part.pm[..., -1])
    assert torch.equal(live, torch.isfinite(part.pm[..., -1])) and not live[1].any()
    torch.testing.assert_close(part.pm[..., -1][live], want_part.pm[..., -1][live], rtol=1e-6, atol=1e-6)
    assert torch.equal(part.pl[..., -1], want_part.pl[..., -1])
    torch.testing.assert_close(part.pacc[..., -1, :], want_part.pacc[..., -1, :], rtol=0, atol=0)

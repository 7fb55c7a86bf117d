"""`spindlekv` (Tang et al., ACL 2025, arXiv 2507.06517): codebook in shallow layers, eviction in deep ones.

SpindleKV observes that deep layers attend sparsely (eviction works there) while shallow layers
attend broadly but hold very similar vectors (merging works there). Implemented here:

Shallow layers (`layer_idx < shallow_layers`, default round(0.2 * layers), at least 1):
codebook replacement, separately for keys and values of each (row, kv head). Cosine
similarities between the row's tokens give a graph G = [cos > theta] (theta_K 0.98,
theta_V 0.95, the paper's values); greedily the node of highest degree among the unmerged
tokens becomes a codebook entry (its unit direction) and every unmerged neighbour is merged
into it, until no unmerged token has an unmerged neighbour (the rest become entries of their
own). A token is stored as (codebook index, magnitude = its L2 norm) and reconstructed as
codebook[index] * magnitude. Storage: codebook vectors (model dtype) + indices (int16, or
int32 past 32767 entries) + magnitudes (model dtype), counted from those tensors. Decoded
tokens join an existing entry when cos > theta, otherwise they open a new entry (the paper's
incremental update). The paper builds key codebooks before RoPE and re-applies RoPE after
reconstruction; kvpipe caches keys after RoPE, so with `rope_theta` set (the model's
rope_theta, default-type RoPE) keys are un-rotated by their positions before the codebook and
rotated back when reconstructed; with `rope_theta=None` (default: the policy cannot see the
model config) the codebook is built on the cached post-RoPE keys, which merge less.

Deep layers: attention-based eviction, SnapKV-style: the last `window` queries' attention
(summed over the window queries, pooled with `kernel`/`pooling` in position order), the
window itself always kept. The GQA dilemma (one kv head, several query heads that disagree,
which averaging across the group blurs) is answered as the paper does: the kv heads are
unfolded to one per query head, and each query head keeps its own top tokens. The unfolded
copies are exact duplicates, which the paper's codebook absorbs; here the kv head's kept
vectors are stored once (the union over its query heads) and each query head holds int16
indices into them, so duplicates cost an index, not a vector. Attention sees the unfolded
[b, query heads, slots, d] keys/values (plain MHA); `positions` is per query head. Decode on the
GPU reads each kept vector once for all its query heads (`spindle_kernels.union_decode`), from
member bits per kept vector (which of its query heads keep it; one byte for up to 8 heads a
group, counted in the layer's bytes and its budget).

Budget: the stated target is the budget ratio in bytes: a row with budget B tokens per head
may keep B * kv_heads * 2 * head_dim * dtype bytes per layer, in total over the layers. The
codebook layers' size is data dependent (the paper notes it cannot set it exactly), so the
deep layers take what is left: layers compress in order, each deep layer gets the remaining
bytes times its pyramid weight (linear from `pyramid_top` to `pyramid_bottom` over the deep
layers, PyramidKV's shape with the paper's alpha 0.525 / beta 0.05 as end points) over the sum
of the remaining weights, and keeps the largest per-query-head count k whose union +
indices fit it. The last deep layer absorbs the rounding, so a row's total lands on target
unless the codebook layers alone exceed it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from pipeline.attention_math import dense_bias, grouped_attention, position_mask
from pipeline.kv_cache import EMPTY, KVLayer
from policies.base import Budget, Policy
from policies.registry import register
from policies.seqstore import _expand_index, front_mask, gather_front
from policies.signals import KEEP_BASE, in_window, pool_in_position_order, received_attention, window_size
from policies.spindle_append import evicted_append, matched_append

BIG = 2**40
_SPENT = "spindlekv_spent"  # StepContext.extras: (next layer, kept bytes per row of the layers before it)
# Codebook layers may fold the decode append's match into the attention kernel
# (`SpindleLayer._attend_pending`; cleared if that kernel cannot be built), where the kernel takes its
# tensor-core path (`spindle_kernels.mma_path`: bf16/fp16 storage, no RoPE re-rotation): there the
# new key is one more row of the query tile and the value match one more small product per block,
# so the match costs almost nothing beside the attention's own reads. Elsewhere (RoPE, float32) the
# match stays apart (`best_match`): the float32 path's fused match, element-wise float32 sums on
# the FMA units, was measured no faster on an H100 (`python -m pipeline.bench.check_spindle_decode`,
# Llama-8B shapes, 8 layers, 32K, graph steps: batch 4 4.21 ms fused vs 3.65 ms apart, batch 48
# 13.55 vs 13.78 ms; one layer's kernel at batch 48, 32K: 5.81 ms fused vs 5.12 ms for attention
# (3.35) + `best_match` on both books). On an H200 (code 4c16208, batch 109, 32K, tensor-core
# path): fused 4.86 ms vs attention 3.49 + best_match 3.00 (`spindle_kernels`' MMA_* note); model,
# 8 layers, graph steps: 13.54 vs 17.73 ms (default launch then: 64-token blocks, 3 stages).
FUSED_MATCH = True


# -- RoPE (default type, rotate-half convention as Llama/Qwen/Mistral in transformers) -----------
_ROPE_TABLES: dict = {}
_BLOCK = 8192  # tokens per block of the float32 temporaries (per-layer transients stay small)


def rope_table(theta: float, d: int, upto: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [>= upto, d] float32 of positions 0.. (angles in float64, as `rope` always formed them);
    cached per (theta, d, device) and grown by doubling."""
    key = (float(theta), d, str(device))
    tab = _ROPE_TABLES.get(key)
    if tab is None or tab[0].shape[0] < upto:
        size = max(upto, 2 * (tab[0].shape[0] if tab is not None else 2048))
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
        ang = torch.arange(size, device=device, dtype=torch.float64)[:, None] * inv_freq
        ang = torch.cat([ang, ang], dim=-1)
        tab = (ang.cos().float(), ang.sin().float())
        _ROPE_TABLES[key] = tab
    return tab


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool = False) -> torch.Tensor:
    """Rotate x [..., n, d] by its positions [..., n] (or back, with inverse); float32 arithmetic,
    blocks of tokens at a time."""
    d = x.shape[-1]
    pos = positions.clamp(min=0).long()
    upto = int(pos.max()) + 1 if pos.numel() else 1
    cos_t, sin_t = rope_table(theta, d, upto, x.device)
    out = torch.empty_like(x)
    n = x.shape[-2]
    for lo in range(0, max(n, 1), _BLOCK):
        hi = min(n, lo + _BLOCK)
        p = pos[..., lo:hi]
        cos, sin = cos_t[p], sin_t[p]
        if inverse:
            sin = -sin
        xf = x[..., lo:hi, :].float()
        half = torch.cat([-xf[..., d // 2 :], xf[..., : d // 2]], dim=-1)
        out[..., lo:hi, :] = (xf * cos + half * sin).to(x.dtype)
    return out


def rope_one(x: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool = False) -> torch.Tensor:
    """`rope` of one token per row (x [b, h, 1, d], positions [b, 1]) without a host read: the angles
    formed as `rope_table` forms them (float64 products, cos/sin, then float32), so the result is
    the table's, and a decode step stays capturable in a CUDA graph."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d))
    ang = positions.clamp(min=0).double()[:, None, :, None] * inv_freq  # [b, 1, 1, d/2]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().float(), ang.sin().float()
    if inverse:
        sin = -sin
    xf = x.float()
    half = torch.cat([-xf[..., d // 2 :], xf[..., : d // 2]], dim=-1)
    return (xf * cos + half * sin).to(x.dtype)


# -- the codebook ------------------------------------------------------------------------------
def build_codebook(x: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy max-degree codebook of one sequence x [n, d].

    Returns (codebook [c, d] unit directions, index [n] int64, magnitude [n] float32).
    """
    n = x.shape[0]
    xf = x.float()
    mag = xf.norm(dim=-1)
    unit = xf / mag.clamp(min=1e-12)[:, None]
    graph = (unit @ unit.T) > theta
    graph.fill_diagonal_(True)
    degree = graph.sum(-1)
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    index = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    centers: list[int] = []
    while True:
        live_degree = torch.where(alive, degree, torch.full_like(degree, -1))
        c = int(live_degree.argmax())
        if int(live_degree[c]) <= 1:  # no unmerged token has an unmerged neighbour
            break
        members = graph[c] & alive
        index[members] = len(centers)
        centers.append(c)
        alive &= ~members
        degree = degree - graph[:, members].sum(-1)
    singles = alive.nonzero().squeeze(-1)
    index[singles] = torch.arange(len(centers), len(centers) + singles.numel(), device=x.device)
    order = torch.cat([torch.tensor(centers, dtype=torch.int64, device=x.device), singles])
    return unit[order], index, mag


def _kernels(device: torch.device):
    """`spindle_kernels` when its Triton kernels run on this device, else None (the exact torch path)."""
    from policies import spindle_kernels as sk

    return sk if device.type == "cuda" and sk.kernel_available(device) else None


def _append_kernel(device: torch.device) -> bool:
    """A decode token's writes run as one Triton launch (`spindle_append`) where the decode kernels run."""
    from policies import spindle_kernels as sk

    return sk.kernel_available(device)


_PAIRS = 1 << 26  # float32 elements of the greedy's similarity blocks (its candidate width follows it)
# Chunk appends and the CPU paths take smaller blocks: their whole [P, q, C] matrices were a chunked
# prefill's largest transient (0.6 GiB on SmolLM2 shapes, where the bound leaves ~0.1 GiB).
_SIMS = 1 << 22  # float32 elements of a similarity block (16 MiB)
_LINKS = 1 << 24  # bools of the in-chunk candidates' link matrices handled at once (16 MiB)


def _norms(x: torch.Tensor) -> torch.Tensor:
    """x.float().norm(dim=-1) ([..., n, d] -> [..., n]), blocks of tokens at a time."""
    if x.shape[-2] <= _BLOCK:
        return x.float().norm(dim=-1)
    out = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    for lo in range(0, x.shape[-2], _BLOCK):
        out[..., lo : lo + _BLOCK] = x[..., lo : lo + _BLOCK, :].float().norm(dim=-1)
    return out


def _units(x: torch.Tensor, mag: torch.Tensor, dtype) -> torch.Tensor:
    """(x.float() / mag.clamp(1e-12)).to(dtype), blocks of tokens at a time."""
    if x.shape[-2] <= _BLOCK:
        return (x.float() / mag.clamp(min=1e-12)[..., None]).to(dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for lo in range(0, x.shape[-2], _BLOCK):
        sl = slice(lo, lo + _BLOCK)
        out[..., sl, :] = (x[..., sl, :].float() / mag[..., sl].clamp(min=1e-12)[..., None]).to(dtype)
    return out


def _degrees(x: torch.Tensor, mag: torch.Tensor, lengths: torch.Tensor, theta: float) -> torch.Tensor:
    """[P, n] int32: per live token (i < lengths[p]) 1 + the number of other live tokens with cos > theta."""
    P, n, _ = x.shape
    sk = _kernels(x.device)
    if sk is not None:
        r = 1.0 / mag.clamp(min=1e-12)
        if theta >= 0:  # each pair multiplied once
            deg = sk.self_pair_counts(x, r, lengths, theta) + 1
        else:
            deg = sk.pair_counts(x, x, r, r, lengths, lengths, theta, skip_diag=True) + 1
    else:
        unit = _units(x, mag, torch.float32)
        live = torch.arange(n, device=x.device) < lengths[:, None]
        deg = torch.zeros((P, n), dtype=torch.int32, device=x.device)
        step = max(1, _SIMS // max(1, P * n))  # the CPU path: blocks as small as `_resolve_chunk`'s
        for lo in range(0, n, step):
            g = (unit[:, lo : lo + step] @ unit.transpose(1, 2)) > theta
            g &= live[:, None, :]
            idx = torch.arange(lo, min(n, lo + step), device=x.device)
            g[:, idx - lo, idx] = True  # the diagonal, as `build_codebook`
            deg[:, lo : lo + step] = g.sum(-1).to(torch.int32)
    return deg.masked_fill(torch.arange(n, device=x.device) >= lengths[:, None], 0)


_CANDIDATES = 1024  # most candidate centers a greedy step weighs at once


def _greedy(
    vec: torch.Tensor, scale: torch.Tensor, degree: torch.Tensor, live: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`build_codebook`'s greedy over several sequences at once, without storing the graph.

    vec [g, K, d] float32 and scale [g, K] give cos(i, j) = (vec_i . vec_j) scale_i scale_j (as the
    degrees were counted); degree [g, K] (neighbours + 1), live [g, K]. The one-at-a-time greedy takes
    the first token of highest live degree as a center, its live neighbours join it, and the degrees
    lose them. A step here takes, per sequence, as many of those turns as it can prove: the T first
    tokens in the greedy's order (live degree down, index up) are weighed at once (`_accepted`), and
    the centers among them that the one-at-a-time greedy would take next, in that order, are taken
    together. Data with many small clusters (repeated tokens: pairs) needs a few steps instead of one
    per cluster. Memory: [g, K, T] bools (and their bfloat16 copy), float32 blocks of `_SIMS`.
    Returns (cluster [g, K] int64: the rank of the center whose entry the token joined, -1 for a
    token left alone; centers [g, c] int64: the center tokens in the order chosen, -1 padded to
    the candidates the steps weighed)."""
    g, K, d = vec.shape
    dev = vec.device
    degree = degree.to(torch.int64).masked_fill(~live, 0)
    alive = live.clone()
    cluster = torch.full((g, K), -1, dtype=torch.int64, device=dev)
    count = torch.zeros(g, dtype=torch.int64, device=dev)
    block = max(1, _PAIRS // max(1, g * K))
    width = max(1, min(K, _CANDIDATES, block))
    tok = torch.arange(K, device=dev)
    centers = []
    while True:
        live_degree = torch.where(alive, degree, torch.full_like(degree, -1))
        order_key = (K + 1 - live_degree) * (K + 1) + tok  # the greedy's order: degree down, index up
        cand = order_key.topk(width, dim=-1, largest=False, sorted=True).indices  # [g, T]
        near = _neighbourhoods(vec, scale, alive, cand, theta)  # [g, K, T]
        accepted = _accepted(near, cand, live_degree.gather(1, cand))
        member_of = near & accepted[:, None, :]
        members = member_of.any(-1)
        m_n = members.sum(-1)
        m_max = int(m_n.max())  # (the step's one host sync)
        if m_max == 0:
            break
        rank = accepted.long().cumsum(-1) - 1  # the order of the step's centers
        joined = rank.gather(1, member_of.to(torch.int8).argmax(-1))  # each member's (one) center
        cluster = torch.where(members, count[:, None] + joined, cluster)
        centers.append(torch.where(accepted, cand, torch.full_like(cand, -1)))
        count += accepted.sum(-1)
        alive &= ~members
        _drop_members(vec, scale, degree, members, m_n, m_max, theta, max(1, _SIMS // max(1, g * K)))
    if not centers:
        return cluster, torch.zeros((g, 0), dtype=torch.int64, device=dev)
    # each sequence's centers in the order chosen, then -1s (as many as the steps weighed: no read)
    cent = torch.cat(centers, dim=1)
    slot = torch.arange(cent.shape[1], device=dev)
    order = torch.where(cent >= 0, slot, slot + cent.shape[1]).argsort(dim=-1)
    return cluster, cent.gather(1, order)


def _neighbourhoods(vec, scale, alive, cand, theta) -> torch.Tensor:
    """[g, K, T] bool: token u is a live neighbour of candidate t (or t itself, when live): the
    members candidate t would take as a center now."""
    g, K, d = vec.shape
    vc = torch.gather(vec, 1, cand[..., None].expand(*cand.shape, d)).transpose(1, 2)
    sc = torch.gather(scale, 1, cand)[:, None, :]
    near = torch.empty((g, K, cand.shape[1]), dtype=torch.bool, device=vec.device)
    for rows in _row_blocks(K, g, cand.shape[1]):  # float32 similarities in `_SIMS` blocks
        cos = torch.bmm(vec[:, rows], vc).mul_(scale[:, rows, None]).mul_(sc)
        near[:, rows] = (cos > theta) & alive[:, rows, None]
    near.scatter_(1, cand[:, None, :], torch.gather(alive, 1, cand)[:, None, :])  # the graph's diagonal
    return near


def _accepted(near: torch.Tensor, cand: torch.Tensor, cand_degree: torch.Tensor) -> torch.Tensor:
    """[g, T] bool: the candidates (in the greedy's order) that the one-at-a-time greedy takes as its
    next centers, proven from their neighbourhoods (`near` [g, K, T]) before any is taken.

    A candidate is `clean` when its neighbourhood shares no token with an earlier candidate's: no
    earlier turn changes its live degree or its members. A candidate that is a member of an earlier
    clean one is removed by that turn (skipped). The first other candidate (one whose degree may
    have fallen, or of degree <= 1) ends what can be proven: the greedy's next pick after the turns
    before it is not known without them. Every clean candidate before it is then the first token of
    highest live degree at its turn (the tokens before it were taken or removed; the others only
    lose degree), and takes the members it has now."""
    T = cand.shape[1]
    earlier = torch.ones((T, T), dtype=torch.bool, device=near.device).tril(-1)  # [k, j]: j before k
    nf = near.to(torch.bfloat16)  # 0/1: a positive sum of them stays positive in any rounding
    shares = torch.bmm(nf.transpose(1, 2), nf) > 0  # [g, T, T]: neighbourhoods k and j meet
    clean = ~(shares & earlier).any(-1) & (cand_degree > 1)
    is_member = torch.gather(near, 1, cand[:, :, None].expand(*cand.shape, T))  # [g, k, j]: k joins j
    removed = (is_member & earlier & clean[:, None, :]).any(-1)
    unproven = ~clean & ~removed
    return clean & (unproven.long().cumsum(-1) == 0)


def _drop_members(vec, scale, degree, members, m_n, m_max: int, theta: float, block: int) -> None:
    """Live degrees lose this step's members (in place): a [g, K, block] product at a time."""
    d = vec.shape[-1]
    order = members.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[:, :m_max]
    for lo in range(0, m_max, block):
        j = order[:, lo : lo + block]
        ok = torch.arange(lo, lo + j.shape[1], device=vec.device) < m_n[:, None]
        vj = torch.gather(vec, 1, j[..., None].expand(*j.shape, d))
        cos = (
            torch.bmm(vec, vj.transpose(1, 2))
            .mul_(scale[:, :, None])
            .mul_(torch.gather(scale, 1, j)[:, None, :])
        )
        degree -= ((cos > theta) & ok[:, None, :]).sum(-1)


def build_codebooks(
    x: torch.Tensor, lengths: torch.Tensor, theta: float, dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`build_codebook` for P sequences at once: x [P, n, d], the first lengths[p] tokens of each.

    Returns (book [P, C, d] unit directions in `dtype`, zero past counts[p]; index [P, n] int64
    (0 past the length); magnitude [P, n] float32; counts [P] int64). Same algorithm and tie-breaks:
    the greedy runs only over tokens with a neighbour (degree >= 2), since a token without one is
    never a center nor a member; all sequences step together, one host sync per step.
    """
    P, n, d = x.shape
    dev = x.device
    mag = _norms(x)
    live = torch.arange(n, device=dev) < lengths[:, None]
    degree = _degrees(x, mag, lengths, theta)
    linked = degree >= 2
    k_n, (sub_tok,) = _compact2(linked)  # [P], [P, K]: token index of each linked token, in order
    K = sub_tok.shape[1]
    cluster = torch.full((P, n + 1), -1, dtype=torch.int64, device=dev)
    center_tok = torch.zeros((P, 0), dtype=torch.int64, device=dev)
    if K:
        sub_live = torch.arange(K, device=dev) < k_n[:, None]
        xs = torch.gather(x, 1, sub_tok[..., None].expand(*sub_tok.shape, d)).float()
        ms = torch.gather(mag, 1, sub_tok).clamp(min=1e-12)
        if _kernels(dev) is not None:  # cosines as the degree kernel forms them
            vec, scale = xs, 1.0 / ms
        else:  # as `build_codebook`: unit vectors
            vec, scale = xs / ms[..., None], torch.ones_like(ms)
        xs = None
        cl, cent = _greedy(vec, scale, torch.gather(degree, 1, sub_tok), sub_live, theta)
        vec = scale = None
        dest = torch.where(sub_live, sub_tok, torch.full_like(sub_tok, n))  # padding: the trash column
        cluster.scatter_(1, dest, cl)
        center = torch.gather(sub_tok, 1, cent.clamp(min=0))
        center_tok = torch.where(cent >= 0, center, torch.full_like(cent, -1))
    cluster = cluster[:, :n]
    n_centers = (center_tok >= 0).sum(-1)
    single = live & (cluster < 0)
    index = torch.where(single, n_centers[:, None] + single.long().cumsum(-1) - 1, cluster)
    index = torch.where(live, index, torch.zeros_like(index))
    counts = n_centers + single.sum(-1)
    C = int(counts.max()) if P else 0
    # entry e's token: centers in the order chosen, then the single tokens in order
    entry_tok = torch.zeros((P, C + 1), dtype=torch.int64, device=dev)
    if center_tok.shape[1]:
        ok = center_tok >= 0
        slot = torch.arange(center_tok.shape[1], device=dev).expand_as(center_tok)
        entry_tok.scatter_(1, torch.where(ok, slot, torch.full_like(slot, C)), center_tok.clamp(min=0))
    tok = torch.arange(n, device=dev).expand(P, n)
    slot = torch.where(single, index, torch.full_like(index, C))
    entry_tok.scatter_(1, slot, tok)
    entry_tok = entry_tok[:, :C]
    book = torch.zeros((P, C, d), dtype=dtype, device=dev)
    for lo in range(0, C, _BLOCK):
        t = entry_tok[:, lo : lo + _BLOCK]
        rows = torch.gather(x, 1, t[..., None].expand(*t.shape, d)).float()
        unit = rows / torch.gather(mag, 1, t).clamp(min=1e-12)[..., None]
        used = (torch.arange(lo, lo + t.shape[1], device=dev) < counts[:, None])[..., None]
        book[:, lo : lo + _BLOCK] = torch.where(used, unit, torch.zeros_like(unit)).to(dtype)
    return book, index, mag.masked_fill(~live, 0.0), counts


def _best_match_torch(unit: torch.Tensor, book: torch.Tensor, count: torch.Tensor):
    """`spindle_kernels.best_match` in float32 torch (unit [P, q, d] float32), entries in blocks."""
    P, q, _ = unit.shape
    C = book.shape[1]
    best = torch.full((P, q), -2.0, device=unit.device)
    arg = torch.zeros((P, q), dtype=torch.int64, device=unit.device)
    step = max(1, _SIMS // max(1, P * q))
    for lo in range(0, C, step):
        cos = torch.einsum("pcd,pqd->pqc", book[:, lo : lo + step].float(), unit)
        live = torch.arange(lo, lo + cos.shape[-1], device=unit.device) < count[:, None]
        bm, am = cos.masked_fill(~live[:, None, :], -2.0).max(-1)
        upd = bm > best
        best, arg = torch.where(upd, bm, best), torch.where(upd, am + lo, arg)
    return best, arg


def _resolve_chunk(unit, units_b, valid, cand, best_old, arg_old, count, theta):
    """Exact sequential semantics of a chunk whose tokens match entries opened inside it.

    unit [P, q, d] float32 (the tokens), units_b [P, q, d] (their entries, as stored); a candidate
    (no old entry above theta) opens iff no earlier opener matches it; any token joins the best of the
    old entries and the earlier openers' entries (the old first on ties, then the earliest opener).
    Only candidates can open, so the similarities are taken against them alone. Memory: the links
    among candidates ([g, C, C] bools, at most `_LINKS`) and similarity blocks of at most `_SIMS`
    floats; the whole [P, q, C] similarity matrix (float32, three of them alive at once) was the
    largest transient of a chunked prefill (0.6 GiB on SmolLM2 shapes, 4096-token chunks).
    """
    P, q, d = unit.shape
    dev = unit.device
    c_n, (c_tok,) = _compact2(cand)  # candidates' token indices, in order
    C2 = c_tok.shape[1]
    opens = torch.zeros_like(cand)
    new_idx = arg_old.clone()
    if C2 == 0:
        return opens, new_idx
    c_ok = torch.arange(C2, device=dev) < c_n[:, None]
    per = max(1, _LINKS // (C2 * C2))
    for lo in range(0, P, per):
        sl = slice(lo, lo + per)
        g = unit[sl].shape[0]
        ct, ok = c_tok[sl], c_ok[sl]
        entries = torch.gather(units_b[sl], 1, ct[..., None].expand(g, C2, d)).float()
        cand_unit = torch.gather(unit[sl], 1, ct[..., None].expand(g, C2, d))
        op = _openers(_candidate_links(cand_unit, entries, ct, ct, ok, theta), ok)
        best_new, arg_new = _best_opener(unit[sl], entries, ct, ok & op)
        rank = op.long().cumsum(-1) - 1  # the entry of opener c is count + rank[c]
        new_entry = count[sl, None] + torch.gather(rank, 1, arg_new)
        idx = torch.where(best_old[sl] >= best_new, arg_old[sl], new_entry)
        op_tok = torch.zeros((g, q + 1), dtype=torch.bool, device=dev)
        op_tok.scatter_(1, torch.where(ok, ct, torch.full_like(ct, q)), op)
        op_tok = op_tok[:, :q]
        rank_tok = op_tok.long().cumsum(-1) - 1
        opens[sl] = op_tok
        new_idx[sl] = torch.where(op_tok, count[sl, None] + rank_tok, idx)
    return opens, new_idx


def _row_blocks(rows: int, g: int, cols: int):
    """Slices of `rows` such that a [g, block, cols] float32 block holds at most `_SIMS` elements."""
    step = max(1, _SIMS // max(1, g * cols))
    return (slice(lo, lo + step) for lo in range(0, rows, step))


def _candidate_links(x_unit, entries, x_tok, c_tok, c_ok, theta) -> torch.Tensor:
    """[g, r, C] bool: row token x_tok[r] (unit x_unit) has cos > theta with the entry of candidate c,
    and c (live) precedes it. Formed in row blocks."""
    g, r, _ = x_unit.shape
    link = torch.empty((g, r, c_tok.shape[1]), dtype=torch.bool, device=x_unit.device)
    for rows in _row_blocks(r, g, c_tok.shape[1]):
        before = (c_tok[:, None, :] < x_tok[:, rows, None]) & c_ok[:, None, :]
        link[:, rows] = (x_unit[:, rows] @ entries.transpose(1, 2) > theta) & before
    return link


def _openers(link_cc: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """[g, C] bool: the candidates that open, in order: one opens iff no earlier opener links to it
    (`link_cc` [g, k, j]: candidate k links to the earlier candidate j's entry).

    A round decides at least each row's first undecided candidate (it opens), so C rounds decide
    them all; after each earlier one the host reads whether any is left (a device sync). A round
    with none left changes nothing, so the first runs unasked."""
    op = torch.zeros_like(ok)
    undecided = ok.clone()
    for rounds_left in reversed(range(ok.shape[1])):
        closed = undecided & (link_cc & op[:, None, :]).any(-1)
        undecided &= ~closed
        now = undecided & ~(link_cc & undecided[:, None, :]).any(-1)
        op |= now
        undecided &= ~now
        if not rounds_left or not bool(undecided.any()):
            break
    return op


def _best_opener(unit, entries, c_tok, opener) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine [g, q], candidate slot [g, q]) of each token's best earlier opener (-2.0 and the first
    slot when none), token blocks of `_SIMS` similarities at a time."""
    g, q, _ = unit.shape
    tok = torch.arange(q, device=unit.device)
    best = torch.empty((g, q), dtype=torch.float32, device=unit.device)
    arg = torch.empty((g, q), dtype=torch.int64, device=unit.device)
    for rows in _row_blocks(q, g, c_tok.shape[1]):
        cos = unit[:, rows] @ entries.transpose(1, 2)  # [g, t, c] cos(token t, entry of candidate c)
        seen = (c_tok[:, None, :] < tok[None, rows, None]) & opener[:, None, :]
        best[:, rows], arg[:, rows] = cos.masked_fill_(~seen, -2.0).max(-1)
    return best, arg


def _compact2(valid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(count [P], [index [P, K]]): the positions of each row's True entries, in order (K = max count)."""
    n = valid.shape[-1]
    slot = torch.arange(n, device=valid.device)
    order = torch.where(valid, slot, slot + n).argsort(dim=-1)
    count = valid.sum(-1)
    k = int(count.max()) if count.numel() else 0
    idx = order[..., :k]
    return count, [torch.where(slot[:k] < count[..., None], idx, torch.zeros_like(idx))]


def _filled(like: torch.Tensor, slots: int, fill) -> torch.Tensor:
    """A [b, h, slots, ...] tensor like `like`, filled with `fill`."""
    return torch.full((*like.shape[:2], slots, *like.shape[3:]), fill, dtype=like.dtype, device=like.device)


def _members(index: torch.Tensor, n: torch.Tensor, rows: int, group: int) -> torch.Tensor | None:
    """An evicted layer's member bits per book row (`spindle_kernels.member_bits`), which let decode
    read each kept row once for all its query heads; None without GQA or past 31 heads a group."""
    from policies import spindle_kernels as sk

    if not _member_bytes(group):
        return None
    return sk.member_bits(index, n, rows, group)


def _member_bytes(group: int) -> int:
    """Bytes of one book row's member bits (`_members`; 0 where the layer keeps none)."""
    from policies import spindle_kernels as sk

    dtype = sk.member_dtype(group) if group > 1 else None
    return 0 if dtype is None else dtype.itemsize


def index_dtype(entries: int) -> torch.dtype:
    return torch.int16 if entries < 2**15 else torch.int32


class SpindleLayer(KVLayer):
    """Dense until its first compression; then a codebook layer (shallow) or an unfolded
    eviction layer (deep). Both store per kv head a book of vectors and per exposed head
    (kv head / query head) an index (and, for codebooks, a magnitude) per token."""

    counts_rows = False  # compressed modes store their own way (`_n`)

    def __init__(self) -> None:
        super().__init__()
        self.mode = "dense"
        self.mb = None  # member bits of a GQA evicted layer's book rows (`_members`)
        self._pending = None  # a decode token held from `append` to `attend` (codebook layers)
        # Host facts of a compressed layer, per row: the longest and the shortest `_n` of its heads,
        # and (evicted) the most book entries of its kv heads; None when unknown. A chunk adds each
        # row's non-padding tokens to every one of them, so its append sizes its tensors unread.
        self._lengths = None

    # -- views ------------------------------------------------------------------------------
    def _view(self, which: str) -> torch.Tensor:
        """Dense [b, e, s, d] keys or values in the book's dtype (exposed head e reads its kv head's book
        without copying it per head); codebook keys are re-rotated when stored before RoPE."""
        book = self.kbook if which == "k" else self.vbook
        idx = self.rk if which == "k" or self.mode == "evicted" else self.rv
        b, e, s = idx.shape
        hk, d = book.shape[1], book.shape[-1]
        group = e // hk
        flat = idx.reshape(b, hk, group * s)  # exposed heads are kv-major: head h reads kv head h // group
        out = torch.gather(book, 2, _expand_index(flat.long().clamp(min=0), book)).reshape(b, e, s, d)
        if self.mode == "codebook":
            mag = self.mk if which == "k" else self.mv
            for lo in range(0, s, _BLOCK):
                sl = slice(lo, lo + _BLOCK)
                out[:, :, sl] = (out[:, :, sl].float() * mag[:, :, sl].float()[..., None]).to(book.dtype)
            if which == "k" and self.rope_theta is not None:
                out = rope(out, self._pos, self.rope_theta)
        return out

    # Dense mode is `KVLayer`'s own storage; once compressed, the layer shows views of its form.
    @property
    def keys(self):
        return self._view("k") if self._compressed() else KVLayer.keys.fget(self)

    @keys.setter
    def keys(self, value) -> None:
        KVLayer.keys.fset(self, value)

    @property
    def values(self):
        return self._view("v") if self._compressed() else KVLayer.values.fget(self)

    @values.setter
    def values(self, value) -> None:
        KVLayer.values.fset(self, value)

    @property
    def positions(self):
        return self._pos if self._compressed() else KVLayer.positions.fget(self)

    @positions.setter
    def positions(self, value) -> None:
        KVLayer.positions.fset(self, value)

    def _compressed(self) -> bool:
        return self.__dict__.get("mode", "dense") != "dense"  # base __init__ runs before mode is set

    # -- conversions ------------------------------------------------------------------------
    def to_codebook(self, theta_k: float, theta_v: float, rope_theta: float | None) -> None:
        filled = self.positions != EMPTY
        n = filled.sum(-1)
        rows = self._appended_rows()  # every head holds its row's count
        host = [rows, rows] if rows is not None else self._read_lengths(n)
        keys, values, pos = gather_front(
            filled, max(host[0], default=0), self.keys, self.values, self.positions
        )
        self._drop_dense()  # the compacted copies are all that is needed now
        b, h, s, d = keys.shape
        if rope_theta is not None:
            keys = rope(keys, pos, rope_theta, inverse=True)
        books, idxs, mags = {}, {}, {}
        lengths = n.reshape(b * h)
        for which, x, theta in (("k", keys, theta_k), ("v", values, theta_v)):
            book, index, mag, counts = build_codebooks(x.reshape(b * h, s, d), lengths, theta, x.dtype)
            c = book.shape[1]
            books[which] = (book.reshape(b, h, c, d), counts.reshape(b, h))
            idxs[which] = index.reshape(b, h, s).to(index_dtype(c))
            mags[which] = mag.reshape(b, h, s).to(x.dtype)
            x = book = index = mag = None
        keys = values = None
        self.kbook, self.kbook_n = books["k"]
        self.vbook, self.vbook_n = books["v"]
        self.rk, self.rv = idxs["k"], idxs["v"]
        self.mk, self.mv = mags["k"], mags["v"]
        self._pos = torch.where(front_mask(n, s), pos, torch.full_like(pos, EMPTY))
        self._n = n
        self.theta_k, self.theta_v, self.rope_theta = theta_k, theta_v, rope_theta
        self.mode = "codebook"
        self._know(host, s)

    def _know(self, host: list[list[int]], slots: int) -> None:
        """Keep the host facts `host` (`_lengths`) and set those attention's fast paths need: every
        stored position is the same across a codebook layer's heads; a row shorter than the slot
        count leaves empty slots."""
        self._lengths = host
        self.heads_differ = self.mode == "evicted"
        self.has_empty = min(host[1], default=slots) < slots

    @staticmethod
    def _read_lengths(n: torch.Tensor, *books: torch.Tensor) -> list[list[int]]:
        """The host facts read from the device (one sync): per row the longest and the shortest of
        `n` ([b, e]), then the most entries of each of `books` ([b, hk])."""
        return torch.stack([n.amax(-1), n.amin(-1), *(c.amax(-1) for c in books)]).tolist()

    def _drop_dense(self) -> None:
        self._bufs = {}  # storage was rebuilt: no buffer of the old form stays alive
        KVLayer.keys.fset(self, None)
        KVLayer.values.fset(self, None)
        KVLayer.positions.fset(self, None)
        self.has_empty = self.heads_differ = True  # ragged per-head views: always the masked path

    def evict_unfolded(self, selected: torch.Tensor, num_heads: int) -> None:
        """Keep, per exposed (query) head, the slots `selected` ([b, H, s] bool over the current view)."""
        if self.mode == "dense":
            hk = self.keys.shape[1]
            group = num_heads // hk
            s = self.keys.shape[2]
            entry = torch.arange(s, device=selected.device).expand(*selected.shape)
            kvec, vvec = self.keys, self.values
            pos_e = self.positions.repeat_interleave(group, dim=1)
        else:
            hk = self.kbook.shape[1]
            group = num_heads // hk
            entry = self.rk.long().clamp(min=0)  # slots past a head's length may hold -1 (never selected)
            kvec, vvec = self.kbook, self.vbook
            pos_e = self._pos
        b = selected.shape[0]
        n_entries = kvec.shape[2]
        # union per kv head: entries referenced by a selected slot of any of its query heads
        used = torch.zeros((b, hk, n_entries + 1), dtype=torch.bool, device=selected.device)
        ent = torch.where(selected, entry, torch.full_like(entry, n_entries)).reshape(b, hk, -1)
        used.scatter_(2, ent, torch.ones_like(ent, dtype=torch.bool))
        used = used[..., :n_entries]
        u_n, n = used.sum(-1), selected.sum(-1)
        host = self._read_lengths(n, u_n)  # the one host sync: the widths below, per row
        kbook, vbook = gather_front(used, max(host[2], default=0), kvec, vvec)
        new_id = used.long().cumsum(-1) - 1  # [b, hk, entries]
        new_id_e = new_id.repeat_interleave(group, dim=1)
        remapped = torch.gather(new_id_e, 2, entry)
        rk, pos = gather_front(selected, max(host[0], default=0), remapped, pos_e)
        self.kbook, self.vbook, self.kbook_n = kbook.contiguous(), vbook.contiguous(), u_n
        self.vbook_n = u_n
        self.rk = rk.to(index_dtype(kbook.shape[2]))
        self.mb = _members(rk, n, kbook.shape[2], group)
        self.rv = None
        self.mk = self.mv = None
        self._pos = torch.where(front_mask(n, pos.shape[-1]), pos, torch.full_like(pos, EMPTY)).to(
            torch.int32
        )
        self._n = n
        self._drop_dense()
        self.mode = "evicted"
        self._know(host, pos.shape[-1])

    # -- the layer protocol -----------------------------------------------------------------
    def attend(self, query: torch.Tensor, step, scaling: float) -> torch.Tensor:
        """Decode (one query per row) over the compressed storage itself: `spindle_kernels`' Triton
        flash-decoding gathers book rows by index, scales and rotates them in registers. Every
        stored token precedes the query, so no mask is needed; lengths are `_n`. Prefill, dense
        layers, CPU and machines without triton take the exact path over the dense views."""
        if self.__dict__.get("_pending") is not None:
            return self._attend_pending(query, scaling, static=step.static_slots is not None)
        if step.static_slots is not None:
            return self.attend_static(query, scaling)
        if self._compressed() and query.shape[2] == 1:
            from policies import spindle_kernels as sk  # triton decides at import whether it interprets

            if sk.kernel_available(query.device):
                return self._attend_stored(query, scaling)
        if self._compressed():
            # a prefill chunk over the storage's dense views: without empty slots and padding the new
            # tokens are the last q slots of every head and every kept token precedes them (flash)
            keys, values = self.keys, self.values
            if self.has_empty or step.padded:
                bias = position_mask(self._pos, step.positions, self.heads_differ)
            else:
                bias = dense_bias(query.shape[2], keys.shape[2])
            return grouped_attention(query, keys, values, bias, scaling)
        return super().attend(query, step, scaling)

    def _attend_stored(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """The kernel over the stored tokens (views; lengths `_n`): [b, H, 1, d]."""
        return self._kernel_decode(query, scaling, {name: getattr(self, name) for name in self._GROWN})

    def _kernel_decode(self, query: torch.Tensor, scaling: float, st: dict) -> torch.Tensor:
        """`spindle_kernels`' decode over storage `st` (views, or the whole buffers: the lengths bound
        what is read): GQA evicted layers read each kept row once for its query heads (`union_decode`,
        lengths `kbook_n`), the rest through each exposed head's indices (lengths `_n`)."""
        from policies import spindle_kernels as sk

        q = query[:, :, 0]
        if self.mode == "evicted" and self.mb is not None:
            return sk.union_decode(q, st["kbook"], st["vbook"], st["mb"], self.kbook_n, scaling)[:, :, None]
        storage = [st[name] for name in self._KERNEL_ARGS]
        rope_theta = self.rope_theta if self.mode == "codebook" else None
        return sk.spindle_decode(q, *storage, self._n, scaling, rope_theta)[:, :, None]

    # Compressed storage grows in place: each per-token tensor and book is the used part of a
    # zero-filled buffer with spare slots (plus one trash slot for padding tokens), so a decode
    # step writes its token instead of copying the layer. What is stored is what `ragged_append`
    # would build (same shapes, same values in every live slot). The exposed shapes (and the
    # index dtype) follow the new lengths' maxima: the host facts (`_lengths`) give them, but for
    # a codebook's new entries, which a chunk's append reads (its one host sync).
    # `mb`: a GQA evicted layer's member bits per book row (`_members`; None otherwise).
    _GROWN = ("kbook", "vbook", "rk", "rv", "mk", "mv", "_pos", "mb")
    _KERNEL_ARGS = ("kbook", "vbook", "rk", "rv", "mk", "mv", "_pos")  # `spindle_decode`'s storage

    def __copy__(self):
        """`KVLayer.__copy__` plus a buffer table of its own: a copy (the benchmark's tiles) that
        replaces its buffers must not rebind the original's."""
        new = KVLayer.__copy__(self)
        new._bufs = dict(self.__dict__.get("_bufs", {}))
        return new

    def _slot_append(self, name, length, new, valid, n2: int, dtype=None, fill=0) -> None:
        """`ragged_append` of `new` ([b, h, m, ...], where `valid`) after `length` into attribute `name`,
        which becomes a [b, h, n2, ...] view of its buffer."""
        cur = getattr(self, name)
        if dtype is not None and cur.dtype != dtype:
            cur = cur.to(dtype)
        bufs = self.__dict__.setdefault("_bufs", {})
        buf = bufs.get(name)
        n = cur.shape[2]
        if (
            buf is None
            or buf.data_ptr() != cur.data_ptr()
            or buf.dtype != cur.dtype
            or buf.shape[:2] != cur.shape[:2]
            or buf.stride() != cur.stride()
            or buf.shape[2] < n2 + 1
        ):
            grow = max(new.shape[2], self.__dict__.get("_extra", 0), n2 // 16, 16)
            buf = _filled(cur, n2 + grow + 1, fill)
            keep = min(n, n2)
            buf[:, :, :keep] = cur[:, :, :keep]
            bufs[name] = buf
        trash = buf.shape[2] - 1
        if new.shape[2] == 1:  # a decode token: no ranks to count
            idx = torch.where(valid, length[..., None], trash)
        else:
            idx = torch.where(valid, length[..., None] + valid.long().cumsum(-1) - 1, trash)
        buf.scatter_(2, _expand_index(idx, new), new.to(buf.dtype))
        setattr(self, name, buf[:, :, :n2])

    def reserve(self, extra: int) -> None:
        """Room for `extra` decoded tokens in every per-token tensor and book (no reallocation while
        decoding); dense layers size their slot buffers."""
        if not self._compressed():
            return super().reserve(extra)
        self._extra = extra
        bufs = self.__dict__.setdefault("_bufs", {})
        for name in self._GROWN:
            cur = getattr(self, name)
            if cur is None:
                continue
            buf = bufs.get(name)
            n = cur.shape[2]
            if buf is not None and buf.data_ptr() == cur.data_ptr() and buf.shape[2] >= n + extra + 1:
                continue
            buf = _filled(cur, n + extra + 1, EMPTY if name == "_pos" else 0)
            buf[:, :, :n] = cur
            bufs[name] = buf
            setattr(self, name, buf[:, :, :n])

    def append_step(self, keys: torch.Tensor, values: torch.Tensor, step) -> None:
        """`KVLayer.append_step`; a compressed layer's append takes the step's non-padding counts
        (`added`), which keep its host facts known."""
        if not self._compressed():
            return super().append_step(keys, values, step)
        self.append(keys, values, step.slot_positions, added=step.valid_counts())
        self.note_padding(step.padded, step.valid_host)

    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        added: list[int] | None = None,
    ):
        """Store new tokens (`added`: each row's non-padding ones, when the host knows them). Compressed
        layers return nothing: attention reads the storage itself (`attend`), and building the dense
        views here would copy the layer every step.

        A chunk (q > 1) takes its widths from the host facts (`_after_chunk`); a codebook layer's
        reads its new entry counts back (one host sync), as does any layer whose facts are unknown.
        A decode token (q == 1) does not: every width grows by one slot, an upper bound (a
        codebook token that joins an entry leaves a dead book slot; a padding token, a slot past its
        row's length, which `note_padding` reports), so decoding never waits for the device."""
        if self.mode == "dense":
            return super().append(keys, values, positions)
        host = self._after_chunk(added)
        if keys.shape[2] == 1 and self._room_for_decode():
            self._decode_write_or_defer(keys, values, positions)
            self._widen(1)
            self._lengths = host
            return None
        b, hk, q, d = keys.shape
        filled = (positions != EMPTY)[:, None, :]
        valid = filled.expand(b, hk, q)
        e = self._n.shape[1]
        group = e // hk
        valid_e = filled.expand(b, e, q)
        n_new = self._n + filled.sum(-1)
        if self.mode == "evicted":
            count = self.kbook_n + filled.sum(-1)
            # ids of the new entries
            ids = self.kbook_n[..., None] if q == 1 else self.kbook_n[..., None] + valid.long().cumsum(-1) - 1
            if q == 1:  # decode: the widths grow by one, no host sync (see `append`)
                c2, n2 = self.kbook.shape[2] + 1, self._pos.shape[2] + 1
            else:
                if host is None:  # (one host sync)
                    host = self._read_lengths(n_new, count)
                c2, n2 = max(host[2]), max(host[0])
                self.has_empty = min(host[1]) < n2
            self._slot_append("kbook", self.kbook_n, keys, valid, c2)
            self._slot_append("vbook", self.kbook_n, values, valid, c2)
            if self.mb is not None:  # every query head keeps a new token
                self._slot_append("mb", self.kbook_n, self._all_members(keys.shape[:3]), valid, c2)
            self.kbook_n = self.vbook_n = count
            ids_e = ids.repeat_interleave(group, dim=1)
            self._slot_append("rk", self._n, ids_e, valid_e, n2, dtype=index_dtype(c2))
        else:
            kx = keys
            if self.rope_theta is not None:
                kx = rope(keys, positions[:, None, :].expand(b, hk, q), self.rope_theta, inverse=True)
            plans = {
                "k": self._assign(kx, valid, self.kbook, self.kbook_n, self.theta_k),
                "v": self._assign(values, valid, self.vbook, self.vbook_n, self.theta_v),
            }
            if q == 1:  # decode: the widths grow by one, no host sync (see `append`)
                got = [self.kbook.shape[2] + 1, self.vbook.shape[2] + 1, self._pos.shape[2] + 1, None]
            else:  # the one host sync: the new entry counts (and the lengths, when the host lacks them)
                counts = (plans["k"][2], plans["v"][2])
                if host is None:
                    *host, most_k, most_v = self._read_lengths(n_new, *counts)
                else:
                    most_k, most_v = torch.stack([c.amax(-1) for c in counts]).tolist()
                got = [max(most_k), max(most_v), max(host[0]), min(host[1])]
            n2 = got[2]
            for i, which in enumerate(("k", "v")):
                name, count_name = ("kbook", "kbook_n") if which == "k" else ("vbook", "vbook_n")
                idx_name, mag_name = ("rk", "mk") if which == "k" else ("rv", "mv")
                units, opens, counts, new_idx, mags = plans[which]
                self._slot_append(name, getattr(self, count_name), units, opens, got[i])
                setattr(self, count_name, counts)
                entries = getattr(self, name).shape[2]
                self._slot_append(idx_name, self._n, new_idx, valid_e, n2, dtype=index_dtype(entries))
                self._slot_append(mag_name, self._n, mags, valid_e, n2)
            if got[3] is not None:
                self.has_empty = got[3] < n2
        pos_new = positions.to(torch.int32)[:, None, :].expand(b, e, q)
        self._slot_append("_pos", self._n, pos_new, valid_e, n2, fill=EMPTY)
        self._n = n_new
        self._lengths = host
        return None

    def _after_chunk(self, added: list[int] | None) -> list[list[int]] | None:
        """The host facts (`_lengths`) after a chunk of `added` non-padding tokens per row: every head
        stores them (an evicted layer's kv heads, as new entries); None when either is unknown."""
        if self._lengths is None or added is None:
            return None
        return [[n + a for n, a in zip(fact, added)] for fact in self._lengths]

    def _all_members(self, shape) -> torch.Tensor:
        """Member bits of tokens every query head keeps (new tokens): [b, hk, q] of `mb`'s type."""
        group = self._n.shape[1] // self.kbook.shape[1]
        return torch.full(shape, (1 << group) - 1, dtype=self.mb.dtype, device=self.mb.device)

    @staticmethod
    def _assign(x: torch.Tensor, valid: torch.Tensor, book: torch.Tensor, count: torch.Tensor, theta: float):
        """The paper's incremental update for a whole chunk at once, as if its tokens came one at a time.

        x [b, h, q, d] (keys before RoPE when the book is), valid [b, h, q], book [b, h, C, d] (unit rows,
        the first count[b, h] live). Token t joins the entry of highest cosine (the first on ties) among
        the book and the entries opened by earlier tokens of the chunk when that cosine > theta, and
        opens an entry of its own (its unit direction, in the book's dtype) otherwise. Returns (units
        [b, h, q, d], opens [b, h, q], new counts [b, h], entry of each token [b, h, q], magnitudes).
        """
        b, h, q, d = x.shape
        P = b * h
        dev = x.device
        xq = x.reshape(P, q, d)
        ok = valid.reshape(P, q)
        cnt = count.reshape(P)
        mag = _norms(xq)
        units = _units(xq, mag, book.dtype)
        sk = _kernels(dev)
        bk = book.reshape(P, book.shape[2], d)
        q_n = torch.full((P,), q, dtype=torch.int64, device=dev)
        if sk is not None:
            r = 1.0 / mag.clamp(min=1e-12)
            best_old, arg_old = sk.best_match(xq, r, bk, q_n, cnt)
        else:
            best_old, arg_old = _best_match_torch(_units(xq, mag, torch.float32), bk, cnt)
        cand = ok & (best_old <= theta)  # opens unless an earlier token of the chunk opened a match
        opens = cand
        rank = 0 if q == 1 else cand.long().cumsum(-1) - 1
        new_idx = torch.where(cand, cnt[:, None] + rank, arg_old)
        linked = None
        if q > 1:
            if sk is not None:
                r = 1.0 / mag.clamp(min=1e-12)
                ones = torch.ones_like(r)
                linked = sk.pair_counts(xq, units, r, ones, q_n, q_n, theta, causal=True, y_ok=cand)
                linked = bool((linked > 0).any())
            else:
                linked = True
        if linked:
            unit = _units(xq, mag, torch.float32)
            opens, new_idx = _resolve_chunk(unit, units, ok, cand, best_old, arg_old, cnt, theta)
        counts = cnt + opens.sum(-1)
        shape = (b, h, q)
        return (units.reshape(b, h, q, d), opens.reshape(shape), counts.reshape(b, h), new_idx.reshape(shape),
                mag.reshape(shape))  # fmt: skip

    # -- decode appends in place, and the static-shape decode step (`pipeline.decode_graph`) -----
    # A decode token is written at the device-held counts into the buffers' spare slots, the counts
    # advance in place, and every view widens by one slot (`_widen`, host-only): no host read and no
    # new storage, so one CUDA graph serves every step while the buffers stay the same. The eager
    # step runs the same writer (`append`), so the two store the same bytes.
    def _room_for_decode(self) -> bool:
        """Every grown tensor is the used part of its buffer with room for one token plus the trash
        slot, and the index dtype holds one more book entry (else `append`'s general path reallocates)."""
        bufs = self.__dict__.get("_bufs", {})
        for name in self._GROWN:
            cur = getattr(self, name)
            if cur is None:
                continue
            buf = bufs.get(name)
            if (
                buf is None
                or buf.data_ptr() != cur.data_ptr()
                or buf.dtype != cur.dtype
                or buf.stride() != cur.stride()
                or buf.shape[:2] != cur.shape[:2]
                or buf.shape[2] < cur.shape[2] + 2
            ):
                return False
        if self.rk.dtype != index_dtype(self.kbook.shape[2] + 1):
            return False
        return self.mode != "codebook" or self.rv.dtype == index_dtype(self.vbook.shape[2] + 1)

    def _write(self, name: str, length: torch.Tensor, new: torch.Tensor, valid: torch.Tensor) -> None:
        """Scatter one token per sequence (`new` [b, h, 1, ...]) into buffer `name` at `length` ([b, h]);
        where `valid` is False it lands in the trash slot (the buffer's last, never inside a view)."""
        buf = self._bufs[name]
        idx = length[..., None].masked_fill(~valid, buf.shape[2] - 1)
        buf.scatter_(2, _expand_index(idx, new), new.to(buf.dtype))

    def _decode_write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store one decode token per row (keys/values [b, hk, 1, d], positions [b, 1]) in place."""
        if self.mode == "evicted" and _append_kernel(keys.device):  # the same writes, one launch
            return evicted_append(self._bufs, self.kbook_n, self.vbook_n, self._n, keys, values, positions)
        b, hk = keys.shape[:2]
        e = self._n.shape[1]
        filled = (positions != EMPTY)[:, None, :]  # [b, 1, 1]
        valid, valid_e = filled.expand(b, hk, 1), filled.expand(b, e, 1)
        added = filled[..., 0].long()  # [b, 1]: 1 per stored token (0 for a padding row)
        if self.mode == "evicted":
            # a new book entry per kv head; each of its query heads indexes it
            ids = self.kbook_n[..., None].expand(b, hk, e // hk).reshape(b, e, 1)
            self._write("kbook", self.kbook_n, keys, valid)
            self._write("vbook", self.kbook_n, values, valid)
            if self.mb is not None:
                self._write("mb", self.kbook_n, self._all_members(keys.shape[:3]), valid)
            self._write("rk", self._n, ids, valid_e)
            self.kbook_n.add_(added)
            if self.vbook_n is not self.kbook_n:
                self.vbook_n.copy_(self.kbook_n)
        else:
            kx = keys if self.rope_theta is None else rope_one(keys, positions, self.rope_theta, inverse=True)
            for x, book, count, theta, idx, mag in (
                (kx, "kbook", self.kbook_n, self.theta_k, "rk", "mk"),
                (values, "vbook", self.vbook_n, self.theta_v, "rv", "mv"),
            ):
                # matched against the whole buffer (entries past `count` are masked): a fixed grid
                units, opens, _, new_idx, mags = self._assign(x, valid, self._bufs[book], count, theta)
                self._write(book, count, units, opens)
                self._write(idx, self._n, new_idx, valid_e)
                self._write(mag, self._n, mags, valid_e)
                count.add_(opens[..., 0].long())
        pos = positions.to(torch.int32)[:, None, :].expand(b, e, 1)
        self._write("_pos", self._n, pos, valid_e)
        self._n.add_(added)

    def _widen(self, steps: int) -> None:
        """Host bookkeeping of `steps` decode tokens: every view one slot wider per token (an upper
        bound, as `append`'s decode path always was: a token that joins an entry leaves a dead slot)."""
        for name in self._GROWN:
            cur = getattr(self, name)
            if cur is not None:
                setattr(self, name, self._bufs[name][:, :, : cur.shape[2] + steps])

    def static_decode_ready(self) -> bool:
        """A compressed layer takes the static step while its buffers have room (`_room_for_decode`);
        a dense one as a plain `KVLayer` does."""
        if self._compressed():
            return self._room_for_decode()
        k, v, p = self._k, self._v, self._p
        return (
            self.is_initialized
            and not self.slot_stats
            and k.used < k.capacity
            and v.used < v.capacity
            and p.used < p.capacity
            and k.used == v.used == p.used
        )

    @property
    def slots_used(self) -> int:
        """The view width (it grows by one per decode step, as the runner's slot index does)."""
        return self._pos.shape[2] if self._compressed() else self._k.used

    def static_buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor a static step writes or reads: the buffers and the device-held counts."""
        if not self._compressed():
            return super().static_buffers()
        grown = tuple(self._bufs[name] for name in self._GROWN if getattr(self, name) is not None)
        return (*grown, self._n, self.kbook_n, self.vbook_n)

    def append_static(self, keys, values, positions, slot) -> None:
        """Write one decode token; the counts on the device say where (the runner's `slot` is unused)."""
        if not self._compressed():
            return super().append_static(keys, values, positions, slot)
        self._decode_write_or_defer(keys, values, positions)
        self._lengths = None

    # -- codebook layers: the decode append's match folded into attention ----------------------
    # A decode token joins the book entry of highest cosine (> theta) or opens one: matching it reads
    # both books, and attention reads them again right after. Every live entry is read by some stored
    # token, so the attention kernel finds the best entry on its way (`spindle_decode_match`): the
    # append waits for the query (the token is held from `append` to `attend`, the next call on the
    # layer), attention runs over the tokens stored before it, the token is written, and its own term
    # joins the softmax as one more split.
    def _decode_write_or_defer(self, keys, values, positions) -> None:
        if self._fuses_match(keys):
            self._pending = (keys, values, positions)
        else:
            self._decode_write(keys, values, positions)

    def _fuses_match(self, keys: torch.Tensor) -> bool:
        """The decode token's match waits for the attention kernel: a codebook layer whose kernel
        takes the tensor-core path (storage in the keys' dtype; GQA is checked at `attend`)."""
        from policies import spindle_kernels as sk

        return (
            FUSED_MATCH
            and self.mode == "codebook"
            and sk.mma_path(keys.dtype, self.rope_theta)
            and self.kbook.dtype == self.vbook.dtype == keys.dtype
            and sk.kernel_available(keys.device)
        )

    def _attend_pending(self, query: torch.Tensor, scaling: float, static: bool) -> torch.Tensor:
        """Attention of a decode query with the held token's append (see above): [b, H, 1, d]."""
        global FUSED_MATCH
        from policies import spindle_kernels as sk

        keys, values, positions = self._pending
        self._pending = None
        part = None
        if query.shape[1] > keys.shape[1]:  # GQA: the shared kernel serves the match
            x = (keys[:, :, 0], values[:, :, 0])  # (the tensor-core path: keys stored as attended, no RoPE)
            mag = torch.stack([_norms(t) for t in x], dim=-1)  # [b, hk, 2]
            storage = [self._bufs[name] for name in self._KERNEL_ARGS]
            try:
                part = sk.match_partials(
                    query[:, :, 0], *storage, self._n, scaling, None, *x, 1.0 / mag.clamp(min=1e-12), mma=True
                )
            except Exception as exc:  # noqa: BLE001 - the fused kernel did not build here: match apart
                FUSED_MATCH = False
                warnings.warn(f"spindlekv: no fused decode match ({exc}); matching apart", stacklevel=2)
        if part is None:
            self._decode_write(keys, values, positions)
            return self.attend_static(query, scaling) if static else self._attend_stored(query, scaling)
        counts, thetas = (self.kbook_n, self.vbook_n), (self.theta_k, self.theta_v)
        matched_append(self._bufs, counts, self._n, x, mag, positions, query, part, thetas, scaling)
        return sk.reduce_partials(part, query.dtype)[:, :, None]

    def attend_static(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Decode attention over the whole buffers, lengths `_n` read on the device: the kernel's grid
        follows the capacity (fixed while the buffers stay), not the live count."""
        if not self._compressed():
            return super().attend_static(query, scaling)
        from policies import spindle_kernels as sk

        st = {name: self._bufs[name] if getattr(self, name) is not None else None for name in self._GROWN}
        if sk.kernel_available(query.device):
            return self._kernel_decode(query, scaling, st)
        # the float32 reference over the buffers (no host read either)
        rope_theta = self.rope_theta if self.mode == "codebook" else None
        args = [st[name] for name in self._KERNEL_ARGS]
        out = sk.reference_decode(query[:, :, 0], *args, self._n, scaling, rope_theta).to(query.dtype)
        return out[:, :, None]

    def commit_static(self, steps: int = 1) -> None:
        if not self._compressed():
            return super().commit_static(steps)
        self._widen(steps)

    def get_seq_length(self) -> int:
        pos = self.positions
        return 0 if pos is None else pos.shape[-1]

    def keep(self, index: torch.Tensor, filled: torch.Tensor, **host) -> None:
        if self.mode != "dense":
            raise RuntimeError("a compressed SpindleKV layer is not evicted from outside")
        super().keep(index, filled, **host)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.mode == "dense":
            return super().select_rows(rows)
        self._lengths = None  # (which rows stay is on the device)
        bufs = self.__dict__.get("_bufs", {})
        for name in ("kbook", "vbook", "kbook_n", "vbook_n", "rk", "rv", "mk", "mv", "_pos", "_n", "mb"):
            t = getattr(self, name)
            if t is None:
                continue
            buf = bufs.get(name)
            if buf is not None and buf.data_ptr() == t.data_ptr():
                bufs[name] = buf = buf[rows]
                setattr(self, name, buf[:, :, : t.shape[2]])
            else:
                setattr(self, name, t[rows])

    # -- accounting --------------------------------------------------------------------------
    def filled_slots_per_row(self) -> torch.Tensor:
        if self.mode == "evicted":  # distinct stored tokens (the union per kv head)
            return self.kbook_n.sum(-1)
        if self.mode == "codebook":
            return self._n.sum(-1)
        return super().filled_slots_per_row()

    def kept_bytes_per_row(self) -> torch.Tensor:
        if self.mode == "dense":
            return super().kept_bytes_per_row()
        vec = self.kbook.shape[-1] * self.kbook.element_size()
        books = (self.kbook_n + (self.vbook_n if self.mode == "codebook" else self.kbook_n)).sum(-1) * vec
        per_token = self.rk.element_size()
        if self.mode == "codebook":
            per_token += self.rv.element_size() + self.mk.element_size() + self.mv.element_size()
        members = 0 if self.mb is None else self.kbook_n.sum(-1) * self.mb.element_size()
        return books + self._n.sum(-1) * per_token + members

    def stored_bytes(self) -> int:
        if self.mode == "dense":
            return super().stored_bytes()
        bufs = self.__dict__.get("_bufs", {})
        total = 0
        for name in self._GROWN:  # the buffers' spare slots count: they are held
            t = getattr(self, name)
            if t is not None:
                buf = bufs.get(name)
                t = buf if buf is not None and buf.data_ptr() == t.data_ptr() else t
                total += t.numel() * t.element_size()
        return total


@register
class SpindleKV(Policy):
    name = "spindlekv"
    paper = (
        "SpindleKV: A Novel KV Cache Reduction Method Balancing Both Shallow and Deep Layers "
        "(Tang et al. 2025)"
    )

    @dataclass
    class Params:
        shallow_layers: int | None = None  # codebook layers; None: round(shallow_fraction * layers), >= 1
        shallow_fraction: float = 0.2
        theta_k: float = 0.98  # cosine threshold for merging keys (paper)
        theta_v: float = 0.95  # cosine threshold for merging values (paper)
        rope_theta: float | None = None  # the model's RoPE base: key codebooks before RoPE, as the paper
        window: int = 32  # observation window (deep layers)
        kernel: int = 7
        pooling: str = "avg"
        pyramid_top: float = 0.525  # relative keep weight of the first deep layer (paper's alpha)
        pyramid_bottom: float = 0.05  # ... and of the last (paper's beta)

        def __post_init__(self) -> None:
            if not 0.0 <= self.shallow_fraction <= 1.0:
                raise ValueError("shallow_fraction must be in [0, 1]")
            if not (-1.0 <= self.theta_k <= 1.0 and -1.0 <= self.theta_v <= 1.0):
                raise ValueError("theta_k/theta_v are cosine similarities in [-1, 1]")
            if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
                raise ValueError("window >= 1 and an odd kernel >= 1")
            if self.pooling not in ("avg", "max"):
                raise ValueError("pooling must be 'avg' or 'max'")
            if self.pyramid_top <= 0 or self.pyramid_bottom <= 0:
                raise ValueError("pyramid weights must be > 0")

    def make_layer(self) -> KVLayer:
        return SpindleLayer()

    def num_shallow(self, num_layers: int) -> int:
        p = self.params
        if p.shallow_layers is not None:
            return min(p.shallow_layers, num_layers)
        return min(num_layers, max(1, round(p.shallow_fraction * num_layers)))

    def pyramid_weights(self, num_layers: int) -> list[float]:
        """Relative byte weights of every layer (0 for the shallow ones)."""
        p = self.params
        first = self.num_shallow(num_layers)
        deep = num_layers - first
        weights = [0.0] * first
        for j in range(deep):
            t = j / (deep - 1) if deep > 1 else 0.0
            weights.append(p.pyramid_top + (p.pyramid_bottom - p.pyramid_top) * t)
        return weights

    def target_ratio(self, prompt_tokens: int, budget: Budget) -> float:
        """The stated byte ratio: the budget's token ratio for this prompt, in bytes."""
        return budget.for_length(prompt_tokens) / prompt_tokens

    def compress_layer(self, layer, queries, step, layer_idx, num_layers, scaling) -> None:
        p = self.params
        if not isinstance(layer, SpindleLayer):
            raise TypeError("spindlekv needs its own SpindleLayer (CompressedCache with policy.make_layer)")
        if layer_idx < self.num_shallow(num_layers):
            if layer.mode == "dense":
                layer.to_codebook(p.theta_k, p.theta_v, p.rope_theta)
            # (a codebook layer takes new tokens in as they come)
        else:
            self._evict(layer, queries, step, layer_idx, num_layers, scaling)
        spent = self._spent_before(step, layer_idx) + layer.kept_bytes_per_row()
        step.extras[_SPENT] = (layer_idx + 1, spent)

    @staticmethod
    def _spent_before(step, layer_idx: int):
        """Kept bytes per row ([b], or 0) of layers 0..layer_idx-1: the running sum this forward's
        compressions left (layers compress in order), else summed over the layers (a few kernels each;
        summing at every layer cost O(layers^2) small launches per compressing forward)."""
        run = step.extras.get(_SPENT)
        if run is not None and run[0] == layer_idx:
            return run[1]
        return sum(step.cache.layers[j].kept_bytes_per_row() for j in range(layer_idx))

    def _evict(self, layer: SpindleLayer, queries, step, layer_idx, num_layers, scaling) -> None:
        p = self.params
        b, num_heads = queries.shape[:2]
        dev = queries.device
        keys = layer.keys if layer.mode == "dense" else layer.kbook  # shapes only (no dense view)
        hk, d = keys.shape[1], keys.shape[-1]
        group = num_heads // hk
        # byte allowance of this layer: what the row may still spend, by pyramid weight
        s_bytes = keys.element_size()
        target = step.row_budgets.to(torch.int64) * hk * 2 * d * s_bytes * num_layers
        spent = self._spent_before(step, layer_idx)
        weights = self.pyramid_weights(num_layers)
        share = weights[layer_idx] / sum(weights[layer_idx:])
        allowance = ((target - spent).clamp(min=0).double() * share).floor().to(torch.int64)  # [b]

        # per-query-head SnapKV scores over the (possibly already unfolded) view
        pos_e = layer.positions if layer.mode != "dense" else layer.positions.repeat_interleave(group, dim=1)
        w = window_size(step.positions, p.window)
        wq, wpos = queries[:, :, -w:], step.positions[:, -w:]
        probs = received_attention(layer, wq, wpos, scaling)  # [b, H, s]
        window_slots = in_window(pos_e, wpos)
        # each head's filled slots hold increasing positions (dense: as appended; evicted: packed to the
        # front in order, chunks appended after), so the pooling moves them without a sort
        scores = pool_in_position_order(
            probs.masked_fill(window_slots, 0.0),
            pos_e,
            p.kernel,
            p.pooling,
            ordered=True,
            full=not layer.has_empty,
        )
        scores = torch.where(window_slots, KEEP_BASE + pos_e.float(), scores)
        filled = pos_e != EMPTY
        scores = scores.masked_fill(~filled, float("-inf"))
        order = scores.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            2, order, torch.arange(order.shape[-1], device=dev).expand_as(order)
        )
        rank = torch.where(filled, rank, torch.full_like(rank, BIG))

        # union size per kv head for every per-head count k: entries whose best rank < k
        s = scores.shape[-1]
        if layer.mode == "dense":
            entry, n_entries = torch.arange(s, device=dev).expand(b, num_heads, s), s
        else:
            entry, n_entries = layer.rk.long(), layer.kbook.shape[2]
        best = torch.full((b, hk, n_entries + 1), BIG, dtype=torch.int64, device=dev)
        ent = torch.where(filled, entry, torch.full_like(entry, n_entries)).reshape(b, hk, -1)
        best.scatter_reduce_(2, ent, rank.reshape(b, hk, -1), reduce="amin")
        best = best[..., :n_entries].clamp(max=s)
        hist = torch.zeros((b, hk, s + 1), dtype=torch.int64, device=dev).scatter_add_(
            2, best, torch.ones_like(best)
        )
        union = hist[..., :s].cumsum(-1).sum(1)  # [b, s]: distinct tokens kept for k = 1..s
        heads_kept = torch.minimum(
            torch.arange(1, s + 1, device=dev)[None, None, :], filled.sum(-1)[..., None]
        ).sum(1)
        idx_bytes = 2 if n_entries + s < 2**15 else 4
        cost = union * (2 * d * s_bytes + _member_bytes(group)) + heads_kept * idx_bytes  # [b, s]
        fits = cost <= allowance[:, None]
        k = (
            (fits.long().cumsum(-1) == torch.arange(1, s + 1, device=dev)).sum(-1).clamp(min=1)
        )  # largest fitting k
        selected = filled & (rank < k[:, None, None])
        layer.evict_unfolded(selected, num_heads)

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
[b, query heads, slots, d] keys/values (plain MHA); `positions` is per query head.

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

from dataclasses import dataclass

import torch

from pipeline.kv_cache import EMPTY, KVLayer
from policies.base import Budget, Policy
from policies.registry import register
from policies.seqstore import _expand_index, compact, front_mask
from policies.signals import KEEP_BASE, attention_probs, in_window, pool_in_position_order, window_size

BIG = 2**40


# -- RoPE (default type, rotate-half convention as Llama/Qwen/Mistral in transformers) -----------
def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool = False) -> torch.Tensor:
    """Rotate x [..., n, d] by its positions [..., n] (or back, with inverse)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d))
    ang = positions.to(torch.float64).clamp(min=0)[..., None] * inv_freq
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


def _filled(like: torch.Tensor, slots: int, fill) -> torch.Tensor:
    """A [b, h, slots, ...] tensor like `like`, filled with `fill`."""
    return torch.full((*like.shape[:2], slots, *like.shape[3:]), fill, dtype=like.dtype, device=like.device)


def index_dtype(entries: int) -> torch.dtype:
    return torch.int16 if entries < 2**15 else torch.int32


class SpindleLayer(KVLayer):
    """Dense until its first compression; then a codebook layer (shallow) or an unfolded
    eviction layer (deep). Both store per kv head a book of vectors and per exposed head
    (kv head / query head) an index (and, for codebooks, a magnitude) per token."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "dense"

    # -- views ------------------------------------------------------------------------------
    def _view(self, which: str) -> torch.Tensor:
        book = self.kbook if which == "k" else self.vbook
        idx = self.rk if which == "k" or self.mode == "evicted" else self.rv
        b, e, s = idx.shape
        hk = book.shape[1]
        group = e // hk
        book_e = book.repeat_interleave(group, dim=1) if group > 1 else book
        out = torch.gather(book_e, 2, _expand_index(idx.long().clamp(min=0), book_e))
        if self.mode == "codebook":
            mag = self.mk if which == "k" else self.mv
            out = (out.float() * mag.float()[..., None]).to(book.dtype)
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
        n, (keys, values, pos) = compact(filled, self.keys, self.values, self.positions)
        b, h, s, d = keys.shape
        if rope_theta is not None:
            keys = rope(keys, pos, rope_theta, inverse=True)
        books, idxs, mags = {}, {}, {}
        for which, x, theta in (("k", keys, theta_k), ("v", values, theta_v)):
            index = torch.zeros((b, h, s), dtype=torch.int64, device=x.device)
            mag = torch.zeros((b, h, s), dtype=torch.float32, device=x.device)
            entries = []
            for i in range(b):
                for j in range(h):
                    m = int(n[i, j])
                    book, ix, mg = build_codebook(x[i, j, :m], theta)
                    entries.append(book)
                    index[i, j, :m] = ix
                    mag[i, j, :m] = mg
            c = max(e.shape[0] for e in entries)
            book = x.new_zeros((b, h, c, d))
            counts = torch.zeros((b, h), dtype=torch.int64, device=x.device)
            for k, e in enumerate(entries):
                book[k // h, k % h, : e.shape[0]] = e.to(x.dtype)
                counts[k // h, k % h] = e.shape[0]
            books[which] = (book, counts)
            idxs[which] = index.to(x.device).to(index_dtype(c))
            mags[which] = mag.to(x.device).to(x.dtype)
        self.kbook, self.kbook_n = books["k"]
        self.vbook, self.vbook_n = books["v"]
        self.rk, self.rv = idxs["k"], idxs["v"]
        self.mk, self.mv = mags["k"], mags["v"]
        self._pos = torch.where(front_mask(n, s), pos, torch.full_like(pos, EMPTY))
        self._n = n
        self.theta_k, self.theta_v, self.rope_theta = theta_k, theta_v, rope_theta
        self._drop_dense()
        self.mode = "codebook"

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
            entry = self.rk.long()
            kvec, vvec = self.kbook, self.vbook
            pos_e = self._pos
        b = selected.shape[0]
        n_entries = kvec.shape[2]
        # union per kv head: entries referenced by a selected slot of any of its query heads
        used = torch.zeros((b, hk, n_entries + 1), dtype=torch.bool, device=selected.device)
        ent = torch.where(selected, entry, torch.full_like(entry, n_entries)).reshape(b, hk, -1)
        used.scatter_(2, ent, torch.ones_like(ent, dtype=torch.bool))
        used = used[..., :n_entries]
        u_n, (kbook, vbook) = compact(used, kvec, vvec)
        new_id = used.long().cumsum(-1) - 1  # [b, hk, entries]
        new_id_e = new_id.repeat_interleave(group, dim=1)
        remapped = torch.gather(new_id_e, 2, entry)
        n, (rk, pos) = compact(selected, remapped, pos_e)
        self.kbook, self.vbook, self.kbook_n = kbook.contiguous(), vbook.contiguous(), u_n
        self.vbook_n = u_n
        self.rk = rk.to(index_dtype(kbook.shape[2]))
        self.rv = None
        self.mk = self.mv = None
        self._pos = torch.where(front_mask(n, pos.shape[-1]), pos, torch.full_like(pos, EMPTY)).to(
            torch.int32
        )
        self._n = n
        self._drop_dense()
        self.mode = "evicted"

    # -- the layer protocol -----------------------------------------------------------------
    def attend(self, query: torch.Tensor, step, scaling: float) -> torch.Tensor:
        """Decode (one query per row) over the compressed storage itself: `spindle_kernels`' Triton
        flash-decoding gathers book rows by index, scales and rotates them in registers. Every
        stored token precedes the query, so no mask is needed; lengths are `_n`. Prefill, dense
        layers, CPU and machines without triton take the exact path over the dense views."""
        if self._compressed() and query.shape[2] == 1:
            from policies import spindle_kernels as sk  # triton decides at import whether it interprets

            if sk.kernel_available(query.device):
                out = sk.spindle_decode(
                    query[:, :, 0],
                    self.kbook,
                    self.vbook,
                    self.rk,
                    self.rv,
                    self.mk,
                    self.mv,
                    self._pos,
                    self._n,
                    scaling,
                    self.rope_theta if self.mode == "codebook" else None,
                )
                return out[:, :, None]
        return super().attend(query, step, scaling)

    # Compressed storage grows in place: each per-token tensor and book is the used part of a
    # zero-filled buffer with spare slots (plus one trash slot for padding tokens), so a decode
    # step writes its token instead of copying the layer. What is stored is what `ragged_append`
    # would build (same shapes, same values in every live slot); the one host sync per append
    # reads the new lengths' maxima, which the exposed shapes (and the index dtype) depend on.
    _GROWN = ("kbook", "vbook", "rk", "rv", "mk", "mv", "_pos")

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
        rank = valid.long().cumsum(-1) - 1
        idx = torch.where(valid, length[..., None] + rank, torch.full_like(rank, trash))
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

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        """Store new tokens. Compressed layers return nothing: attention reads the storage itself
        (`attend`), and building the dense views here would copy the layer every step."""
        if self.mode == "dense":
            return super().append(keys, values, positions)
        b, hk, q, d = keys.shape
        valid = (positions != EMPTY)[:, None, :].expand(b, hk, q)
        e = self._n.shape[1]
        group = e // hk
        valid_e = (positions != EMPTY)[:, None, :].expand(b, e, q)
        n_new = self._n + valid_e.sum(-1)
        if self.mode == "evicted":
            ids = self.kbook_n[..., None] + valid.long().cumsum(-1) - 1  # ids of the new entries
            count = self.kbook_n + valid.sum(-1)
            c2, n2 = torch.stack([count.max(), n_new.max()]).tolist()  # the one host sync
            self._slot_append("kbook", self.kbook_n, keys, valid, c2)
            self._slot_append("vbook", self.kbook_n, values, valid, c2)
            self.kbook_n = self.vbook_n = count
            ids_e = ids.repeat_interleave(group, dim=1)
            self._slot_append("rk", self._n, ids_e, valid_e, n2, dtype=index_dtype(c2))
        else:
            kx = keys
            if self.rope_theta is not None:
                kx = rope(keys, positions[:, None, :].expand(b, hk, q), self.rope_theta, inverse=True)
            xs = {"k": kx, "v": values}
            thetas = {"k": self.theta_k, "v": self.theta_v}
            books = {"k": ("kbook", "kbook_n"), "v": ("vbook", "vbook_n")}
            new_idx = {w: torch.zeros((b, hk, q), dtype=torch.int64, device=keys.device) for w in xs}
            n2 = None
            for t in range(q):  # one token at a time: a later token may join an earlier one's entry
                units, opens, counts = {}, {}, {}
                for which in ("k", "v"):
                    book, count = getattr(self, books[which][0]), getattr(self, books[which][1])
                    xt = xs[which][:, :, t].float()
                    mag = xt.norm(dim=-1)
                    unit = xt / mag.clamp(min=1e-12)[..., None]
                    cos = torch.einsum("bhcd,bhd->bhc", book.float(), unit)
                    live = front_mask(count, book.shape[2])
                    cos = cos.masked_fill(~live, -2.0)
                    best, arg = (
                        cos.max(-1)
                        if book.shape[2]
                        else (torch.full_like(mag, -2.0), torch.zeros_like(count))
                    )
                    join = best > thetas[which]
                    opens[which] = valid[:, :, t] & ~join
                    new_idx[which][:, :, t] = torch.where(join, arg, count)
                    counts[which] = count + opens[which].long()
                    units[which] = unit
                maxes = [counts["k"].max(), counts["v"].max()] + ([n_new.max()] if t == 0 else [])
                got = torch.stack(maxes).tolist()  # the one host sync per token
                n2 = got[2] if t == 0 else n2
                for i, which in enumerate(("k", "v")):
                    name, count_name = books[which]
                    book = getattr(self, name)
                    self._slot_append(
                        name, getattr(self, count_name), units[which][:, :, None].to(book.dtype),
                        opens[which][..., None], got[i],
                    )  # fmt: skip
                    setattr(self, count_name, counts[which])
            for which in ("k", "v"):
                idx_name, mag_name = ("rk", "mk") if which == "k" else ("rv", "mv")
                entries = getattr(self, books[which][0]).shape[2]
                self._slot_append(idx_name, self._n, new_idx[which], valid_e, n2, dtype=index_dtype(entries))
                mags = xs[which].float().norm(dim=-1)
                self._slot_append(mag_name, self._n, mags, valid_e, n2)
        pos_new = positions.to(torch.int32)[:, None, :].expand(b, e, q)
        self._slot_append("_pos", self._n, pos_new, valid_e, n2, fill=EMPTY)
        self._n = n_new
        return None

    def get_seq_length(self) -> int:
        pos = self.positions
        return 0 if pos is None else pos.shape[-1]

    def keep(self, index: torch.Tensor, filled: torch.Tensor) -> None:
        if self.mode != "dense":
            raise RuntimeError("a compressed SpindleKV layer is not evicted from outside")
        super().keep(index, filled)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.mode == "dense":
            return super().select_rows(rows)
        bufs = self.__dict__.get("_bufs", {})
        for name in ("kbook", "vbook", "kbook_n", "vbook_n", "rk", "rv", "mk", "mv", "_pos", "_n"):
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
        return books + self._n.sum(-1) * per_token

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
            return  # a codebook layer takes new tokens in as they come
        self._evict(layer, queries, step, layer_idx, num_layers, scaling)

    def _evict(self, layer: SpindleLayer, queries, step, layer_idx, num_layers, scaling) -> None:
        p = self.params
        b, num_heads = queries.shape[:2]
        dev = queries.device
        keys = layer.keys
        hk, d = (
            (keys.shape[1], keys.shape[-1])
            if layer.mode == "dense"
            else (layer.kbook.shape[1], keys.shape[-1])
        )
        group = num_heads // hk
        # byte allowance of this layer: what the row may still spend, by pyramid weight
        s_bytes = keys.element_size()
        target = step.row_budgets.to(torch.int64) * hk * 2 * d * s_bytes * num_layers
        spent = sum(step.cache.layers[j].kept_bytes_per_row() for j in range(layer_idx))
        weights = self.pyramid_weights(num_layers)
        share = weights[layer_idx] / sum(weights[layer_idx:])
        allowance = ((target - spent).clamp(min=0).double() * share).floor().to(torch.int64)  # [b]

        # per-query-head SnapKV scores over the (possibly already unfolded) view
        pos_e = layer.positions if layer.mode != "dense" else layer.positions.repeat_interleave(group, dim=1)
        w = window_size(step.positions, p.window)
        wq, wpos = queries[:, :, -w:], step.positions[:, -w:]
        probs = attention_probs(layer, wq, wpos, scaling).sum(dim=2)  # [b, H, s]
        window_slots = in_window(pos_e, wpos)
        scores = pool_in_position_order(probs.masked_fill(window_slots, 0.0), pos_e, p.kernel, p.pooling)
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
        cost = union * 2 * d * s_bytes + heads_kept * idx_bytes  # [b, s]
        fits = cost <= allowance[:, None]
        k = (
            (fits.long().cumsum(-1) == torch.arange(1, s + 1, device=dev)).sum(-1).clamp(min=1)
        )  # largest fitting k
        selected = filled & (rank < k[:, None, None])
        layer.evict_unfolded(selected, num_heads)

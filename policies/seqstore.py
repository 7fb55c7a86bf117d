"""Ragged per-(row, head) sequences stored left-aligned in padded tensors.

The storage-form layers (`kivi`, `spindlekv`) keep each (row, head)'s own token sequence
compacted to the front of a [b, h, n, ...] tensor plus a [b, h] length, and never store
padding tokens. Quantisation groups and codebooks are then formed over a row's own tokens,
so a row's cache does not depend on how much left padding its batch needed (batched ==
unbatched), and memory is spent on real tokens only.
"""

from __future__ import annotations

import torch


def _expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[b, h, m] -> [b, h, m, *like.shape[3:]] for gather/scatter along dim 2."""
    tail = like.shape[3:]
    return index.reshape(*index.shape, *([1] * len(tail))).expand(*index.shape, *tail)


def ragged_append(
    buf: torch.Tensor, length: torch.Tensor, new: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the `valid` items of `new` ([b, h, m, ...], in order) after each sequence's `length`.

    buf [b, h, n, ...], length [b, h]; returns (buffer sized to the longest result, new length).
    Entries past a sequence's length are unspecified (finite) and never read as data.
    """
    b, h, n = buf.shape[:3]
    added = valid.sum(-1)
    total = length + added
    n2 = int(total.max()) if total.numel() else 0
    out = buf.new_zeros((b, h, n2 + 1, *buf.shape[3:]))
    keep = min(n, n2)
    out[:, :, :keep] = buf[:, :, :keep]
    rank = valid.long().cumsum(-1) - 1
    idx = torch.where(valid, length[..., None] + rank, torch.full_like(rank, n2))
    out.scatter_(2, _expand_index(idx, new), new.to(buf.dtype))
    return out[:, :, :n2], total


def drop_front(
    buf: torch.Tensor, length: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the first `count` ([b, h]) items of each sequence; returns (buffer, new length)."""
    n = buf.shape[2]
    left = length - count
    n2 = int(left.max()) if left.numel() else 0
    if n == 0 or n2 == 0:
        return buf[:, :, :0], left
    idx = (torch.arange(n2, device=buf.device) + count[..., None]).clamp(max=n - 1)
    return torch.gather(buf, 2, _expand_index(idx, buf)), left


def take_front(buf: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` items of every sequence (zero-padded when the buffer is shorter)."""
    n = buf.shape[2]
    if n >= count:
        return buf[:, :, :count]
    pad = buf.new_zeros((*buf.shape[:2], count - n, *buf.shape[3:]))
    return torch.cat([buf, pad], dim=2)


def compact(valid: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Move each (row, head)'s valid slots ([b, h, s]) to the front, in slot order.

    Returns (length [b, h], the tensors gathered and trimmed to the longest length).
    """
    length = valid.sum(-1)
    n = int(length.max()) if length.numel() else 0
    return length, gather_front(valid, n, *tensors)


def gather_front(valid: torch.Tensor, width: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """`compact`'s tensors when the caller knows the longest length (`width`) on the host: no sync."""
    s = valid.shape[-1]
    slot = torch.arange(s, device=valid.device)
    order = torch.where(valid, slot, slot + s).argsort(dim=-1)[..., :width]
    return [torch.gather(t, 2, _expand_index(order, t)) for t in tensors]


def front_mask(length: torch.Tensor, n: int) -> torch.Tensor:
    """[b, h, n] True for the first `length` items of each sequence."""
    return torch.arange(n, device=length.device) < length[..., None]

"""Needle placement: insert sentences into a haystack at relative depths, on sentence boundaries."""

from __future__ import annotations

from pipeline.tasks.haystacks import ends_sentence


def boundary_index(hay: list[str], depth: float) -> int:
    """The piece index nearest to ``depth * len(hay)`` where a sentence starts (0 and len count)."""
    n = len(hay)
    if n == 0:
        return 0
    target = min(max(round(depth * n), 0), n)
    if target in (0, n):
        return target
    for step in range(n):
        for j in (target - step, target + step):
            if 0 < j < n and ends_sentence(hay[j - 1]):
                return j
            if j in (0, n):
                return j
    return target


def insert_needles(hay: list[str], needles: list[tuple[float, str]]) -> str:
    """Join `hay` with each (depth, sentence) needle inserted at its depth.

    Needles landing on the same boundary keep the order they were given in.
    """
    slots: dict[int, list[str]] = {}
    for depth, sentence in needles:
        slots.setdefault(boundary_index(hay, depth), []).append(sentence)
    out: list[str] = []
    for j in range(len(hay) + 1):
        for sentence in slots.get(j, ()):
            if out and not out[-1][-1:].isspace():
                out.append(" ")
            out.append(sentence + " ")
        if j < len(hay):
            out.append(hay[j])
    return "".join(out).strip()

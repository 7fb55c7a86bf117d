"""Fit a generated prompt to a token budget by searching over the amount of filler.

`build(k)` makes a row with `k` filler units (haystack words, or list entries); `measure(row)`
counts the tokens of its full prompt. The search returns the largest `k` whose prompt is not
longer than the target; filler units are a few tokens each, so the result lands within a
fraction of a percent of the target for contexts of a few hundred tokens and up.
"""

from __future__ import annotations

from collections.abc import Callable


def fit_units(
    build: Callable[[int], dict],
    measure: Callable[[dict], int],
    target: int,
    k_max: int,
) -> tuple[int, dict, int]:
    """(k, row, tokens) for the largest k in [0, k_max] with measure(build(k)) <= target."""
    cache: dict[int, int] = {}

    def length(k: int) -> int:
        if k not in cache:
            cache[k] = measure(build(k))
        return cache[k]

    base = length(0)
    if base > target:
        raise ValueError(
            f"the prompt without filler already has {base} tokens, more than the requested {target}"
        )
    # Linear estimate from one probe, then a bracket around it, then bisection.
    probe = max(1, min(k_max, 64))
    rate = max((length(probe) - base) / probe, 1e-3)
    guess = min(k_max, max(0, int((target - base) / rate)))
    lo, hi = 0, k_max + 1  # invariant: length(lo) <= target < length(hi) (hi = k_max + 1 is "too long")
    step = max(8, guess // 50)
    k = guess
    if length(k) <= target:
        lo = k
        while lo < k_max:
            k = min(k_max, lo + step)
            if length(k) > target:
                hi = k
                break
            lo, step = k, step * 2
    else:
        hi = k
        while True:
            k = max(0, hi - step)
            if length(k) <= target:
                lo = k
                break
            hi, step = k, step * 2
    if lo == k_max:
        hi = k_max + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo, build(lo), length(lo)

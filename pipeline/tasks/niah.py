"""RULER's needle-in-a-haystack variants: single, multi-key, multi-value and multi-query.

Needles read "One of the special magic {numbers} for {key} is: {value}." Keys are
``adjective-noun`` words (or numbers / UUIDs), values numbers, words or UUIDs. The first
needle (the queried key, or the first value / query) goes at the requested depth; the others
(distractor keys, further values, further queries) at depths drawn from the sample's rng.
"""

from __future__ import annotations

import random

from pipeline.tasks.base import Sample
from pipeline.tasks.words import distinct_keys, distinct_values


def _keys(rng: random.Random, count: int, key_type: str) -> list[str]:
    if key_type == "words":
        return distinct_keys(rng, count)
    return distinct_values(rng, count, key_type)


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


def _sample(kind: str, query: str, needles, answer: list[str], depth: float) -> Sample:
    return Sample(
        preamble=(
            f"Some special magic {kind} are hidden within the following text. "
            f"Make sure to memorize it. I will quiz you about the {kind} afterwards.\n"
        ),
        needles=needles,
        question=f"What are all the special magic {kind} for {query} mentioned in the provided text?",
        answer=answer,
        answer_prefix=f"The special magic {kind} for {query} mentioned in the provided text are",
        separator="\n",
        depth=depth,
    )


def niah_sample(
    rng: random.Random,
    depth: float,
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    key_type: str = "words",
    value_type: str = "numbers",
) -> Sample:
    """A NIAH sample; (num_keys, num_values, num_queries) = (1,1,1) single, (k,1,1) multikey,
    (1,v,1) multivalue, (q,1,q) multiquery."""
    num_keys = max(num_keys, num_queries)
    keys = _keys(rng, num_keys, key_type)
    values = [distinct_values(rng, num_values, value_type) for _ in keys]
    needles: list[tuple[float, str]] = []
    for k, key in enumerate(keys):
        for v, value in enumerate(values[k]):
            d = depth if (k == 0 and v == 0) else round(rng.random(), 4)
            needles.append((d, _needle(value_type, key, value)))
    queried = keys[:num_queries]
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    answer = [value for k in range(num_queries) for value in values[k]]
    return _sample(value_type, query, needles, answer, depth)

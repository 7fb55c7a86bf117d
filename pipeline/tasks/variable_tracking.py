"""RULER's variable tracking: follow chains of ``VAR X = ...`` assignments hidden in a haystack.

The first chain is queried; its first assignment goes at the requested depth and its later
hops at increasing depths after it, so every chain reads in order. Other chains are
distractors with their own values, placed at random depths (also in order).
"""

from __future__ import annotations

import random

from pipeline.tasks.base import Sample
from pipeline.tasks.words import variable_name


def _chain(rng: random.Random, value: str, hops: int, taken: set[str]) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = variable_name(rng)
        if name not in taken:
            taken.add(name)
            names.append(name)
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    return names, statements


def variable_tracking_sample(
    rng: random.Random, depth: float, num_chains: int = 1, num_hops: int = 4
) -> Sample:
    values: list[str] = []
    while len(values) < num_chains:  # 5-digit values, as in RULER
        value = str(rng.randint(10000, 99999))
        if value not in values:
            values.append(value)
    taken: set[str] = set()
    needles: list[tuple[float, str]] = []
    answer: list[str] = []
    for c, value in enumerate(values):
        names, statements = _chain(rng, value, num_hops, taken)
        start = depth if c == 0 else rng.random()
        later = sorted(start + (1.0 - start) * rng.random() for _ in statements[1:])
        depths = [start] + later
        needles += [(round(d, 4), s) for d, s in zip(depths, statements, strict=True)]
        if c == 0:
            answer = names
    query = values[0]
    return Sample(
        preamble="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        needles=needles,
        question=f"Question: Find all variables that are assigned the value {query} in the text above.",
        answer=answer,
        answer_prefix=(
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{num_hops + 1} variables are assigned the value {query}, they are:"
        ),
        separator="\n",
        depth=depth,
    )

"""Passkey retrieval (Mohtashami & Jaggi, 2023): find a number hidden in filler text."""

from __future__ import annotations

import random

from pipeline.tasks.base import Sample

PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)


def passkey_sample(rng: random.Random, depth: float, digits: int = 5) -> Sample:
    key = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return Sample(
        preamble=PREAMBLE,
        needles=[(depth, needle)],
        question="What is the pass key?",
        answer=[key],
        answer_prefix="The pass key is",
        separator="\n\n",
        depth=depth,
    )

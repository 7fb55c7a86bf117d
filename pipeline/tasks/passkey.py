"""Passkey retrieval (Mohtashami & Jaggi, 2023): find a number hidden in filler text.

The needle is "The pass key is {key}. Remember it." by default. The paper's needle goes on
with "{key} is the pass key." (``needle="paper"`` gives it), but that tail hands a small
model a trap: the prompt then holds "is the pass key" twice (the needle's tail and the
question "What is the pass key?") against one "is {key}", and after the answer prefix
"The pass key is" SmolLM2-135M copies " the pass key." instead of the number, mostly when
the needle sits early in the context (depth ~0.1). Without the tail the full-cache model
finds the key; the paper's preamble, filler, question and answer prefix are unchanged.
"""

from __future__ import annotations

import random

from pipeline.tasks.base import Sample

PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
NEEDLES = {
    "short": "The pass key is {key}. Remember it.",
    "paper": "The pass key is {key}. Remember it. {key} is the pass key.",
}


def passkey_sample(rng: random.Random, depth: float, digits: int = 5, needle: str = "short") -> Sample:
    if needle not in NEEDLES:
        raise ValueError(f"passkey needle {needle!r}: choose one of {sorted(NEEDLES)}")
    key = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    return Sample(
        preamble=PREAMBLE,
        needles=[(depth, NEEDLES[needle].format(key=key))],
        question="What is the pass key?",
        answer=[key],
        answer_prefix="The pass key is",
        separator="\n\n",
        depth=depth,
    )
